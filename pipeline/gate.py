"""Gate: promote the challenger only if it meets the thresholds and is not worse than the champion on the
same held-out bytes.

The champion's recorded figures came from another tokenizer and another corpus version, so they are
never compared. Instead the champion's model is pulled from the DVC remote (by the md5 in its record)
and scored on this run's val and test text with its own tokenizer and context, in bits per byte
(lmforge/evaluation/scoring.py); a fine-tune's base was scored the same way by evaluate. Each difference comes
with a bootstrap interval over documents, and the tolerance is judged at the top of that interval: a
challenger is promoted only when the measurement shows it is not worse beyond the tolerance. The user's
own lm-evaluation-harness tasks (gate.tasks) run on both models and hold their rules.

The decision and every reason go to artifacts/gate.json. The gate only decides; the flow promotes
(after the model is pushed), so a rejected model never touches the champion record.
"""

from __future__ import annotations

from lmforge.config import GateConfig, Params
from lmforge.params_file import load_params
from lmforge.runs.contracts import (
    HELD_OUT,
    SCORES_FILE,
    ArtifactError,
    ChampionRecord,
    Decision,
    Manifest,
    read_json,
    read_metrics,
    write_json,
)
from lmforge.workspace import Workspace
from pipeline.stage import run_stage

GATE_METRICS = "gate_metrics.json"


def _pct(x: float) -> str:
    return f"{x:+.2%}"


def describe(against: str, c: dict) -> str:
    """One comparison on the same bytes, as the reasons say it."""
    low, high = c["interval"]
    return (
        f"val {c['challenger_bits_per_byte']:.4f} bits/byte against {against} {c['other_bits_per_byte']:.4f} "
        f"on the same {c['documents']:,} documents ({c['bytes']:,} bytes): {_pct(c['relative_difference'])} "
        f"({c['confidence']:.0%} interval {_pct(low)} to {_pct(high)})"
    )


def champion_check(c: dict, tolerance: float) -> tuple[bool, str]:
    """Not worse than the champion beyond the tolerance, at the top of the interval."""
    low, high = c["interval"]
    text = describe("the champion's", c)
    if high <= tolerance:
        return True, f"{text}: not worse beyond the {tolerance:.2%} tolerance"
    if low > tolerance:
        return False, f"{text} > {tolerance:.2%} tolerance: worse than the champion on the same bytes"
    return False, (
        f"{text}: the interval reaches past the {tolerance:.2%} tolerance, so the measurement cannot show it "
        "is not worse (score more held-out text, evaluate.max_bytes, or widen gate.champion_tolerance)"
    )


def base_check(c: dict) -> tuple[bool, str]:
    """A fine-tune must beat its base: the whole interval below zero."""
    text = describe("its base's", c)
    if c["interval"][1] < 0:
        return True, f"{text}: better than the base"
    return False, f"{text}: not shown better than the base it was fine-tuned from"


def decide(
    metrics: dict,
    champion: ChampionRecord | None,
    cfg: GateConfig,
    compared: dict | None = None,
    task_checks: list[tuple[bool, str]] = (),
    champion_error: str | None = None,
) -> Decision:
    """compared: {"champion": {"val": ..., "test": ...}, "base": {...}} from scoring.paired_difference."""
    compared = compared or {}
    ppl, bigram = metrics["val_perplexity"], metrics["bigram_val_perplexity"]
    checks = []
    if cfg.max_val_perplexity is not None:
        ok = ppl <= cfg.max_val_perplexity
        checks.append((ok, f"val perplexity {ppl:.3f} per token {'<=' if ok else '>'} threshold "
                           f"{cfg.max_val_perplexity:.3f} (of this run's tokenizer)"))  # fmt: skip
    needed = bigram * (1 - cfg.min_gain_over_bigram)
    bits = ""
    if "val_bits_per_byte" in metrics:
        bits = f"; {metrics['val_bits_per_byte']:.4f} bits/byte against the bigram's {metrics['bigram_val_bits_per_byte']:.4f}"
    checks.append((ppl <= needed, f"val perplexity {ppl:.3f} {'<=' if ppl <= needed else '>'} {needed:.3f} "
                                  f"(bigram {bigram:.3f} less {cfg.min_gain_over_bigram:.0%}, same tokens{bits})"))  # fmt: skip
    leaks = {s: metrics.get(f"{s}_contamination") for s in HELD_OUT}
    if any(v is None for v in leaks.values()):
        checks.append(
            (False, "contamination was not measured: a held-out figure is evidence only on unseen data")
        )
    else:
        worst = max(leaks, key=leaks.get)
        clean = leaks[worst] <= cfg.max_contamination
        checks.append(
            (
                clean,
                f"contamination {leaks[worst]:.2%} of {worst} word n-grams seen in train "
                f"{'<=' if clean else '>'} {cfg.max_contamination:.2%}"
                + ("" if clean else ": the figures were measured on leaked data and are not evidence"),
            )
        )
    if champion is None:
        checks.append((True, "no champion yet: judged on the thresholds only"))
    elif "champion" in compared:
        checks.append(champion_check(compared["champion"]["val"], cfg.champion_tolerance))
    else:
        checks.append((False, f"the champion could not be scored on this run's text: {champion_error}"))
    if "base" in compared:
        checks.append(base_check(compared["base"]["val"]))
    checks.extend(task_checks)
    promote = all(ok for ok, _ in checks)
    reasons = [("pass: " if ok else "FAIL: ") + text for ok, text in checks]
    return Decision(
        promote=promote, reasons=reasons, challenger=metrics, champion=champion, head_to_head=compared
    )


# ---------------------------------------------------------------------------------------------
# the stage


def score_champion(champion: ChampionRecord, params: Params, ws: Workspace, scores: dict):
    """The champion pulled from the DVC remote and scored on the documents evaluate scored; returns its
    model directory and {split: DocScores}."""
    import torch

    from lmforge.evaluation.scoring import held_out_documents, score_model_dir
    from lmforge.runs.registry import champion_model_dir

    model_dir = champion_model_dir(champion, params, ws)
    manifest = Manifest.read(ws.shards_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    docs = {
        split: held_out_documents(manifest, ws.shards_dir, split, params.evaluate.max_bytes)
        for split in HELD_OUT
    }
    theirs = score_model_dir(model_dir, docs, params.evaluate.batch_size, device, manifest.chat_template)
    for split in HELD_OUT:
        if theirs[split].documents != scores[split]["documents"]:
            raise ArtifactError(
                f"{ws.eval_dir / SCORES_FILE} scored other {split} documents; run evaluate again"
            )
    return model_dir, theirs


def gate_figures(decision: Decision, tasks: dict) -> dict:
    """gate_metrics.json: the decision and the head-to-head figures as DVC metrics (`dvc exp show`)."""
    figures = {
        "promote": decision.promote,
        "checks_passed": decision.checks_passed,
        "checks": len(decision.reasons),
    }
    for against, by_split in decision.head_to_head.items():
        for split, c in by_split.items():
            figures[f"{against}_{split}_bits_per_byte"] = c["other_bits_per_byte"]
            figures[f"{split}_bits_per_byte_vs_{against}"] = c["relative_difference"]
            figures[f"{split}_bits_per_byte_vs_{against}_interval"] = c["interval"]
    for who, results in tasks.items():
        for found in results.values():
            for metric, value in found["metrics"].items():
                figures[f"{'' if who == 'challenger' else who + '_'}task_{found['task']}_{metric}"] = value
    return figures


def run() -> None:
    """The DVC stage: metrics.json, scores.json and the champion in S3 -> artifacts/gate.json."""
    from infra.s3 import StorageError
    from lmforge.evaluation.scoring import DocScores, paired_difference
    from lmforge.evaluation.tasks import judge, run_tasks
    from lmforge.runs.registry import read_champion

    ws = Workspace.find()
    params = load_params(ws.root)
    cfg = params.gate
    metrics = read_metrics(ws.eval_dir)
    scores = read_json(ws.eval_dir / SCORES_FILE, "evaluate")
    champion = read_champion(params.storage, ws.state)

    def challenger_and(who: str, split: str, theirs: DocScores | None = None) -> dict:
        docs = scores[split]["documents"]
        mine = DocScores.from_dict(docs, scores[split]["challenger"])
        theirs = theirs or DocScores.from_dict(docs, scores[split][who])
        return paired_difference(mine, theirs, cfg.bootstrap_samples, cfg.confidence)

    compared, champion_dir, champion_error = {}, None, None
    if "base" in scores["val"]:
        compared["base"] = {split: challenger_and("base", split) for split in HELD_OUT}
    if champion is not None:
        try:
            champion_dir, theirs = score_champion(champion, params, ws, scores)
            compared["champion"] = {
                split: challenger_and("champion", split, theirs[split]) for split in HELD_OUT
            }
        except StorageError as exc:
            champion_error = str(exc)
    tasks = {"challenger": run_tasks(ws.model_dir, cfg.tasks, ws.root, params.evaluate.batch_size)}
    if cfg.tasks and champion_dir is not None:
        tasks["champion"] = run_tasks(champion_dir, cfg.tasks, ws.root, params.evaluate.batch_size)
    task_checks = [
        check
        for rule in cfg.tasks
        for check in judge(rule, tasks["challenger"][rule.file], tasks.get("champion", {}).get(rule.file))
    ]
    decision = decide(metrics, champion, cfg, compared, task_checks, champion_error)
    decision.tasks = tasks
    decision.save(ws.gate_file)
    write_json(ws.artifacts / GATE_METRICS, gate_figures(decision, tasks))
    print(f"gate: {'PROMOTE' if decision.promote else 'REJECT'}")
    for reason in decision.reasons:
        print(f"  {reason}")


def main() -> int:
    return run_stage("gate", run)


if __name__ == "__main__":
    raise SystemExit(main())
