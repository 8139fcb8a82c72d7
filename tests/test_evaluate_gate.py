"""Evaluation (baseline math by hand, the real stage on a tiny model), the gate, and the champion registry."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from lmforge.config import GateConfig
from lmforge.evaluation.scoring import DocScores, Encoded, paired_difference
from lmforge.runs.contracts import ChampionRecord, Decision, read_curve, record_name
from lmforge.runs.registry import champion_record, promote, read_champion
from pipeline.evaluate import NGramBaseline, evaluate
from pipeline.gate import decide
from pipeline.train import train


def test_ngram_baselines_match_hand_computation():
    # train: 0 1 0 1 0 2 ; vocab 3 ; k = 1
    baseline = NGramBaseline([np.array([0, 1, 0, 1, 0, 2])], vocab_size=3, k=1.0)
    # unigram counts 3,2,1 of 6 -> p = (c+1)/(6+3)
    assert baseline.unigram_nll(np.array([0, 1, 2])) == pytest.approx(-np.log([4 / 9, 3 / 9, 2 / 9]))
    # bigram pairs: (0,1) x2, (1,0) x2, (0,2) x1; as predecessor 0 occurs 3 times, 1 twice, 2 never
    got = baseline.bigram_nll(np.array([0, 0, 1, 2]), np.array([1, 0, 0, 1]))
    assert got == pytest.approx(-np.log([(2 + 1) / (3 + 3), (0 + 1) / (3 + 3), (2 + 1) / (2 + 3), 1 / 3]))
    # documents [1 0 2] and [1] after the prefix token 0: targets 1, 0, 2 after 0, 1, 0, then 1 after 0
    model = scores([9.0, 9.0], [10, 4])
    got = baseline.score(Encoded([[1, 0, 2], [1]], None, model.bytes, model.documents), 0, model)
    assert got["unigram"].bits.tolist() == pytest.approx(
        [-np.log2([3 / 9, 4 / 9, 2 / 9]).sum(), -np.log2(3 / 9)]
    )
    assert got["bigram"].bits.tolist() == pytest.approx([-np.log2([3 / 6, 3 / 5, 2 / 6]).sum(), -np.log2(3 / 6)])
    assert got["bigram"].bits_per_byte == pytest.approx(got["bigram"].bits.sum() / 14)  # the model's bytes


def reference_bits_per_byte(model_dir, texts: list[str]) -> tuple[float, int]:
    """Bits per byte the plain way: for each document (after the BOS-else-EOS token), every token's
    log-probability from an unbatched forward pass over at most `context` tokens before it, blocks of
    `context` tokens at a time (lm-eval's rolling windows); bytes from decoding the tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = model.config.n_positions
    start_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    nats, nbytes = 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = [start_token, *ids]
        for block in range(0, len(ids), context):
            end = min(block + context, len(ids))  # predict ids[block:end], each from the tokens before it
            inputs = full[max(0, end - context) : end]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([inputs])).logits[0].double(), -1)
            first = len(inputs) - (end - block)
            nats -= sum(logprobs[first + i, ids[block + i]].item() for i in range(end - block))
        nbytes += len(tokenizer.decode(ids).encode("utf-8"))
    return nats / math.log(2) / nbytes, nbytes


@pytest.mark.slow  # over 30 s on a loaded 2-core machine
def test_evaluate_stage_on_a_tiny_model(tiny_workspace):
    ws, params = tiny_workspace
    threads = torch.get_num_threads()
    try:
        train(params, ws)
        metrics = evaluate(params, ws)
    finally:
        torch.set_num_threads(threads)  # train and evaluate set this process's thread count for themselves
    manifest = json.loads((ws.shards_dir / "manifest.json").read_text())
    scored = json.loads((ws.eval_dir / "scores.json").read_text())
    for split in ("val", "test"):
        texts = [json.loads(line)["text"] for line in (ws.shards_dir / f"{split}.jsonl").read_text().splitlines()]
        assert len(texts) == manifest["splits"][split]["documents"] == metrics[f"{split}_documents"]
        # the unit the gate compares in, against a computation of its own (the model's context is 32
        # tokens, so documents span several windows)
        expected, nbytes = reference_bits_per_byte(ws.model_dir, texts)
        mine = DocScores.from_dict(scored[split]["documents"], scored[split]["challenger"])
        assert mine.bits_per_byte == pytest.approx(expected, rel=1e-6)
        assert metrics[f"{split}_bits_per_byte"] == pytest.approx(expected, rel=1e-6)
        assert metrics[f"{split}_bytes"] == nbytes and max(mine.tokens) > 32
        nats_per_token = expected * nbytes * math.log(2) / mine.tokens.sum()  # from the reference's bits
        assert metrics[f"{split}_loss"] == pytest.approx(nats_per_token, rel=1e-5)
        assert metrics[f"{split}_perplexity"] == pytest.approx(math.exp(nats_per_token), rel=1e-3)
        assert 1 < metrics[f"{split}_perplexity"] < 300  # better than uniform over 300 tokens
        assert metrics[f"bigram_{split}_perplexity"] < metrics[f"unigram_{split}_perplexity"]
        assert metrics[f"bigram_{split}_bits_per_byte"] < metrics[f"unigram_{split}_bits_per_byte"]
    assert metrics["eval_tokens_per_s"] > 0 and metrics["train_steps"] == 10
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
CHAMPION = {"metrics": {"val_perplexity": 5.0}}  # its old per-token figure: never compared


def head_to_head(difference: float, low: float, high: float) -> dict:
    """A comparison as scoring.paired_difference gives it."""
    return {"val": {"documents": 40, "bytes": 120_000, "challenger_bits_per_byte": 2.0 * (1 + difference),
                    "other_bits_per_byte": 2.0, "relative_difference": difference, "interval": [low, high],
                    "confidence": 0.95}}  # fmt: skip


@pytest.mark.parametrize(
    ("metrics", "champion", "compared", "promote", "failing"),
    [
        (METRICS, None, {}, True, None),
        ({"val_perplexity": 120.0, "bigram_val_perplexity": 300.0, **CLEAN}, None, {}, False, "threshold 100.000"),
        ({"val_perplexity": 28.0, "bigram_val_perplexity": 30.0, **CLEAN}, None, {}, False, "bigram 30.000 less 10%"),
        (
            METRICS | {"test_contamination": 0.12},
            None,
            {},
            False,
            "contamination 12.00% of test word n-grams seen in train > 5.00%: the figures were measured on leaked data",
        ),
        (METRICS | {"val_contamination": 0.05}, None, {}, True, None),  # at the bound is allowed
        ({"val_perplexity": 20.0, "bigram_val_perplexity": 30.0}, None, {}, False, "contamination was not measured"),
        # against the champion: on the same bytes, whatever its recorded per-token perplexity (5.0)
        (METRICS, CHAMPION, {"champion": head_to_head(-0.05, -0.07, -0.03)}, True, None),
        (METRICS, CHAMPION, {"champion": head_to_head(0.01, 0.0, 0.02)}, True, None),  # worse, within 2%
        (METRICS, CHAMPION, {"champion": head_to_head(0.15, 0.13, 0.17)}, False,
         "+15.00% (95% interval +13.00% to +17.00%) > 2.00% tolerance: worse than the champion on the same bytes"),
        (METRICS, CHAMPION, {"champion": head_to_head(0.01, -0.01, 0.03)}, False,
         "the interval reaches past the 2.00% tolerance, so the measurement cannot show it is not worse"),
        (METRICS, CHAMPION, {}, False, "the champion could not be scored on this run's text: no remote"),
        # a fine-tune must beat its base: the whole interval below zero
        (METRICS, None, {"base": head_to_head(-0.2, -0.25, -0.15)}, True, None),
        (METRICS, None, {"base": head_to_head(-0.01, -0.03, 0.01)}, False, "not shown better than the base"),
    ],
)
def test_gate_decisions(metrics, champion, compared, promote, failing):
    champion = ChampionRecord(model_md5="00" * 16, **champion) if champion else None
    decision = decide(metrics, champion, GATE, compared, champion_error="no remote")
    assert decision.promote is promote
    assert len(decision.reasons) == 4 + ("base" in compared)
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert (failed == []) if failing is None else (len(failed) == 1 and failing in failed[0]), failed
    if champion is None:
        assert "no champion yet" in decision.reasons[3]
    assert decision.head_to_head == compared


def scores(bits: list[float], nbytes: list[int]) -> DocScores:
    return DocScores([f"d{i}" for i in range(len(bits))], np.array(bits, float), np.ones(len(bits), np.int64),
                     np.array(nbytes, np.int64))  # fmt: skip


def test_paired_difference_and_its_bootstrap_interval():
    rng = np.random.default_rng(1)
    nbytes = rng.integers(100, 1000, 200)
    champion = scores(list(nbytes * rng.uniform(1.5, 2.5, 200)), list(nbytes))
    # 10% more bits on every document: exactly +10%, and every resample says so
    worse = scores(list(champion.bits * 1.1), list(nbytes))
    c = paired_difference(worse, champion, samples=500, confidence=0.95)
    assert c["relative_difference"] == pytest.approx(0.1) and c["interval"] == pytest.approx([0.1, 0.1])
    assert (c["documents"], c["bytes"]) == (200, int(nbytes.sum()))
    # better on some documents, worse on others: the interval is wide, and narrower with more documents
    noisy = scores(list(champion.bits * rng.normal(1.0, 0.2, 200)), list(nbytes))
    wide = paired_difference(noisy, champion, samples=1000, confidence=0.95)
    low, high = wide["interval"]
    assert low < wide["relative_difference"] < high and high - low > 0.03
    few = paired_difference(scores(list(noisy.bits[:20]), list(nbytes[:20])),
                            scores(list(champion.bits[:20]), list(nbytes[:20])), 1000, 0.95)  # fmt: skip
    assert few["interval"][1] - few["interval"][0] > 2 * (high - low)
    assert paired_difference(noisy, champion, 1000, 0.95) == wide  # a fixed seed: the same interval again
    with pytest.raises(ValueError, match="different documents"):
        paired_difference(noisy, scores([1.0], [10]), 100, 0.95)


def test_champion_record_in_s3(s3_server, tiny_workspace):
    ws, params = tiny_workspace
    cfg = s3_server.cfg.model_copy(update={"registry_prefix": "registry-test"})
    assert read_champion(cfg, s3_server.state) is None
    params = params.model_copy(update={"storage": cfg})
    record = champion_record(ws, params, METRICS, "ab" * 16 + ".dir", "cd" * 16 + ".dir")
    written = promote(record, cfg, s3_server.state, judged_against=None)
    assert read_champion(cfg, s3_server.state) == written
    assert written.model_url == f"s3://{cfg.bucket}/dvc/files/md5/ab/{'ab' * 15}.dir" and written.promoted_at
    # a challenger is judged against the record read back from S3, on figures scored on this run's text
    decision = decide(METRICS, read_champion(cfg, s3_server.state), GATE, {"champion": head_to_head(0.1, 0.08, 0.12)})
    assert not decision.promote and decision.champion == written
    assert "worse than the champion on the same bytes" in decision.reasons[-1]


def test_rollback_goes_back_one_promotion_at_a_time(s3_server, tiny_workspace):
    from infra.s3 import StorageError
    from lmforge.runs.registry import read_history, rollback

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
    from lmforge.runs.registry import read_history

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


MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs: {data_files: {test: my_tasks/mc.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list: [{metric: acc}]
"""


def test_a_task_the_challenger_fails_blocks_promotion(tiny_workspace, s3_server, monkeypatch):
    """gate.tasks: a multiple-choice task file run through lm-eval's own `hf` model on the challenger's
    directory. The right answers are long runs of letters the model never saw, which no model trained on
    this corpus prefers over a short common word: acc 0 of 4, under the 0.5 threshold, names the task."""
    from lmforge.params_file import load_params, write_overrides
    from pipeline.gate import run as gate_stage

    ws, _ = tiny_workspace
    write_overrides(ws.root, ["train.max_steps=300", "train.lr=0.02", "train.min_lr=0.002"])  # beats the bigram
    params = load_params(ws.root)
    threads = torch.get_num_threads()
    try:
        train(params, ws)
        evaluate(params, ws)
    finally:
        torch.set_num_threads(threads)
    tasks = ws.root / "my_tasks"
    tasks.mkdir()
    questions = [("the quick brown", " fox"), ("the lazy", " dog"), ("a model", " data"), ("the river", " stone")]
    (tasks / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": [right, " qzxj vbwk qzxj vbwk qzxj vbwk"], "label": 1}) + "\n"
        for q, right in questions
    ))  # fmt: skip
    (tasks / "mc.yaml").write_text(MC_TASK)
    write_overrides(ws.root, [
        f"storage.endpoint_url={s3_server.cfg.endpoint_url}", f"storage.bucket={s3_server.cfg.bucket}",
        "storage.registry_prefix=registry-tasks", "gate.min_gain_over_bigram=0",  # the tasks decide here
        "gate.tasks=[{file: my_tasks/mc.yaml, metric: acc, threshold: 0.5}, {file: my_tasks/mc.yaml, metric: acc, max_drop: 0.1}]",
    ])  # fmt: skip
    monkeypatch.setenv("LMFORGE_STATE_DIR", str(s3_server.state))
    gate_stage()
    decision = Decision.load(ws.gate_file)
    assert not decision.promote
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert failed == ["FAIL: task tiny_mc (my_tasks/mc.yaml) acc 0.0000 < threshold 0.5000"], decision.reasons
    assert "pass: task tiny_mc (my_tasks/mc.yaml) acc 0.0000: no champion to compare with" in decision.reasons
    assert decision.tasks["challenger"]["my_tasks/mc.yaml"]["metrics"]["acc"] == 0.0
    figures = json.loads((ws.artifacts / "gate_metrics.json").read_text())
    assert figures["task_tiny_mc_acc"] == 0.0 and figures["promote"] is False
    # the same task with the choices the other way round holds its rule: the challenger passes
    (tasks / "mc.jsonl").write_text((tasks / "mc.jsonl").read_text().replace('"label": 1', '"label": 0'))
    gate_stage()
    assert Decision.load(ws.gate_file).promote, Decision.load(ws.gate_file).reasons


@pytest.mark.slow  # four short trainings on a loaded 2-core machine
def test_a_fine_tune_is_scored_against_its_base_and_must_beat_it(tiny_workspace, tmp_path, s3_server, monkeypatch):
    """model.base set: evaluate scores the base on the same held-out bytes with its own tokenizer
    (checked against the plain computation), and the gate wants the fine-tune better than it, the whole
    interval below zero: 300 steps on a 10-step base are; 30 steps at a learning rate of 1 on a 300-step
    base, which wreck it, are not."""
    from lmforge.params_file import load_params, write_overrides
    from pipeline.gate import run as gate_stage
    from pipeline.preprocess import preprocess

    ws, _ = tiny_workspace
    write_overrides(ws.root, [
        f"storage.endpoint_url={s3_server.cfg.endpoint_url}", f"storage.bucket={s3_server.cfg.bucket}",
        "storage.registry_prefix=registry-fine-tune", "gate.min_gain_over_bigram=0", "train.checkpoint_every=1000",
    ])  # fmt: skip
    monkeypatch.setenv("LMFORGE_STATE_DIR", str(s3_server.state))

    def trained(steps: int, lr: float, base=None):
        write_overrides(ws.root, [f"train.max_steps={steps}", f"train.lr={lr}", f"train.min_lr={lr / 10}",
                                  f"model.base={base or 'null'}"])  # fmt: skip
        shutil.rmtree(ws.checkpoints_dir, ignore_errors=True)
        params = load_params(ws.root)
        if base:
            preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, base_dir=base)
        train(params, ws, base_dir=base)
        return params

    threads = torch.get_num_threads()
    outcomes = {}
    try:
        trained(10, 0.003)
        weak = shutil.copytree(ws.model_dir, tmp_path / "weak")
        trained(300, 0.02)
        strong = shutil.copytree(ws.model_dir, tmp_path / "strong")
        for name, steps, lr, base in (("tuned", 300, 0.02, weak), ("wrecked", 30, 1.0, strong)):
            metrics = evaluate(trained(steps, lr, base), ws)
            gate_stage()
            outcomes[name] = (metrics, Decision.load(ws.gate_file), base)
    finally:
        torch.set_num_threads(threads)
    texts = [json.loads(line)["text"] for line in (ws.shards_dir / "val.jsonl").read_text().splitlines()]
    metrics, decision, base = outcomes["tuned"]
    expected, _ = reference_bits_per_byte(base, texts)
    assert metrics["base_val_bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    head = decision.head_to_head["base"]["val"]
    assert head["other_bits_per_byte"] == metrics["base_val_bits_per_byte"] and head["interval"][1] < 0
    assert any(r.startswith("pass: ") and r.endswith("better than the base") for r in decision.reasons)
    assert decision.promote, decision.reasons
    metrics, decision, _ = outcomes["wrecked"]
    assert decision.head_to_head["base"]["val"]["interval"][0] > 0  # worse than the base it started from
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert any(r.endswith("not shown better than the base it was fine-tuned from") for r in failed), failed
    assert not decision.promote
