"""The retraining run's plan and decisions, without Prefect: which stages to run, whether anything
changed, what the champion record says, and what the run ends with. flows/retrain.py wraps each step
as a Prefect task; unit tests call them directly.

  check storage -> ingest -> base -> validate -> preprocess -> train -> evaluate -> gate
    -> (promote) package -> push -> publish     (reject) push     (no change) nothing
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infra.dvc import remote_object_url, stage_out_md5, stale_stages
from lmforge.config import Params
from lmforge.runs.contracts import ChampionRecord, Decision, Manifest, RunSummary, ValidationReport
from lmforge.workspace import Workspace

# Runs first, every time, before the plan is made: it pins model.base (the champion's md5, a Hub commit:
# outside DVC's view, always_changed in dvc.yaml), so `dvc status` after it sees whether the base changed.
PIN_STAGE = "base"
DVC_STAGES = ("validate", "preprocess", "train", "evaluate", "gate")
ALWAYS_RUNS = "gate"  # always_changed in dvc.yaml: the champion it judges against lives in S3


@dataclass(frozen=True)
class StagePlan:
    """What `dvc status` said before the run: stages before the first stale one are skipped without a
    `dvc repro` each; from the first stale stage on, every stage goes through `dvc repro`, which decides."""

    first_stale: int  # index into DVC_STAGES; len(DVC_STAGES) when nothing but the gate would run

    @property
    def nothing_stale(self) -> bool:
        return self.first_stale == len(DVC_STAGES)

    def up_to_date(self, stage: str) -> bool:
        return DVC_STAGES.index(stage) < self.first_stale and stage != ALWAYS_RUNS


def plan_stages(root: Path) -> StagePlan:
    stale = stale_stages(root) - {ALWAYS_RUNS, PIN_STAGE}
    return StagePlan(next((i for i, s in enumerate(DVC_STAGES) if s in stale), len(DVC_STAGES)))


def trained_model_md5(ws: Workspace) -> str:
    return stage_out_md5(ws.root, "train", "artifacts/model")


def unchanged_champion(
    ws: Workspace, champion: ChampionRecord | None, data_md5: str
) -> ChampionRecord | None:
    """The champion, when this run produced exactly its model from exactly its data: nothing to ship."""
    if champion and champion.model_md5 == trained_model_md5(ws) and champion.data_md5 == data_md5:
        return champion
    return None


def new_champion(
    ws: Workspace, params: Params, decision: Decision, data_md5: str, bento: dict, flow_run_id: str | None
) -> ChampionRecord:
    """The record publish makes current: the gated model, its Bento in S3, its lineage."""
    from lmforge.runs.registry import champion_record

    record = champion_record(ws, params, decision.challenger, trained_model_md5(ws), data_md5, bento)
    record.flow_run_id = flow_run_id
    return record


def outcome(decision: Decision, no_change: bool) -> str:
    return "No change" if no_change else "Promoted" if decision.promote else "Rejected"


def summarize(
    ws: Workspace, params: Params, data_md5: str, decision: Decision, record: ChampionRecord | None,
    no_change: bool,
) -> RunSummary:  # fmt: skip
    manifest = Manifest.read(ws.shards_dir)
    report = ValidationReport.read(ws.validation_dir)
    stats = report.stats if report else {}
    return RunSummary(
        outcome=outcome(decision, no_change),
        data_md5=data_md5,
        data_url=remote_object_url(params.storage.dvc_remote_url, data_md5),
        documents={key: stats.get(key) for key in ("documents", "kept_documents", "dropped_by_reason")},
        tokens=manifest.tokens(),
        vocab_size=manifest.vocab_size,
        contamination=manifest.contamination,
        metrics=decision.challenger,
        reasons=decision.reasons,
        head_to_head=decision.head_to_head,
        model_url=record.model_url if record else None,
        bento_tag=record.bento_tag if record else None,
        bento_url=record.bento_url if record else None,
    )


def no_change_decision(champion: ChampionRecord) -> Decision:
    """What the gate would have said of the champion's own model, had it run."""
    return Decision(promote=True, reasons=["no change"], challenger=champion.metrics, champion=champion)
