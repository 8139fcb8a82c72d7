"""Experiments the DVC way: a grid of params queued with `dvc exp run --queue -S`, run by DVC's own
queue (`dvc queue start`), and read back from `dvc exp show --json`.

A sweep never promotes anything. The best experiment reaches the champion only through the gate:
`dvc exp apply <name>`, then `lmforge run` (evaluate, gate, package, publish as usual).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from itertools import product
from pathlib import Path

from infra.dvc import dvc
from infra.processes import CommandError, venv_env
from lmforge.config import PARAMS_FILE, ConfigError
from lmforge.params_file import read_params_file, resolve_params
from lmforge.workspace import Workspace

# what `lmforge sweep` tabulates of each experiment, from the metrics files in dvc.yaml
# (bits per byte rank models whatever their tokenizers; perplexity per token only within one tokenizer)
COLUMNS = {
    "val bpb": ("artifacts/eval/metrics.json", "val_bits_per_byte"),
    "test bpb": ("artifacts/eval/metrics.json", "test_bits_per_byte"),
    "bigram val bpb": ("artifacts/eval/metrics.json", "bigram_val_bits_per_byte"),
    "val ppl/token": ("artifacts/eval/metrics.json", "val_perplexity"),
    "val leak": ("artifacts/eval/metrics.json", "val_contamination"),
    "gate": ("artifacts/gate_metrics.json", "promote"),
}
QUEUED = re.compile(r"Queued experiment '([^']+)'")


def grid_points(grid: list[str]) -> list[list[str]]:
    """["train.lr=1e-3,3e-3", "model.n_layer=2,4"] -> every combination as override lists."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"sweep: {item!r} is not section.key=value1,value2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(point) for point in product(*axes)]


def check_grid(root: Path, grid: list[str]) -> int:
    """Every point must be valid params before anything is queued; returns how many points there are."""
    points = grid_points(grid)
    raw = read_params_file(root / PARAMS_FILE)
    for point in points:
        resolve_params(raw, point, origin=f"sweep point {', '.join(point)}")
    return len(points)


def _dvc(args: list[str], ws: Workspace, on_line: Callable[[str], None]) -> list[str]:
    # experiments run in DVC's temporary copies of the repo: LMFORGE_STATE_DIR points them at this
    # workspace's S3 credentials and servers, which the gate stage needs for the champion
    return dvc(args, ws.root, on_line, env=venv_env({"LMFORGE_STATE_DIR": str(ws.state)}))


def queue_status(ws: Workspace) -> dict[str, str]:
    """Experiment name -> Queued | Running | Success | Failed, from `dvc queue status`."""
    lines = _dvc(["queue", "status"], ws, lambda line: None)
    status = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[-1] in ("Queued", "Running", "Success", "Failed"):
            status[parts[1] if len(parts) > 2 else parts[0]] = parts[-1]
    return status


# Each look at the queue is a `dvc queue status` process (about 1.3 s of a core here): looking every 2 s
# took 60% of a core from the experiments it waited for.
STATUS_POLL_SECONDS = 5


def sweep(ws: Workspace, grid: list[str], jobs: int = 1, on_line: Callable[[str], None] = print) -> list[str]:
    """Queue one experiment per grid point, run them with DVC's queue, wait; returns their names."""
    from tqdm import tqdm

    total = check_grid(ws.root, grid)
    lines = _dvc(["exp", "run", "--queue", *(a for g in grid for a in ("-S", g))], ws, on_line)
    names = [m.group(1) for line in lines if (m := QUEUED.search(line))]
    if len(names) != total:
        raise CommandError(f"dvc queued {len(names)} experiments, the grid has {total}: {lines[-5:]}")
    _dvc(["queue", "start", "--jobs", str(jobs)], ws, on_line)
    with tqdm(total=total, desc="experiments", unit="exp", disable=None) as bar:
        while True:
            status = queue_status(ws)
            done = [n for n in names if status.get(n) in ("Success", "Failed")]
            bar.update(len(done) - bar.n)
            if len(done) == total:
                break
            time.sleep(STATUS_POLL_SECONDS)
    if failed := [n for n in names if status[n] == "Failed"]:
        for name in failed:
            _dvc(["queue", "logs", name], ws, on_line)
        raise CommandError(f"experiments failed: {', '.join(failed)} (their logs are above)")
    return names


def experiments(ws: Workspace) -> list[dict]:
    """Every experiment of the current commit from `dvc exp show --json`: name, rev, params, metrics."""
    raw = json.loads("\n".join(_dvc(["exp", "show", "--json", "--no-fetch"], ws, lambda line: None)) or "[]")
    found = []
    for commit in raw:
        for group in commit.get("experiments") or []:
            for rev in group.get("revs") or []:
                data = rev.get("data") or {}
                found.append(
                    {
                        "name": rev.get("name") or data.get("name"),
                        "rev": rev.get("rev") or data.get("rev"),
                        "params": (data.get("params") or {}).get(PARAMS_FILE, {}).get("data", {}),
                        "metrics": {
                            path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()
                        },
                    }
                )
    return found


def column(exp: dict, name: str):
    path, key = COLUMNS[name]
    return exp["metrics"].get(path, {}).get(key)


def ranked(found: list[dict]) -> list[dict]:
    """Best val bits per byte first; an experiment without one (it failed) last."""
    return sorted(found, key=lambda e: column(e, "val bpb") or float("inf"))


def table(found: list[dict], swept: list[str]) -> str:
    """The experiments as a text table, best val bits per byte first."""
    keys = [g.partition("=")[0] for g in swept]

    def param(exp: dict, key: str):
        value = exp["params"]
        for part in key.split("."):
            value = value.get(part, {}) if isinstance(value, dict) else None
        return value

    rows = ranked(found)
    header = ["experiment", *keys, *COLUMNS]
    body = [[e["name"], *(param(e, k) for k in keys), *(column(e, c) for c in COLUMNS)] for e in rows]
    cells = [header] + [["—" if v is None else str(v) for v in row] for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
