"""Where model.base lives on this machine: a local Hugging Face directory, or an s3:// prefix downloaded
once into the state dir. Torch-free: preprocess needs only the base's tokenizer."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from infra.s3 import download_prefix
from pipeline.config import ConfigError, Params, Workspace


def resolve_base(base: str, ws: Workspace, params: Params) -> Path:
    """A local directory for model.base; an s3:// base is downloaded once into the state dir.

    The download goes to a temporary directory renamed into place when whole, so a download that was
    interrupted is fetched again rather than taken for the model."""
    if base.startswith("s3://"):
        dest = ws.state / "base-models" / hashlib.sha256(base.encode()).hexdigest()[:16]
        if not dest.is_dir():
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
            try:
                download_prefix(base, partial, params.storage, ws.state)
                os.replace(partial, dest)
            except OSError:
                if not dest.is_dir():  # another process may have renamed its whole copy in first
                    raise
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return dest
    path = Path(base).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"model.base: {base} is not a directory (give a local Hugging Face model dir or s3://bucket/prefix)"
        )
    return path.resolve()
