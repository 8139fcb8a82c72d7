"""The bench's harness: its context, its figures (two measured sides and their ratio), and its results.

A side is how much work (tokens, FLOP, MB) in how many seconds; a figure is lmforge's side over the
baseline's. Both sides keep their raw numbers, so any ratio can be recomputed from results.json.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from lmforge.config import Params
from lmforge.params_file import load_params
from lmforge.workspace import Workspace

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
    "evaluate.max_bytes=20000",
    "evaluate.max_new_tokens=8",
]
# Full mode keeps the workspace's model and batch; steady-state throughput needs no full-length run, and
# evaluate runs only so that the real package step has metrics to put in the Bento.
# Each train run is one of REPEATS, so 30 steps (24 steady ones, about 12 s of the demo model here).
FULL = ["train.max_steps=30", "evaluate.max_bytes=100000"]

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
# figures: two measured sides, each repeated, and their ratio

REPEATS = 3  # every side runs this many times, interleaved with the other sides of its figures
EPOCH = time.time()  # runs' start and end are wall-clock seconds since the bench started


@dataclass(frozen=True)
class Run:
    """One separate measurement: how much work (None for a bare wall time) in how many seconds, and the
    span (seconds since EPOCH) of what measured it, so that interleaving can be checked afterwards."""

    amount: float | None
    seconds: float
    start: float
    end: float


def span(amount: float | None, seconds: float, started: float, ended: float) -> Run:
    """A Run measured between two time.time() readings, taken in this process or in a child."""
    return Run(amount, seconds, started - EPOCH, ended - EPOCH)


def interleaved(repeats: int, *measures: Callable[[], object]) -> list[list]:
    """Call each measure `repeats` times in rounds, A B A B A B (A B C A B C ...), so that slow drift and
    other work on the machine fall on every side alike.

    A measure returns (amount, seconds), or a Run, or a tuple of those when one call measures several
    things (a child reports the span of each part as a Run); a pair becomes a Run spanning the call.
    Returns, per measure, its results in call order: Runs, or tuples of Runs."""
    out: list[list] = [[] for _ in measures]
    for _ in range(repeats):
        for results, measure in zip(out, measures, strict=True):
            started = time.time()
            got = measure()
            ended = time.time()
            several = isinstance(got, tuple) and isinstance(got[0], (tuple, Run))
            runs = tuple(
                item if isinstance(item, Run) else span(item[0], item[1], started, ended)
                for item in (got if several else (got,))
            )
            results.append(runs if several else runs[0])
    return out


def side(what: str, unit: str, runs: list[Run], per: float | None = None) -> dict:
    """One side of a figure: its separate runs, and the median and spread (min, max) of their rates, or
    of their seconds for a bare wall time. A run's rate is amount / seconds, or amount / per when per is
    given (memory per GB of corpus)."""
    rows = [
        {
            "amount": r.amount,
            "seconds": r.seconds,
            "rate": None if r.amount is None else r.amount / per if per else r.amount / r.seconds,
            "start": round(r.start, 3),
            "end": round(r.end, 3),
        }
        for r in runs
    ]
    rates = [r["rate"] for r in rows if r["rate"] is not None]
    headline = rates or [r["seconds"] for r in rows]
    return {
        "what": what,
        "unit": unit,
        "per": per,
        "runs": rows,
        "rate": float(np.median(rates)) if rates else None,
        "seconds": float(np.median([r["seconds"] for r in rows])),
        "spread": [min(headline), max(headline)],
    }


def figure(measurement: str, lmforge: dict, baseline: dict | None = None, note: str = "", **detail) -> dict:
    """lmforge's median rate over the baseline's (of two wall times: the baseline's median seconds over
    lmforge's; higher is better either way), and the spread of the ratio: the lowest and highest ratio
    of the runs paired round by round. Its target and whether it met it are filled in by run_bench, from
    the one table in benchmarks.targets."""
    ratio = spread = None
    pairs: list[float] = []
    paired = baseline is not None and len(lmforge["runs"]) == len(baseline["runs"])  # round by round
    if baseline and baseline["rate"] and lmforge["rate"]:
        ratio = lmforge["rate"] / baseline["rate"]
        if paired:
            pairs = [
                a["rate"] / b["rate"]
                for a, b in zip(lmforge["runs"], baseline["runs"], strict=True)
                if a["rate"] and b["rate"]
            ]
    elif baseline and baseline["rate"] is None and lmforge["rate"] is None:
        ratio = baseline["seconds"] / lmforge["seconds"]
        if paired:
            pairs = [
                b["seconds"] / a["seconds"] for a, b in zip(lmforge["runs"], baseline["runs"], strict=True)
            ]
    spread = [min(pairs), max(pairs)] if pairs else None
    return {
        "measurement": measurement,
        "lmforge": lmforge,
        "baseline": baseline,
        "ratio": ratio,
        "ratio_spread": spread,
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
    load = " / ".join(f"{x:.2f}" for x in m["load_average"])
    lines = [
        f"lmforge bench ({results['mode']} mode), {m['date']}: {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"load average {load} (1 / 5 / 15 min) at the end; {results.get('bench_seconds', 0) / 60:.1f} min",
        "",
        "Each cell: the median of the side's runs (interleaved with the other side's), and their range.",
        "",
        "| measurement | lmforge | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for section in results["sections"].values():
        for f in section.values():
            ratio = "—" if f["ratio"] is None else f"{f['ratio']:.2f}" + _range(f["ratio_spread"], "{:.2f}")
            met = {True: "yes", False: "**no**", None: "—"}[f["met"]]
            lines.append(
                f"| {f['measurement']} | {_cell(f['lmforge'])} | {_cell(f['baseline'])} | {ratio} | {_target(f)} | {met} |"
            )
            what = f"lmforge = {f['lmforge']['what']}" + (
                f"; baseline = {f['baseline']['what']}" if f["baseline"] else ""
            )
            runs = len(f["lmforge"]["runs"])
            notes.append(
                f"- {f['measurement']}: {what}; {runs} run{'s' if runs > 1 else ''}"
                + (f". {f['note']}" if f["note"] else "")
            )
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"| {name}: skipped ({reason}) | — | — | — | — | — |")
    return "\n".join(lines + [""] + notes) + "\n"


def _range(spread: list[float] | None, fmt: str) -> str:
    """The range after a median, as " (low–high)", or nothing when every run gave the same."""
    if not spread or spread[0] == spread[1]:
        return ""
    return f" ({fmt.format(spread[0])}–{fmt.format(spread[1])})"


def _cell(s: dict | None) -> str:
    if s is None:
        return "—"
    low_high = s["spread"]
    if s["unit"] == "tokens":
        return f"{s['rate']:,.0f} tok/s" + _range(low_high, "{:,.0f}")
    if s["unit"] == "FLOP":
        return f"{s['rate'] / 1e9:.1f} GFLOP/s" + _range([x / 1e9 for x in low_high], "{:.1f}")
    if s["unit"] == "MB":
        return f"{s['rate']:,.1f} MB/s" + _range(low_high, "{:,.1f}")
    if s["unit"] == "MiB":
        return f"{s['rate']:,.0f} MiB" + _range(low_high, "{:,.0f}")
    if s["unit"] == "GB RSS":
        amount = float(np.median([r["amount"] for r in s["runs"]]))
        return f"{amount:.2f} GB ({s['rate']:.2f} per GB)" + _range(low_high, "{:.2f}")
    fmt = "{:.3f}" if s["seconds"] < 1 else "{:.1f}"
    return fmt.format(s["seconds"]) + " s" + _range(low_high, fmt)


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
