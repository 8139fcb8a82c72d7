"""The bench's harness: its context, its figures (two measured sides and their ratio), and its results.

A side is how much work (tokens, FLOP, MB) in how many seconds; a figure is lmforge's side over the
baseline's. Both sides keep their raw numbers, so any ratio can be recomputed from results.json.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from pipeline.config import Params, Workspace, load_params

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the project whose code the bench measures

# Quick mode: a tiny model and short runs through exactly the same code paths (2 processes included).
QUICK = [
    "preprocess.vocab_size=1024",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=64",
    "train.max_steps=20",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.checkpoint_every=10",
    "evaluate.max_windows=32",
    "evaluate.max_new_tokens=8",
]
# Full mode keeps the workspace's model and batch; steady-state throughput needs no full-length run, and
# evaluate runs only so that the real package step has metrics to put in the Bento.
FULL = ["train.max_steps=100", "evaluate.max_windows=200"]

Log = Callable[[str], None]


@dataclass
class Bench:
    ws: Workspace  # the bench's own workspace: params, data/ and artifacts/
    quick: bool
    tmp: Path  # scratch space for the pipeline section's workspace and S3 state
    source: str  # the corpus, as `lmforge run --source` takes it
    source_root: Path  # the workspace whose params.yaml the bench starts from
    profile: str | None  # a params profile to apply on top of it (demo, gpu)
    log: Log

    @property
    def params(self) -> Params:
        # read each time: the train section rewrites params.yaml to compare process counts
        return load_params(self.ws.root)


def quiet(log: Log) -> Log:
    """Subprocess output: only lines that look like problems reach the log (CommandError keeps the tail)."""
    return lambda line: log(f"    {line}") if ("error" in line.lower() or "Traceback" in line) else None


# ---------------------------------------------------------------------------------------------
# figures: two measured sides and their ratio


def side(what: str, amount: float | None, unit: str, seconds: float) -> dict:
    """One side of a figure: how much work (tokens, FLOP) in how many seconds."""
    rate = amount / seconds if amount is not None and seconds > 0 else None
    return {"what": what, "amount": amount, "unit": unit, "seconds": seconds, "rate": rate}


def figure(measurement: str, lmforge: dict, baseline: dict | None = None, note: str = "", **detail) -> dict:
    """lmforge's rate over the baseline's. Its target and whether it met it are filled in by run_bench,
    from the one table in benchmarks.targets."""
    ratio = lmforge["rate"] / baseline["rate"] if baseline and baseline["rate"] and lmforge["rate"] else None
    return {
        "measurement": measurement,
        "lmforge": lmforge,
        "baseline": baseline,
        "ratio": ratio,
        "target": None,
        "met": None,
        "note": note,
        "detail": detail,
    }


# ---------------------------------------------------------------------------------------------
# results: results.json, results.md


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),  # a busy machine shows here
    }


def write_results(results: dict, out_dir: Path, log: Log) -> None:
    """results.json (every raw number) and results.md (the table), and the table to the log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out_dir / "results.md").write_text(table)
    log(table)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"lmforge bench ({results['mode']} mode), {m['date']}: {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"load average {m['load_average'][0]:.2f} at the end",
        "",
        "| measurement | lmforge | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for section in results["sections"].values():
        for f in section.values():
            ratio = "—" if f["ratio"] is None else f"{f['ratio']:.2f}"
            met = {True: "yes", False: "**no**", None: "—"}[f["met"]]
            lines.append(
                f"| {f['measurement']} | {_cell(f['lmforge'])} | {_cell(f['baseline'])} | {ratio} | {_target(f)} | {met} |"
            )
            what = f"lmforge = {f['lmforge']['what']}" + (
                f"; baseline = {f['baseline']['what']}" if f["baseline"] else ""
            )
            notes.append(f"- {f['measurement']}: {what}" + (f". {f['note']}" if f["note"] else ""))
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"| {name}: skipped ({reason}) | — | — | — | — | — |")
    return "\n".join(lines + [""] + notes) + "\n"


def _cell(s: dict | None) -> str:
    if s is None:
        return "—"
    if s["unit"] == "tokens":
        return f"{s['rate']:,.0f} tok/s"
    if s["unit"] == "FLOP":
        return f"{s['rate'] / 1e9:.1f} GFLOP/s"
    if s["unit"] == "MB":
        return f"{s['rate']:,.1f} MB/s"
    if s["unit"] == "GB RSS":
        return f"{s['amount']:.2f} GB ({s['rate']:.2f} per GB)"
    return f"{s['seconds']:.3f} s" if s["seconds"] < 1 else f"{s['seconds']:.1f} s"


def _target(f: dict) -> str:
    t = f["target"]
    if not t:
        return "—"
    sign = "≥" if t["op"] == ">=" else "≤"
    unit = {
        "seconds": " s",
        "rate": f" {f['lmforge']['unit'].replace('MB', 'MB/s').replace('GB RSS', 'per GB')}",
    }
    return f"{sign} {t['value']:g}" + unit.get(t["of"], "")
