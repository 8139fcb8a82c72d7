"""Evaluation (baseline math by hand, the real stage on a tiny model), the gate, and the champion registry."""

import json
import math

import numpy as np
import pytest
import torch

from pipeline.config import GateConfig
from pipeline.contracts import ChampionRecord, read_curve, record_name
from pipeline.evaluate import NGramBaseline, evaluate
from pipeline.gate import decide
from pipeline.registry import champion_record, promote, read_champion
from pipeline.train import train


def test_ngram_baselines_match_hand_computation():
    # train: 0 1 0 1 0 2 ; vocab 3 ; k = 1
    baseline = NGramBaseline([np.array([0, 1, 0, 1, 0, 2])], vocab_size=3, k=1.0)
    # unigram counts 3,2,1 of 6 -> p = (c+1)/(6+3)
    assert baseline.unigram_nll(np.array([0, 1, 2])) == pytest.approx(-np.log([4 / 9, 3 / 9, 2 / 9]))
    # bigram pairs: (0,1) x2, (1,0) x2, (0,2) x1; as predecessor 0 occurs 3 times, 1 twice, 2 never
    got = baseline.bigram_nll(np.array([0, 0, 1, 2]), np.array([1, 0, 0, 1]))
    assert got == pytest.approx(-np.log([(2 + 1) / (3 + 3), (0 + 1) / (3 + 3), (2 + 1) / (2 + 3), 1 / 3]))
    # window [0 1 0 2]: predicted targets 1, 0, 2 after 0, 1, 0
    ppl = baseline.perplexities(torch.tensor([[0, 1, 0, 2]]))
    assert ppl["unigram"] == pytest.approx(math.exp(-np.log([3 / 9, 4 / 9, 2 / 9]).mean()))
    assert ppl["bigram"] == pytest.approx(math.exp(-np.log([3 / 6, 3 / 5, 2 / 6]).mean()))


@pytest.mark.slow  # over 30 s on a loaded 2-core machine
def test_evaluate_stage_on_a_tiny_model(tiny_workspace):
    ws, params = tiny_workspace
    threads = torch.get_num_threads()
    try:
        train(params, ws)
        metrics = evaluate(params, ws)
    finally:
        torch.set_num_threads(threads)  # train and evaluate set this process's thread count for themselves
    for split in ("val", "test"):
        assert metrics[f"{split}_perplexity"] == pytest.approx(math.exp(metrics[f"{split}_loss"]), rel=1e-3)
        assert 1 < metrics[f"{split}_perplexity"] < 300  # better than uniform over 300 tokens
        assert metrics[f"bigram_{split}_perplexity"] < metrics[f"unigram_{split}_perplexity"]
    assert metrics["eval_tokens_per_s"] > 0 and metrics["train_steps"] == 10
    manifest = json.loads((ws.shards_dir / "manifest.json").read_text())
    assert metrics["val_contamination"] == manifest["contamination"]["val"]
    assert metrics["test_contamination"] == manifest["contamination"]["test"]
    assert json.loads((ws.eval_dir / "metrics.json").read_text()) == metrics
    samples = json.loads((ws.eval_dir / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["the ", "a model"] and all(
        s["greedy"] and s["sampled"] for s in samples
    )
    assert (ws.eval_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_points = json.loads((ws.eval_dir / "loss_curve.json").read_text())
    val_points = json.loads((ws.eval_dir / "val_curve.json").read_text())
    assert [p["step"] for p in train_points] == list(range(1, 11)) and [p["step"] for p in val_points] == [
        5,
        10,
    ]
    assert all(set(p) == {"step", "train_loss"} for p in train_points)
    assert all(set(p) == {"step", "val_loss"} for p in val_points)
    assert [p["step"] for p in read_curve(ws.eval_dir) if "val_loss" in p] == [5, 10]


CLEAN = {"val_contamination": 0.001, "test_contamination": 0.002}
METRICS = {"val_perplexity": 20.0, "bigram_val_perplexity": 30.0, **CLEAN}
GATE = GateConfig(max_val_perplexity=100, min_gain_over_bigram=0.1, champion_tolerance=0.02)


@pytest.mark.parametrize(
    ("metrics", "champion", "promote", "failing"),
    [
        (METRICS, None, True, None),
        (
            {"val_perplexity": 120.0, "bigram_val_perplexity": 300.0, **CLEAN},
            None,
            False,
            "threshold 100.000",
        ),
        (
            {"val_perplexity": 28.0, "bigram_val_perplexity": 30.0, **CLEAN},
            None,
            False,
            "bigram 30.000 less 10%",
        ),
        (
            METRICS | {"test_contamination": 0.12},
            None,
            False,
            "contamination 12.00% of test n-grams seen in train > 5.00%: the perplexity was measured on leaked data",
        ),
        (METRICS | {"val_contamination": 0.05}, None, True, None),  # at the bound is allowed
        (
            {"val_perplexity": 20.0, "bigram_val_perplexity": 30.0},
            None,
            False,
            "contamination was not measured",
        ),
        (METRICS, {"metrics": {"val_perplexity": 19.8}}, True, None),  # worse, but within 2%
        (METRICS, {"metrics": {"val_perplexity": 18.0}}, False, "champion 18.000 plus 2% tolerance"),
        (METRICS, {"metrics": {"val_perplexity": 25.0}}, True, None),
    ],
)
def test_gate_decisions(metrics, champion, promote, failing):
    champion = ChampionRecord(model_md5="00" * 16, **champion) if champion else None
    decision = decide(metrics, champion, GATE)
    assert decision.promote is promote
    assert len(decision.reasons) == 4
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert (failed == []) if failing is None else (len(failed) == 1 and failing in failed[0])
    if champion is None:
        assert "no champion yet" in decision.reasons[-1]


def test_champion_record_in_s3(s3_server, tiny_workspace):
    ws, params = tiny_workspace
    cfg = s3_server.cfg.model_copy(update={"registry_prefix": "registry-test"})
    assert read_champion(cfg, s3_server.state) is None
    params = params.model_copy(update={"storage": cfg})
    record = champion_record(ws, params, METRICS, "ab" * 16 + ".dir", "cd" * 16 + ".dir")
    written = promote(record, cfg, s3_server.state, judged_against=None)
    assert read_champion(cfg, s3_server.state) == written
    assert written.model_url == f"s3://{cfg.bucket}/dvc/files/md5/ab/{'ab' * 15}.dir" and written.promoted_at
    # a challenger is judged against the record read back from S3: its perplexity (20) sets the bar
    decision = decide(
        {"val_perplexity": 50.0, "bigram_val_perplexity": 60.0, **CLEAN},
        read_champion(cfg, s3_server.state),
        GATE,
    )
    assert not decision.promote
    assert decision.reasons[-1] == "FAIL: val perplexity 50.000 > 20.400 (champion 20.000 plus 2% tolerance)"


def test_rollback_goes_back_one_promotion_at_a_time(s3_server, tiny_workspace):
    from infra.s3 import StorageError
    from pipeline.registry import read_history, rollback

    ws, params = tiny_workspace
    cfg = s3_server.cfg.model_copy(update={"registry_prefix": "registry-rollback"})
    params = params.model_copy(update={"storage": cfg})
    with pytest.raises(StorageError, match="no champion to roll back"):
        rollback(cfg, s3_server.state)
    for i, md5 in enumerate(("aa", "bb", "cc")):
        bento = {"bento_tag": f"lmforge:v{i}", "bento_url": f"s3://b/bentos/v{i}.bento", "labels": {}}
        record = champion_record(ws, params, METRICS, md5 * 16, None, bento)
        promote(record, cfg, s3_server.state, judged_against=read_champion(cfg, s3_server.state))
    assert [r.bento_tag for r in read_history(cfg, s3_server.state)] == [
        "lmforge:v0",
        "lmforge:v1",
        "lmforge:v2",
    ]
    back = rollback(cfg, s3_server.state)
    assert back.bento_tag == "lmforge:v1" and back.rolled_back_from == "lmforge:v2"
    assert read_champion(cfg, s3_server.state) == back
    assert rollback(cfg, s3_server.state).bento_tag == "lmforge:v0"
    with pytest.raises(StorageError, match="no earlier champion"):
        rollback(cfg, s3_server.state)
    assert read_champion(cfg, s3_server.state).bento_tag == "lmforge:v0"


def test_racing_promotions_cannot_both_win(s3_server, tiny_workspace):
    """Eight challengers gated against the same champion promote at once: exactly one wins, the others
    get a ConflictError, and the registry holds the winner alone (pointer and history)."""
    from concurrent.futures import ThreadPoolExecutor

    from infra.s3 import ConflictError
    from pipeline.registry import read_history

    ws, params = tiny_workspace
    cfg = s3_server.cfg.model_copy(update={"registry_prefix": "registry-race"})
    params = params.model_copy(update={"storage": cfg})
    first = promote(champion_record(ws, params, METRICS, "00" * 16, None), cfg, s3_server.state, None)
    for round_ in range(3):
        judged = read_champion(cfg, s3_server.state)
        records = [champion_record(ws, params, METRICS, f"{round_}{i}" * 16, None) for i in range(8)]

        def try_promote(
            record: ChampionRecord, judged: ChampionRecord = judged
        ) -> ChampionRecord | ConflictError:
            try:
                return promote(record, cfg, s3_server.state, judged_against=judged)
            except ConflictError as exc:
                return exc

        with ThreadPoolExecutor(len(records)) as pool:
            outcomes = list(pool.map(try_promote, records))
        winners = [o for o in outcomes if isinstance(o, ChampionRecord)]
        losers = [o for o in outcomes if isinstance(o, ConflictError)]
        assert len(winners) == 1 and len(losers) == 7, outcomes
        assert read_champion(cfg, s3_server.state) == winners[0]
        # A loser either read the pointer after the winner wrote it, and then must name the winner, or
        # read it before and lost the conditional write.
        winner = record_name(winners[0])
        for loser in losers:
            assert f"it is now {winner}," in str(loser) or "another writer won" in str(loser), str(loser)
    history = [r.model_md5 for r in read_history(cfg, s3_server.state)]
    assert len(history) == 4 and history[0] == first.model_md5  # one entry per winner, none for losers
    # a stale decision (judged against an older champion) is refused even without a race
    current = read_champion(cfg, s3_server.state)
    with pytest.raises(ConflictError, match="champion changed") as refused:
        promote(champion_record(ws, params, METRICS, "ff" * 16, None), cfg, s3_server.state, first)
    names = f"it is now {record_name(current)}, the gate compared against {record_name(first)}"
    assert names in str(refused.value)
