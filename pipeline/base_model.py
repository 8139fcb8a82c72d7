"""Where model.base lives on this machine: a local Hugging Face directory, an s3:// prefix downloaded once
into the state dir, or a Hugging Face Hub id (org/name, optionally @revision) downloaded once into the
state dir's Hub cache. Torch-free: preprocess needs only the base's tokenizer."""

from __future__ import annotations

import hashlib
import os
import re
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
    if path.is_dir():
        return path.resolve()
    if HUB_ID.match(base):
        return hub_snapshot(base, ws.state / "hub")
    raise ConfigError(
        f"model.base: {base} is not a directory, an s3://bucket/prefix or a Hugging Face Hub id (org/name[@revision])"
    )


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
# what a causal LM needs to load and to tokenize; never pickled weights
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def hub_snapshot(base: str, cache: Path) -> Path:
    """The Hub model's files at its revision (a commit, a tag or a branch; default main), fetched once with
    huggingface_hub into cache. The directory's name is the commit it resolved to, which the lineage
    records. With HF_HUB_OFFLINE=1 only a copy already in cache is used."""
    from huggingface_hub import snapshot_download

    repo, _, revision = base.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth, network: each says why
        raise ConfigError(
            f"model.base: {base} could not be fetched from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"With no network (or HF_HUB_OFFLINE=1) only a copy already in {cache} is used: download it where "
            "there is one, or give a local directory or an s3:// prefix"
        ) from None
