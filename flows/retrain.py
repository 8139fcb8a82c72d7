"""The retraining flow: thin Prefect wiring around the stages in pipeline/.

check-storage -> ingest -> validate -> preprocess -> train -> evaluate -> gate -> package -> push -> publish

The DVC stages run through `dvc repro <stage>`, one Prefect task each, so DVC owns the DAG and its
caching, and the UI shows every stage with its logs. The flow adds new data, retries where a retry can
help, artifacts (validation, metrics, loss curve, gate decision, Bento, lineage), and promotes only
after the model it names is safely in the remote. Unchanged data and params end in "no change".

The run's final state names its outcome (Completed, named "Promoted", "Rejected" or "No change"), and
its tags name the data md5, the params hash and the profile, so the UI's runs list tells runs apart.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.states import Completed, State

from flows import artifacts
from pipeline.config import Params, Workspace, load_params
from pipeline.storage import TransientStorageError
from pipeline.versioning import (
    CommandError,
    dvc,
    remote_object_url,
    stage_out_md5,
    stale_stages,
    workspace_lock,
)

DVC_STAGES = ["validate", "preprocess", "train", "evaluate", "gate"]


def retry_on(*errors: type[BaseException]):
    """A Prefect retry condition: retry only failures a retry can fix (network, remote), never bad data."""

    def should_retry(task, task_run, state) -> bool:
        return isinstance(state.result(raise_on_failure=False), errors)

    return should_retry


def _log_line(line: str) -> None:
    if line.strip():
        get_run_logger().info(line)


@task(
    name="check-storage",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_on(TransientStorageError),
)
def storage_check_task(params: Params, ws: Workspace) -> None:
    from pipeline.storage import check_storage

    check_storage(params.storage, ws.state)


@task(
    name="ingest",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_on(TransientStorageError, OSError),
)
def ingest_task(source: str, ws: Workspace, params: Params) -> str:
    from pipeline.ingest import ingest

    md5 = ingest(source, ws, params, on_line=_log_line)
    get_run_logger().info(f"dataset md5 {md5}")
    return md5


@task
def stage_task(stage: str, ws: Workspace, up_to_date: bool) -> None:
    """One DVC stage; DVC skips it when its deps, params and outs are unchanged."""
    if up_to_date:  # `dvc status` said so, and nothing upstream ran in this flow run
        get_run_logger().info(f"stage {stage} is up to date (dvc status): skipped")
        return
    dvc(["repro", stage], ws.root, on_line=_log_line)


# Training retries once: the retry resumes from the last checkpoint (a persist: true out).
STAGE_TASKS = {
    stage: stage_task.with_options(name=stage, retries=1 if stage == "train" else 0, retry_delay_seconds=5)
    for stage in DVC_STAGES
}


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


@task(
    name="publish",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_on(TransientStorageError),  # a lost race (ConflictError) is final
)
def publish_task(ws: Workspace, params: Params, data_md5: str, bento: dict) -> dict:
    """Export the Bento to S3, then make it the champion."""
    from pipeline.package import publish
    from pipeline.registry import champion_record, promote

    decision = json.loads(ws.gate_file.read_text())
    bento = bento | {"bento_url": publish(ws, params, bento["bento_tag"])}
    model_md5 = stage_out_md5(ws.root, "train", "artifacts/model")
    record = champion_record(ws, params, decision["challenger"], model_md5, data_md5, bento)
    record["flow_run_id"] = str(flow_run.id) if flow_run.id else None
    record["params"] = params.model_dump(
        include={"profile", "preprocess", "model", "train", "evaluate", "gate"}
    )
    record = promote(record, params.storage, ws.state, judged_against=decision["champion"])
    get_run_logger().info(f"promoted: Bento {bento['bento_tag']} at {bento['bento_url']}")
    return record


def unchanged_champion(ws: Workspace, params: Params, data_md5: str) -> dict | None:
    """The champion, when this run produced exactly its model from exactly its data: nothing to ship."""
    from pipeline.registry import read_champion

    champion = read_champion(params.storage, ws.state)
    model_md5 = stage_out_md5(ws.root, "train", "artifacts/model")
    if champion and champion.get("model_md5") == model_md5 and champion.get("data_md5") == data_md5:
        return champion
    return None


def tag_run(params: Params, data_md5: str) -> None:
    """Tags on this flow run that say what it trained on: searchable in the UI's runs list."""
    from prefect.client.orchestration import get_client

    from pipeline.package import params_hash

    if not flow_run.id:
        return
    tags = [
        f"data:{data_md5.removesuffix('.dir')[:12]}",
        f"params:{params_hash(params)}",
        f"profile:{params.profile}",
    ]
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *tags}))


def outcome(result: dict) -> State:
    """The final state: Completed, named for what happened to the challenger."""
    name = "No change" if result["no_change"] else "Promoted" if result["promoted"] else "Rejected"
    return Completed(name=name, message=f"{name}: " + "; ".join(result["reasons"]), data=result)


@flow(name="lmforge-retrain", log_prints=True)
def retrain(source: str | None = None, root: str | None = None) -> State:
    """Returns the outcome state; calling the flow gives its data, the run summary (a dict)."""
    ws = Workspace(Path(root)) if root else Workspace.find()
    params = load_params(ws.root)
    logger = get_run_logger()
    with workspace_lock(ws.state, on_wait=logger.info):  # one run per workspace at a time
        storage_check_task(params, ws)
        md5 = ingest_task(source or params.ingest.source, ws, params)
        tag_run(params, md5)
        # One `dvc status` up front: stages before the first stale one are skipped without a `dvc repro`
        # each; from the first stale stage on, every stage goes through `dvc repro`, which decides.
        stale = stale_stages(ws.root) - {"gate"}  # the gate is always_changed
        first_stale = next((i for i, s in enumerate(DVC_STAGES) if s in stale), len(DVC_STAGES))
        if first_stale == len(DVC_STAGES) and (champion := unchanged_champion(ws, params, md5)):
            logger.info(f"no change: same data and model as the champion {champion.get('bento_tag')}")
            return outcome(summary(ws, params, md5, {"promote": True, "reasons": ["no change"], "challenger":
                           champion["metrics"]}, record=None, no_change=True))  # fmt: skip
        for i, stage in enumerate(DVC_STAGES):
            STAGE_TASKS[stage](stage, ws, up_to_date=i < first_stale and stage != "gate")
            if stage == "validate":
                artifacts.validation(ws)
            elif stage == "evaluate":
                artifacts.metrics(ws)
                artifacts.loss_curve(ws)
        decision = json.loads(ws.gate_file.read_text())
        artifacts.gate(decision)
        artifacts.comparison(ws, decision)
        for reason in decision["reasons"]:
            logger.info(reason)

        record, no_change = None, False
        if decision["promote"] and (champion := unchanged_champion(ws, params, md5)):
            no_change = (
                True  # retrained to the very same model (deterministic), e.g. after a code-only change
            )
            logger.info(f"no change: same data and model as the champion {champion.get('bento_tag')}")
        elif decision["promote"]:
            bento = package_task(ws, params, md5)  # only a model that passed the gate is packaged
            push_task(
                ws, params
            )  # data, checkpoints and model reach the remote before anything points at them
            record = publish_task(ws, params, md5, bento)
            artifacts.bento(record)
            artifacts.lineage(record)
        else:
            logger.info("gate rejected the challenger: nothing packaged, the champion stays as it is")
            push_task(ws, params)

    return outcome(summary(ws, params, md5, decision, record, no_change))


def summary(
    ws: Workspace, params: Params, md5: str, decision: dict, record: dict | None, no_change: bool
) -> dict:
    manifest = json.loads((ws.shards_dir / "manifest.json").read_text())
    report = ws.validation_dir / "report.json"
    stats = json.loads(report.read_text())["stats"] if report.is_file() else {}
    record = record or {}
    return {
        "documents": {key: stats.get(key) for key in ("documents", "kept_documents", "dropped_by_reason")},
        "contamination": manifest.get("contamination"),
        "data_md5": md5,
        "data_url": remote_object_url(params.storage.dvc_remote_url, md5),
        "tokens": {split: info["tokens"] for split, info in manifest["splits"].items()},
        "vocab_size": manifest["vocab_size"],
        "metrics": decision["challenger"],
        "promoted": decision["promote"] and not no_change,
        "no_change": no_change,
        "reasons": decision["reasons"],
        "model_url": record.get("model_url"),
        "bento_tag": record.get("bento_tag"),
        "bento_url": record.get("bento_url"),
    }
