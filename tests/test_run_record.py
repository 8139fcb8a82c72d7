"""The run record in git (dvc.lock, data.dvc, the small outputs) is the record of this very code: a
commit that changes a stage's code or params without re-recording fails here, naming what is stale.
Re-record with `make record` (the demo in a fresh clone of HEAD, its record copied back)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "dvc.lock"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # DVC 3's file hash: the bytes as they are


def load(path: Path):
    return YAML(typ="safe").load(path.read_text())  # YAML 1.2, as DVC reads it (6e-05 is a float)


def lookup(params: dict, dotted: str):
    value = params
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.fixture(scope="module")
def lock() -> dict:
    if not LOCK.is_file():
        pytest.skip("no dvc.lock in this checkout")
    return load(LOCK)["stages"]


def test_dvc_lock_records_this_code_and_these_params(lock):
    params = load(REPO / "params.yaml")
    stale = []
    for stage, entry in lock.items():
        for dep in entry.get("deps", []):
            path = REPO / dep["path"]
            if dep["path"].startswith("pipeline/") and md5(path) != dep["md5"]:
                stale.append(f"{stage}: {dep['path']} changed")
        for key, value in (entry.get("params") or {}).get("params.yaml", {}).items():
            if lookup(params, key) != value:
                stale.append(f"{stage}: param {key} changed")
    assert not stale, "dvc.lock is stale (re-record with `make record`): " + "; ".join(stale)


def test_the_small_outputs_in_git_are_the_ones_dvc_lock_records(lock):
    recorded = [
        out for entry in lock.values() for out in entry.get("outs", []) if (REPO / out["path"]).is_file()
    ]
    small = {o["path"] for o in recorded}
    assert {"artifacts/eval/metrics.json", "artifacts/gate_metrics.json", "artifacts/validation/report.json",
            "artifacts/eval/loss_curve.json"} <= small, small  # fmt: skip
    for out in recorded:
        assert md5(REPO / out["path"]) == out["md5"], f"{out['path']} is not the output dvc.lock records"
    data = load(REPO / "data.dvc")["outs"][0]["md5"]
    assert all(d["md5"] == data for e in lock.values() for d in e.get("deps", []) if d["path"] == "data")


def test_the_recorded_demo_run_beat_the_bigram_and_was_promoted(lock):
    """The demo profile learns: the recorded run of this very code (the test above checks that) beat
    the bigram by the gate's margin on held-out val data, under the absolute bound, and was promoted.
    `make test-demo` checks the same profile on tinyshakespeare."""
    metrics = json.loads((REPO / "artifacts" / "eval" / "metrics.json").read_text())
    params = load(REPO / "params.yaml")
    gate = params["gate"]
    assert metrics["val_perplexity"] <= (1 - gate["min_gain_over_bigram"]) * metrics["bigram_val_perplexity"]
    assert metrics["val_perplexity"] <= gate["max_val_perplexity"]
    assert metrics["val_bits_per_byte"] < metrics["bigram_val_bits_per_byte"]  # the same, in bits per byte
    assert metrics["train_steps"] == params["train"]["max_steps"]
    decision = json.loads((REPO / "artifacts" / "gate.json").read_text())
    assert decision["promote"] is True and decision["challenger"]["val_perplexity"] == metrics["val_perplexity"]
