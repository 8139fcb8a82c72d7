"""Model: build a causal LM from config, or resolve a base model (local dir or s3://) to fine-tune from."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.config import ConfigError, Params, Workspace


def resolve_base(base: str, ws: Workspace, params: Params) -> Path:
    """A local directory for model.base; an s3:// base is downloaded once into the state dir."""
    if base.startswith("s3://"):
        from pipeline.storage import download_prefix

        dest = ws.state / "base-models" / hashlib.sha256(base.encode()).hexdigest()[:16]
        if not (dest / "config.json").is_file() and not (dest / "tokenizer_config.json").is_file():
            download_prefix(base, dest, params.storage, ws.state)
        return dest
    path = Path(base).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"model.base: {base} is not a directory (give a local Hugging Face model dir or s3://bucket/prefix)"
        )
    return path.resolve()
