"""The run's plan and decisions (lmforge/runs/plan.py), called directly: no Prefect, no DVC process."""

from __future__ import annotations

import yaml

from lmforge.config import Params
from lmforge.runs import plan
from lmforge.runs.contracts import ChampionRecord, Decision, Manifest, ValidationReport
from lmforge.workspace import Workspace

MODEL_MD5 = "ab" * 16 + ".dir"
DATA_MD5 = "cd" * 16 + ".dir"


def workspace(tmp_path) -> Workspace:
    ws = Workspace(tmp_path)
    lock = {"stages": {"train": {"outs": [{"path": "artifacts/model", "md5": MODEL_MD5}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    ws.shards_dir.mkdir(parents=True)
    Manifest(
        dtype="uint16", vocab_size=300, eos_token_id=0, tokenizer="trained", total_tokens=60,
        encode_seconds=0.1, tokens_per_second=600, contamination={"ngram": 13, "val": 0.01, "test": 0.0},
        splits={s: {"documents": 2, "tokens": 20, "shards": [{"file": f"{s}_000.bin", "tokens": 20}]}
                for s in ("train", "val", "test")},
    ).write(ws.shards_dir)  # fmt: skip
    report = ValidationReport(corpus="data/", success=True, stats={"documents": 9, "kept_documents": 6,
                              "dropped_by_reason": {"too_short": 3}})  # fmt: skip
    report.save(ws.validation_dir / report.FILE)
    return ws


def champion(model_md5: str = MODEL_MD5, data_md5: str = DATA_MD5) -> ChampionRecord:
    return ChampionRecord(model_md5=model_md5, data_md5=data_md5, metrics={"val_perplexity": 9.0},
                          bento_tag="lmforge:old", model_url="s3://b/dvc/files/md5/ab/x")  # fmt: skip


def test_stage_plan_skips_only_the_stages_before_the_first_stale_one():
    stages = plan.StagePlan(first_stale=2)  # train is the first stale stage
    assert [s for s in plan.DVC_STAGES if stages.up_to_date(s)] == ["validate", "preprocess"]
    assert not stages.nothing_stale
    fresh = plan.StagePlan(first_stale=len(plan.DVC_STAGES))
    assert fresh.nothing_stale and not fresh.up_to_date("gate")  # the gate always judges afresh


def test_unchanged_champion_needs_the_same_model_and_the_same_data(tmp_path):
    ws = workspace(tmp_path)
    same = champion()
    assert plan.unchanged_champion(ws, same, DATA_MD5) is same
    assert plan.unchanged_champion(ws, same, "ee" * 16 + ".dir") is None  # new data, same weights
    assert plan.unchanged_champion(ws, champion(model_md5="ff" * 16 + ".dir"), DATA_MD5) is None
    assert plan.unchanged_champion(ws, None, DATA_MD5) is None


def test_summary_names_the_outcome_and_carries_the_run(tmp_path):
    ws, params = workspace(tmp_path), Params()
    passed = Decision(promote=True, reasons=["pass: x"], challenger={"val_perplexity": 8.0}, champion=None)
    failed = passed.model_copy(update={"promote": False, "reasons": ["FAIL: x"]})
    record = champion().model_copy(update={"bento_tag": "lmforge:new", "bento_url": "s3://b/bentos/new"})

    promoted = plan.summarize(ws, params, DATA_MD5, passed, record, no_change=False)
    assert (promoted.outcome, promoted.promoted, promoted.bento_tag) == ("Promoted", True, "lmforge:new")
    assert promoted.tokens == {"train": 20, "val": 20, "test": 20} and promoted.vocab_size == 300
    assert promoted.documents == {"documents": 9, "kept_documents": 6, "dropped_by_reason": {"too_short": 3}}
    assert promoted.data_url == f"s3://lmforge/dvc/files/md5/cd/{'cd' * 15}.dir"

    rejected = plan.summarize(ws, params, DATA_MD5, failed, None, no_change=False)
    assert (rejected.outcome, rejected.promoted, rejected.bento_tag) == ("Rejected", False, None)
    unchanged = plan.summarize(
        ws, params, DATA_MD5, plan.no_change_decision(champion()), None, no_change=True
    )
    assert (unchanged.outcome, unchanged.no_change, unchanged.metrics) == (
        "No change",
        True,
        {"val_perplexity": 9.0},
    )
