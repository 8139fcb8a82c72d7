"""The champion record in S3: which model is current, with its metrics and lineage.

s3://<bucket>/<registry_prefix>/champion.json is the current champion; every promotion is also kept
under history/, which is what a rollback goes back to. The pointer is only ever changed by a
conditional write (If-Match on the ETag that was read), so two racing writers cannot both win.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

from infra.s3 import ConflictError, StorageError, get_json, get_json_versioned, list_keys, put_json
from lmforge.config import Params, StorageConfig, model_shaping_params
from lmforge.runs.contracts import ChampionRecord, ValidationReport, read_curve, record_name
from lmforge.workspace import Workspace


def champion_key(cfg: StorageConfig) -> str:
    return f"{cfg.registry_prefix.strip('/')}/champion.json"


def history_prefix(cfg: StorageConfig) -> str:
    return f"{cfg.registry_prefix.strip('/')}/history/"


def _record(data: dict | None, cfg: StorageConfig, key: str) -> ChampionRecord | None:
    return None if data is None else ChampionRecord.parse(data, f"s3://{cfg.bucket}/{key}")


def read_champion(cfg: StorageConfig, state: Path) -> ChampionRecord | None:
    return _record(get_json(cfg, state, champion_key(cfg)), cfg, champion_key(cfg))


def read_champion_versioned(cfg: StorageConfig, state: Path) -> tuple[ChampionRecord | None, str | None]:
    """The champion and the ETag it was read at, for a conditional write."""
    data, etag = get_json_versioned(cfg, state, champion_key(cfg))
    return _record(data, cfg, champion_key(cfg)), etag


def read_history(cfg: StorageConfig, state: Path) -> list[ChampionRecord]:
    """Every promotion ever made, oldest first (the keys start with the promotion time)."""
    keys = list_keys(cfg, state, history_prefix(cfg))
    return [record for key in keys if (record := _record(get_json(cfg, state, key), cfg, key))]


def rollback(cfg: StorageConfig, state: Path) -> ChampionRecord:
    """Make the champion before the current one current again; returns the new champion record.

    "Before" is by promotion time, so rolling back twice goes back two promotions.
    """
    current, etag = read_champion_versioned(cfg, state)
    if current is None:
        raise StorageError("no champion to roll back from")
    older = [
        r for r in read_history(cfg, state)
        if r.promoted_at < current.promoted_at and r.bento_tag != current.bento_tag
    ]  # fmt: skip
    if not older:
        raise StorageError(f"no earlier champion than {record_name(current)}")
    record = older[-1].model_copy(update={
        "rolled_back_from": record_name(current),
        "rolled_back_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })  # fmt: skip
    put_json(cfg, state, champion_key(cfg), record.to_dict(), if_match=etag)
    return record


def champion_model_dir(record: ChampionRecord, params: Params, ws: Workspace) -> Path:
    """The champion's model, pulled from the DVC remote by the md5 in its record (kept in the state dir
    while it is the champion)."""
    import shutil

    from infra.dvc import pull_directory

    models = ws.state / "champion-models"
    name = record.model_md5.removesuffix(".dir")
    for old in models.glob("*") if models.is_dir() else []:
        if old.name != name and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return pull_directory(record.model_md5, models / name, params.storage, ws.state)


def git_sha(root: Path) -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def promote(
    record: ChampionRecord, cfg: StorageConfig, state: Path, judged_against: ChampionRecord | None
) -> ChampionRecord:
    """Make record the champion, only if the champion is still the one the gate judged it against.

    The check and the write are one step: the write is conditional on the ETag read here (or on there
    being no champion yet), so of two racing promotions exactly one wins and the other gets a
    ConflictError. The history entry is written after the pointer, so a lost race leaves none.
    """
    current, etag = read_champion_versioned(cfg, state)
    if current != judged_against:
        raise ConflictError(
            f"the champion changed since the gate judged this model (it is now {record_name(current)}, "
            f"the gate compared against {record_name(judged_against)}); run again to gate against it"
        )
    record = record.model_copy(update={"promoted_at": datetime.now(UTC).isoformat(timespec="milliseconds")})
    put_json(cfg, state, champion_key(cfg), record.to_dict(), if_match=etag, if_absent=etag is None)
    stamp = record.promoted_at.replace(":", "").replace("-", "")
    put_json(cfg, state, f"{history_prefix(cfg)}{stamp}-{record.model_md5[:12]}.json", record.to_dict())
    return record


def loss_curve_points(ws: Workspace, most: int = 400) -> list[dict]:
    """The evaluate stage's loss-curve points, thinned to at most `most` train points (every val point kept)."""
    points = read_curve(ws.eval_dir)
    every = max(1, -(-len(points) // most))
    return [p for i, p in enumerate(points) if i % every == 0 or "val_loss" in p or i == len(points) - 1]


def champion_record(
    ws: Workspace,
    params: Params,
    metrics: dict,
    model_md5: str,
    data_md5: str | None,
    bento: dict | None = None,
) -> ChampionRecord:
    """What a champion record says: where the model and its Bento are, how good it is, where it came from."""
    from infra.dvc import remote_object_url

    report = ValidationReport.read(ws.validation_dir)
    record = ChampionRecord(
        model_md5=model_md5,
        model_url=remote_object_url(params.storage.dvc_remote_url, model_md5),
        metrics=metrics,
        data_md5=data_md5,
        data_stats=report.stats if report else None,
        git_sha=git_sha(ws.root),
        profile=params.profile,
        loss_curve=loss_curve_points(ws),
        params=model_shaping_params(params),
    )
    if bento:
        record.bento_tag, record.bento_url, record.lineage = (
            bento["bento_tag"],
            bento.get("bento_url"),
            bento["labels"],
        )
    return record
