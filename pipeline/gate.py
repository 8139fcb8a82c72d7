"""Gate: promote the challenger only if it meets the thresholds and is not worse than the champion.

The decision and every reason go to artifacts/gate.json. The gate only decides; the flow promotes
(after the model is pushed), so a rejected model never touches the champion record.
"""

from __future__ import annotations

from pipeline.config import GateConfig, Workspace, load_params
from pipeline.contracts import ChampionRecord, Decision, read_metrics, write_json
from pipeline.stage import run_stage

GATE_METRICS = "gate_metrics.json"


def decide(metrics: dict, champion: ChampionRecord | None, cfg: GateConfig) -> Decision:
    ppl, bigram = metrics["val_perplexity"], metrics["bigram_val_perplexity"]
    checks = []
    checks.append(
        (
            ppl <= cfg.max_val_perplexity,
            f"val perplexity {ppl:.3f} {'<=' if ppl <= cfg.max_val_perplexity else '>'} threshold {cfg.max_val_perplexity:.3f}",
        )
    )
    needed = bigram * (1 - cfg.min_gain_over_bigram)
    checks.append(
        (
            ppl <= needed,
            f"val perplexity {ppl:.3f} {'<=' if ppl <= needed else '>'} {needed:.3f} (bigram {bigram:.3f} less {cfg.min_gain_over_bigram:.0%})",
        )
    )
    leaks = {s: metrics.get(f"{s}_contamination") for s in ("val", "test")}
    if any(v is None for v in leaks.values()):
        checks.append((False, "contamination was not measured: a perplexity is evidence only on unseen data"))
    else:
        worst = max(leaks, key=leaks.get)
        clean = leaks[worst] <= cfg.max_contamination
        checks.append(
            (
                clean,
                f"contamination {leaks[worst]:.2%} of {worst} n-grams seen in train "
                f"{'<=' if clean else '>'} {cfg.max_contamination:.2%}"
                + ("" if clean else ": the perplexity was measured on leaked data and is not evidence"),
            )
        )
    if champion is None:
        checks.append((True, "no champion yet: judged on the thresholds only"))
    else:
        best = champion.metrics["val_perplexity"]
        allowed = best * (1 + cfg.champion_tolerance)
        checks.append(
            (
                ppl <= allowed,
                f"val perplexity {ppl:.3f} {'<=' if ppl <= allowed else '>'} {allowed:.3f} (champion {best:.3f} plus {cfg.champion_tolerance:.0%} tolerance)",
            )
        )
    promote = all(ok for ok, _ in checks)
    reasons = [("pass: " if ok else "FAIL: ") + text for ok, text in checks]
    return Decision(promote=promote, reasons=reasons, challenger=metrics, champion=champion)


def run() -> None:
    """The DVC stage: metrics.json + the champion record in S3 -> artifacts/gate.json."""
    from pipeline.registry import read_champion

    ws = Workspace.find()
    params = load_params(ws.root)
    metrics = read_metrics(ws.eval_dir)
    champion = read_champion(params.storage, ws.state)
    decision = decide(metrics, champion, params.gate)
    decision.save(ws.gate_file)
    # gate_metrics.json: the decision as DVC metrics, so `dvc exp show` has a column for it
    write_json(ws.artifacts / GATE_METRICS, {
        "promote": decision.promote,
        "checks_passed": decision.checks_passed,
        "checks": len(decision.reasons),
        "champion_val_perplexity": champion.metrics.get("val_perplexity") if champion else None,
    })  # fmt: skip
    print(f"gate: {'PROMOTE' if decision.promote else 'REJECT'}")
    for reason in decision.reasons:
        print(f"  {reason}")


def main() -> int:
    return run_stage("gate", run)


if __name__ == "__main__":
    raise SystemExit(main())
