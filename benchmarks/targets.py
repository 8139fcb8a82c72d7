"""Every target of `lmforge bench`, in one table keyed by figure name ("section.figure").

A section only measures; run_bench judges each figure against this table. A figure with no row here is
reported without a target. The numbers are for the machine docs/performance.md describes (2 cores, no GPU).
`lmforge bench --target NAME=VALUE` replaces a row's value for one run (with_values), and
`lmforge bench --check` exits non-zero naming every missed target (missed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Target:
    of: str  # what is compared: "ratio" (lmforge over baseline), "rate" or "seconds" (lmforge's side)
    op: str  # ">=" or "<="
    value: float
    full_only: bool = False  # sized for full mode's inputs; quick mode reports the figure unjudged


TARGETS: dict[str, Target] = {
    # not ratios: the bare loop is C-speed JSON and sets no bar a filter could meet; quick mode's
    # 16 MiB file is dominated by start-up, so only full mode's 1 GiB file is judged
    "validate.throughput": Target("rate", ">=", 30.0, full_only=True),  # MB/s
    "validate.peak_rss": Target("rate", "<=", 1.5, full_only=True),  # GB of RSS per GB of corpus
    "preprocess.encode": Target("ratio", ">=", 0.8),
    # Quick mode's 170k-parameter model takes milliseconds a step or a token, so fixed costs per step
    # (clipping, schedule, log) and per request (HTTP, JSON) dominate: these are judged in full mode.
    "train.overhead": Target("ratio", ">=", 0.95, full_only=True),  # against a bare loop, same fused loss
    # 0.5 was set against a peak measured one rank at a time (half the real one); with the peak measured
    # as training runs, a bare loop with the same loss reaches 0.44 on the demo model and batch
    "train.mfu": Target("ratio", ">=", 0.4, full_only=True),
    "train.bare_mfu": Target("ratio", "<=", 1.0),  # the physical limit: above 1 the peak is wrong
    # quick mode's tiny model leaves the libraries' own memory (~0.5 GB a rank) to dominate
    "adapt.lora_memory": Target("ratio", "<=", 0.5, full_only=True),
    "adapt.fsdp_memory": Target("ratio", "<=", 0.7, full_only=True),  # per rank, at 2 ranks
    "adapt.lora_speed": Target("ratio", ">=", 1.0, full_only=True),
    "serve.score": Target("ratio", ">=", 0.8, full_only=True),
    "serve.decode": Target("ratio", ">=", 0.9, full_only=True),  # against model.generate
    "serve.overhead": Target("ratio", ">=", 0.9, full_only=True),  # against the bare KV-cache loop
    "serve.clients_16": Target("ratio", ">=", 4.0),
    "serve.batch_limit": Target("ratio", ">=", 0.7, full_only=True),  # against the bare loop on 16 rows
    # p99 at capacity over p99 at 2x overload: the queue bound keeps an accepted request's wait what it
    # is at capacity (at most 1.5x). Full mode only: quick mode's requests take milliseconds, so
    # answering the refused ones costs as much as decoding the accepted ones.
    "serve.overload": Target("ratio", ">=", 0.67, full_only=True),
    # the vLLM Bento over a bare vLLM server: BentoML's proxy and lmforge's guards cost at most 10%
    # (the builtin-vs-vLLM rows are reported, not judged: which wins depends on the model and the machine)
    "vllm.proxy": Target("ratio", ">=", 0.9, full_only=True),
    "pipeline.dvc_repro": Target("seconds", "<=", 5.0),
}


def with_values(overrides: dict[str, float], targets: dict[str, Target] = TARGETS) -> dict[str, Target]:
    """The table with some rows' values replaced (`--target NAME=VALUE`); an unknown name is an error."""
    unknown = sorted(set(overrides) - set(targets))
    if unknown:
        raise KeyError(f"no target named {', '.join(unknown)}; the table has {', '.join(targets)}")
    return {
        name: replace(t, value=overrides[name]) if name in overrides else t for name, t in targets.items()
    }


def judge(name: str, figure: dict, quick: bool, targets: dict[str, Target] = TARGETS) -> dict:
    """The figure with its target from the table and whether it met it (both None without one)."""
    target = targets.get(name)
    if target is None or (quick and target.full_only):
        return figure
    value = judged_value(figure, target.of)
    met = value is not None and (value >= target.value if target.op == ">=" else value <= target.value)
    return figure | {"target": {"of": target.of, "op": target.op, "value": target.value}, "met": met}


def judged_value(figure: dict, of: str) -> float | None:
    """The number a target compares: the ratio of the medians, or lmforge's median rate or seconds."""
    return figure["ratio"] if of == "ratio" else figure["lmforge"][of]


def missed(results: dict) -> list[str]:
    """One line per missed target of a results.json: the figure, its value, the target."""
    lines = []
    for section, figures in results["sections"].items():
        for key, f in figures.items():
            if f["met"] is False:
                t = f["target"]
                value = judged_value(f, t["of"])
                shown = "none" if value is None else f"{value:.3g}"
                lines.append(
                    f"{section}.{key} ({f['measurement']}): {t['of']} {shown}, target {t['op']} {t['value']:g}"
                )
    return lines
