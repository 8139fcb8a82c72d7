"""`lmforge bench --quick`: it runs, and every ratio comes from two real measurements.

No timing is asserted: the figures depend on the machine and its load. What is checked is that each
side of each ratio was timed and did work, that the ratio is recomputable from those raw numbers, and
that the table lists every figure. The pipeline section (its own S3, two `lmforge run`s) is skipped here;
test_e2e_* cover the flow itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [BIN / "lmforge", "bench", "--quick", "--skip-pipeline", "--out", str(out)],
        cwd=REPO,
        env=dict(os.environ, LMFORGE_ROOT=str(REPO)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def figures(results: dict) -> dict[str, dict]:
    return {f"{s}.{k}": f for s, section in results["sections"].items() for k, f in section.items()}


def test_sections_ran_and_the_machine_is_recorded(results):
    data, _ = results
    assert set(data["sections"]) == {"validate", "preprocess", "train", "serve"}
    assert data["skipped"] == {"pipeline": "--skip-pipeline"}
    assert data["mode"] == "quick"
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1
    assert machine["torch"] and machine["date"]
    expected = {
        "preprocess.encode", "train.tokens_per_s", "train.mfu", "train.bare_mfu",
        "serve.score", "serve.decode", "serve.first_token", "serve.clients_4", "serve.clients_16",
        "validate.throughput", "validate.peak_rss", "validate.preprocess_rss",
    }  # fmt: skip
    assert expected <= set(figures(data))


def test_every_ratio_comes_from_two_measured_sides(results):
    data, _ = results
    ratios = {name: f for name, f in figures(data).items() if f["ratio"] is not None}
    assert len(ratios) >= 7
    for name, f in ratios.items():
        lm, base = f["lmforge"], f["baseline"]
        for s in (lm, base):
            assert s["seconds"] > 0 and s["amount"] > 0, (name, s)
            assert math.isclose(s["rate"], s["amount"] / s["seconds"]), (name, s)
        # two separate measurements, not one number reused or a constant
        assert (lm["amount"], lm["seconds"]) != (base["amount"], base["seconds"]), name
        assert lm["seconds"] != base["seconds"], name
        recomputed = (lm["amount"] / lm["seconds"]) / (base["amount"] / base["seconds"])
        assert math.isclose(f["ratio"], recomputed, rel_tol=1e-9), name
        if f["target"]:
            assert f["target"]["of"] == "ratio" and f["met"] == (f["ratio"] >= f["target"]["value"]), name


def test_timings_without_a_ratio_are_measured_too(results):
    data, _ = results
    first_token = figures(data)["serve.first_token"]
    assert first_token["lmforge"]["seconds"] > 0 and first_token["baseline"]["seconds"] > 0
    # the validate rows ran on the bench's own large corpus, and read every document of it
    validate = figures(data)["validate.throughput"]
    assert validate["detail"]["bytes"] >= 32 << 20
    assert f"{validate['detail']['documents']:,} documents read" in validate["note"]
    for name in ("validate.peak_rss", "validate.preprocess_rss"):
        assert figures(data)[name]["detail"]["rss_bytes"] > 50 << 20, name  # a Python process with numpy


def test_same_work_on_both_sides(results):
    data, _ = results
    f = figures(data)
    assert f["preprocess.encode"]["detail"]["same_tokens"]
    # the stage and the bare loop trained the same number of steady-state tokens
    assert f["train.tokens_per_s"]["lmforge"]["amount"] == f["train.tokens_per_s"]["baseline"]["amount"]
    # greedy decoding of the same model: the service and model.generate produce the same tokens
    assert f["serve.decode"]["lmforge"]["amount"] == f["serve.decode"]["baseline"]["amount"]


def test_the_markdown_table_lists_every_figure(results):
    data, table = results
    assert "| measurement | lmforge | baseline | ratio | target | met? |" in table
    for f in figures(data).values():
        assert f"| {f['measurement']} |" in table
    assert "pipeline: skipped (--skip-pipeline)" in table
