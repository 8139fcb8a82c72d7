"""The retraining flow: thin Prefect wiring around the stages in pipeline/.

ingest -> dvc repro (validate -> preprocess -> train -> evaluate -> gate) -> package -> push -> publish.
DVC owns the DAG and its caching; the flow adds new data, retries on the network-bound steps, logs to
the Prefect UI, and promotes only after the model it names is safely in the remote.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task

from pipeline.config import Params, Workspace, load_params
from pipeline.storage import StorageError
from pipeline.versioning import CommandError, dvc, remote_object_url, stage_out_md5

DVC_STAGES = ["validate", "preprocess", "train", "evaluate", "gate"]


def retry_on(*errors: type[BaseException]):
    """A Prefect retry condition: retry only failures a retry can fix (network, remote), never bad data."""

    def should_retry(task, task_run, state) -> bool:
        return isinstance(state.result(raise_on_failure=False), errors)

    return should_retry


def _log_line(line: str) -> None:
    if line.strip():
        get_run_logger().info(line)


@task(name="check-storage")
def storage_check_task(params: Params, ws: Workspace) -> None:
    from pipeline.storage import check_storage

    check_storage(params.storage, ws.state)


@task(
    name="ingest", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on(StorageError, OSError)
)
def ingest_task(source: str, ws: Workspace, params: Params) -> str:
    from pipeline.ingest import ingest

    md5 = ingest(source, ws, params, on_line=_log_line)
    get_run_logger().info(f"dataset md5 {md5}")
    return md5


@task(name="dvc-repro")
def repro_task(stages: list[str], ws: Workspace) -> None:
    dvc(["repro", *stages], ws.root, on_line=_log_line)


@task(name="push", retries=3, retry_delay_seconds=[2, 8, 30], retry_condition_fn=retry_on(CommandError))
def push_task(ws: Workspace, params: Params) -> None:
    from pipeline.storage import configure_dvc_remote

    configure_dvc_remote(ws.root, params.storage, ws.state)
    dvc(["push"], ws.root, on_line=_log_line)


@task(name="package")
def package_task(ws: Workspace, params: Params, data_md5: str) -> dict:
    """The gated model into the BentoML store, and its Bento built."""
    from pipeline.package import package

    bento = package(ws, params, data_md5)
    get_run_logger().info(f"built Bento {bento['bento_tag']} (Dockerfile: {bento['dockerfile']})")
    return bento


@task(name="publish", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on(StorageError))
def publish_task(ws: Workspace, params: Params, data_md5: str, bento: dict | None) -> dict:
    """Export the Bento to S3, then make it the champion; a rejected challenger changes nothing."""
    from pipeline.package import publish
    from pipeline.registry import champion_record, promote

    decision = json.loads(ws.gate_file.read_text())
    logger = get_run_logger()
    for reason in decision["reasons"]:
        logger.info(reason)
    if bento is None:
        logger.info("gate rejected the challenger: nothing packaged, the champion stays as it is")
        return decision
    bento = bento | {"bento_url": publish(ws, params, bento["bento_tag"])}
    model_md5 = stage_out_md5(ws.root, "train", "artifacts/model")
    record = champion_record(ws, params, decision["challenger"], model_md5, data_md5, bento)
    decision["record"] = promote(record, params.storage, ws.state)
    logger.info(f"promoted: Bento {bento['bento_tag']} at {bento['bento_url']}")
    return decision


@flow(name="lmforge-retrain", log_prints=True)
def retrain(source: str | None = None, root: str | None = None) -> dict:
    ws = Workspace(Path(root)) if root else Workspace.find()
    params = load_params(ws.root)
    storage_check_task(params, ws)
    md5 = ingest_task(source or params.ingest.source, ws, params)
    repro_task(DVC_STAGES, ws)
    passed = json.loads(ws.gate_file.read_text())["promote"]
    bento = package_task(ws, params, md5) if passed else None  # only a model that passed is packaged
    push_task(ws, params)  # data, checkpoints and model reach the remote before anything points at them
    decision = publish_task(ws, params, md5, bento)
    manifest = json.loads((ws.shards_dir / "manifest.json").read_text())
    record = decision.get("record", {})
    return {
        "data_md5": md5,
        "data_url": remote_object_url(params.storage.dvc_remote_url, md5),
        "tokens": {split: info["tokens"] for split, info in manifest["splits"].items()},
        "vocab_size": manifest["vocab_size"],
        "metrics": decision["challenger"],
        "promoted": decision["promote"],
        "reasons": decision["reasons"],
        "model_url": record.get("model_url"),
        "bento_tag": record.get("bento_tag"),
        "bento_url": record.get("bento_url"),
    }
