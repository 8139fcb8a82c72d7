"""Every target of `lmforge bench`, in one table keyed by figure name ("section.figure").

A section only measures; run_bench judges each figure against this table. A figure with no row here is
reported without a target. The numbers are for the machine the README describes (2 cores, no GPU).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    of: str  # what is compared: "ratio" (lmforge over baseline), "rate" or "seconds" (lmforge's side)
    op: str  # ">=" or "<="
    value: float
    full_only: bool = False  # sized for full mode's inputs; quick mode reports the figure unjudged


TARGETS: dict[str, Target] = {
    # not ratios: the bare loop is C-speed JSON and sets no bar a filter could meet; quick mode's
    # 32 MiB file is dominated by start-up, so only full mode's 1 GiB file is judged
    "validate.throughput": Target("rate", ">=", 30.0, full_only=True),  # MB/s
    "validate.peak_rss": Target("rate", "<=", 1.5, full_only=True),  # GB of RSS per GB of corpus
    "preprocess.encode": Target("ratio", ">=", 0.8),
    "train.tokens_per_s": Target("ratio", ">=", 0.95),
    "train.mfu": Target("ratio", ">=", 0.5),
    "serve.score": Target("ratio", ">=", 0.8),
    "serve.decode": Target("ratio", ">=", 0.9),
    "serve.clients_16": Target("ratio", ">=", 4.0),
    "pipeline.dvc_repro": Target("seconds", "<=", 5.0),
}


def judge(name: str, figure: dict, quick: bool) -> dict:
    """The figure with its target from the table and whether it met it (both None without one)."""
    target = TARGETS.get(name)
    if target is None or (quick and target.full_only):
        return figure
    got = {
        "ratio": figure["ratio"],
        "seconds": figure["lmforge"]["seconds"],
        "rate": figure["lmforge"]["rate"],
    }
    value = got[target.of]
    met = value >= target.value if target.op == ">=" else value <= target.value
    return figure | {"target": {"of": target.of, "op": target.op, "value": target.value}, "met": met}
