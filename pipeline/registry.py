"""The champion record in S3: which model is current, with its metrics and lineage.

s3://<bucket>/<registry_prefix>/champion.json is the current champion; every promotion is also kept
under history/, which is what a rollback goes back to.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

from pipeline.config import Params, StorageConfig, Workspace
from pipeline.storage import get_json, put_json


def champion_key(cfg: StorageConfig) -> str:
    return f"{cfg.registry_prefix.strip('/')}/champion.json"


def read_champion(cfg: StorageConfig, state: Path) -> dict | None:
    return get_json(cfg, state, champion_key(cfg))


def git_sha(root: Path) -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def promote(record: dict, cfg: StorageConfig, state: Path) -> dict:
    """Write the history entry first, then the champion pointer: a crash between them loses nothing."""
    record = record | {"promoted_at": datetime.now(UTC).isoformat(timespec="seconds")}
    stamp = record["promoted_at"].replace(":", "").replace("-", "")
    put_json(
        cfg,
        state,
        f"{cfg.registry_prefix.strip('/')}/history/{stamp}-{record['model_md5'][:12]}.json",
        record,
    )
    put_json(cfg, state, champion_key(cfg), record)
    return record


def champion_record(
    ws: Workspace, params: Params, metrics: dict, model_md5: str, data_md5: str | None
) -> dict:
    """What a champion record says: where the model is, how good it is, and where it came from."""
    from pipeline.versioning import remote_object_url

    return {
        "model_md5": model_md5,
        "model_url": remote_object_url(params.storage.dvc_remote_url, model_md5),
        "metrics": metrics,
        "data_md5": data_md5,
        "git_sha": git_sha(ws.root),
        "profile": params.profile,
    }
