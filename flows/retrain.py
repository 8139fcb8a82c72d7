"""The retraining flow: thin Prefect wiring around the stages in pipeline/.

check-storage -> ingest -> base -> validate -> preprocess -> train -> evaluate -> gate -> package -> push -> publish

The DVC stages run through `dvc repro <stage>`, one Prefect task each, so DVC owns the DAG and its
caching, and the UI shows every stage with its logs. The flow adds new data, retries where a retry can
help, artifacts (validation, metrics, loss curve, gate decision, Bento, lineage), and promotes only
after the model it names is safely in the remote. Unchanged data and params end in "no change".

The run's final state names its outcome (Completed, named "Promoted", "Rejected" or "No change"), and
its tags name the data md5, the params hash and the profile, so the UI's runs list tells runs apart.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.states import Completed, State

from flows import artifacts
from infra.dvc import dvc, workspace_lock
from infra.processes import CommandError
from infra.s3 import TransientStorageError
from lmforge.config import Params, params_hash
from lmforge.params_file import load_params
from lmforge.runs import plan
from lmforge.runs.contracts import Decision, RunSummary
from lmforge.workspace import Workspace


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
    from infra.s3 import check_storage

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
    for stage in (plan.PIN_STAGE, *plan.DVC_STAGES)
}


@task(name="push", retries=3, retry_delay_seconds=[2, 8, 30], retry_condition_fn=retry_on(CommandError))
def push_task(ws: Workspace, params: Params) -> None:
    from infra.dvc import configure_dvc_remote

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
def publish_task(ws: Workspace, params: Params, data_md5: str, bento: dict, decision: Decision):
    """Export the Bento to S3, then make it the champion."""
    from lmforge.runs.registry import promote
    from pipeline.package import publish

    bento = bento | {"bento_url": publish(ws, params, bento["bento_tag"])}
    record = plan.new_champion(
        ws, params, decision, data_md5, bento, str(flow_run.id) if flow_run.id else None
    )
    record = promote(record, params.storage, ws.state, judged_against=decision.champion)
    get_run_logger().info(f"promoted: Bento {record.bento_tag} at {record.bento_url}")
    return record


def tag_run(params: Params, data_md5: str) -> None:
    """Tags on this flow run that say what it trained on: searchable in the UI's runs list."""
    from prefect.client.orchestration import get_client

    if not flow_run.id:
        return
    tags = [
        f"data:{data_md5.removesuffix('.dir')[:12]}",
        f"params:{params_hash(params)}",
        f"profile:{params.profile}",
    ]
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *tags}))


def final_state(summary: RunSummary) -> State:
    """The final state: Completed, named for what happened to the challenger."""
    return Completed(
        name=summary.outcome, message=f"{summary.outcome}: " + "; ".join(summary.reasons), data=summary
    )


@flow(name="lmforge-retrain", log_prints=True)
def retrain(source: str | None = None, root: str | None = None) -> State:
    """Returns the outcome state; calling the flow gives its data, the RunSummary."""
    from lmforge.runs.registry import read_champion

    ws = Workspace(Path(root)) if root else Workspace.find()
    params = load_params(ws.root)
    logger = get_run_logger()
    with workspace_lock(ws.state, on_wait=logger.info):  # one run per workspace at a time
        storage_check_task(params, ws)
        md5 = ingest_task(source or params.ingest.source, ws, params)
        tag_run(params, md5)
        STAGE_TASKS[plan.PIN_STAGE](plan.PIN_STAGE, ws, up_to_date=False)  # before the plan: see plan.PIN_STAGE
        stages = plan.plan_stages(ws.root)
        champion = read_champion(params.storage, ws.state)
        if stages.nothing_stale and (same := plan.unchanged_champion(ws, champion, md5)):
            logger.info(f"no change: same data and model as the champion {same.bento_tag}")
            return final_state(
                plan.summarize(ws, params, md5, plan.no_change_decision(same), None, no_change=True)
            )
        for stage in plan.DVC_STAGES:
            STAGE_TASKS[stage](stage, ws, up_to_date=stages.up_to_date(stage))
            if stage == "validate":
                artifacts.validation(ws)
            elif stage == "evaluate":
                artifacts.metrics(ws)
                artifacts.loss_curve(ws)
        decision = Decision.load(ws.gate_file)
        artifacts.gate(decision)
        artifacts.comparison(ws, decision)
        for reason in decision.reasons:
            logger.info(reason)

        record, no_change = None, False
        if decision.promote and (same := plan.unchanged_champion(ws, decision.champion, md5)):
            no_change = (
                True  # retrained to the very same model (deterministic), e.g. after a code-only change
            )
            logger.info(f"no change: same data and model as the champion {same.bento_tag}")
        elif decision.promote:
            bento = package_task(ws, params, md5)  # only a model that passed the gate is packaged
            push_task(
                ws, params
            )  # data, checkpoints and model reach the remote before anything points at them
            record = publish_task(ws, params, md5, bento, decision)
            artifacts.bento(record)
            artifacts.lineage(record)
        else:
            logger.info("gate rejected the challenger: nothing packaged, the champion stays as it is")
            push_task(ws, params)

    return final_state(plan.summarize(ws, params, md5, decision, record, no_change))
