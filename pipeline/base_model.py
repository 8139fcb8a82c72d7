"""Where model.base lives on this machine: a local Hugging Face directory, an s3:// prefix downloaded once
into the state dir, a Hugging Face Hub id (org/name, optionally @revision) downloaded once into the
state dir's Hub cache, or `champion`: the model in service, pulled from the DVC remote by its md5.
Torch-free: preprocess needs only the base's tokenizer.

`python -m pipeline.base_model` is the `base` stage: it pins what model.base is right now (the champion's
md5, the Hub commit a branch points at, a local directory's files) in artifacts/base.json. Those live
outside DVC's view, so the stage runs every time (always_changed), and the stages that read the base
depend on the pin: they run again exactly when the base changed, and read the base the pin names even
if the champion moves on during the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from infra.s3 import download_prefix
from lmforge.config import ConfigError, Params
from lmforge.workspace import Workspace

CHAMPION = "champion"  # model.base: the current champion's model


def resolve_base(base: str, ws: Workspace, params: Params) -> Path:
    """A local directory for model.base; an s3:// base is downloaded once into the state dir.

    The download goes to a temporary directory renamed into place when whole, so a download that was
    interrupted is fetched again rather than taken for the model."""
    if base == CHAMPION:
        from infra.dvc import pull_directory

        md5 = pinned_champion(ws)
        return pull_directory(md5, ws.state / "base-models" / md5.removesuffix(".dir"), params.storage, ws.state)
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
        f"model.base: {base} is not a directory, an s3://bucket/prefix, a Hugging Face Hub id (org/name[@revision]) "
        "or champion"
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


# ---------------------------------------------------------------------------------------------
# the base stage


def base_version(base: str | None, ws: Workspace, params: Params) -> str | None:
    """What identifies the base's weights now: the champion's model md5, the Hub commit, a local directory's
    file names, sizes and times, or the s3:// prefix (downloaded once, so fixed)."""
    if not base or base.startswith("s3://"):
        return base
    if base == CHAMPION:
        from lmforge.runs.registry import read_champion

        record = read_champion(params.storage, ws.state)
        if record is None:
            raise ConfigError(
                f"model.base: champion, but s3://{params.storage.bucket}/{params.storage.registry_prefix} has no "
                "champion yet: promote a model first (a run without model.base), or name a base"
            )
        return record.model_md5
    path = Path(base).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = "\n".join(f"{p.relative_to(path)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
        return hashlib.sha256(listing.encode()).hexdigest()[:16]
    return resolve_base(base, ws, params).name  # a Hub snapshot is named for its commit


def pin_base(ws: Workspace, params: Params) -> dict:
    """Write artifacts/base.json, only when what it says changed (DVC compares the file's hash)."""
    from lmforge.runs.contracts import write_json

    pin = {"base": params.model.base, "version": base_version(params.model.base, ws, params)}
    if not ws.base_pin.is_file() or json.loads(ws.base_pin.read_text()) != pin:
        write_json(ws.base_pin, pin)
    return pin


def pinned_champion(ws: Workspace) -> str:
    """The champion md5 the base stage pinned for this run."""
    try:
        pin = json.loads(ws.base_pin.read_text())
    except (OSError, ValueError):
        pin = {}
    if pin.get("base") != CHAMPION or not pin.get("version"):
        raise ConfigError(
            f"model.base: champion is read from {ws.base_pin}, which the base stage writes: run `dvc repro base` "
            "(lmforge run and dvc repro run it first)"
        )
    return pin["version"]


def run() -> None:
    from lmforge.params_file import load_params

    ws = Workspace.find()
    pin = pin_base(ws, load_params(ws.root))
    print(f"base: {pin['base'] or 'none, a model from scratch'} (version {pin['version']})")


def main() -> int:
    from pipeline.stage import run_stage

    return run_stage("base", run)


if __name__ == "__main__":
    raise SystemExit(main())
