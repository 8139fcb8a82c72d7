"""Experiments the DVC way, for real: a two-point sweep through DVC's own queue (`lmforge sweep`), read
back with `dvc exp show` and `dvc metrics diff`, and the best one shipped only through the gate
(`dvc exp apply`, then `lmforge run`). Also: a fresh clone of this repo, `lmforge up`, `dvc repro`."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from lmforge.params_file import write_overrides
from lmforge.runs.registry import read_champion

from .conftest import TINY, lag2_corpus
from .test_e2e_data import BIN, PASSING_TRAINING, REPO, git, make_workspace, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
COMMIT = ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, s3_server, prefect_api):
    """A workspace whose champion trained 100 steps, its run record committed, then a sweep over 200 and
    400 steps, run two at a time."""
    root = tmp_path_factory.mktemp("experiments")
    ws, env, bucket = make_workspace(root / "ws", s3_server, "experiments", prefect_api)
    # one process with both ranks' batch: 100 steps see as many tokens as the gate needs
    write_overrides(ws, [*PASSING_TRAINING, "train.max_steps=100", "train.batch_size=32"])
    corpus = lag2_corpus(root / "corpus")
    first = run([BIN / "lmforge", "run", "--source", corpus], ws, env)
    assert "gate          PROMOTED" in first.stdout, first.stdout[-3000:]
    git(ws, "add", "-A")  # the run record: dvc.lock, data.dvc, metrics and the other small outputs
    git(ws, *COMMIT, "champion: 100 steps")
    champion = read_champion(s3_server.cfg.model_copy(update={"bucket": bucket}), s3_server.state)
    # both at once through DVC's queue (two queue workers), as `--jobs` promises
    sweep = run([BIN / "lmforge", "sweep", "-p", "train.max_steps=200,400", "--jobs", "2"], ws, env, timeout=1200)
    cfg = s3_server.cfg.model_copy(update={"bucket": bucket})
    return {"ws": ws, "env": env, "corpus": corpus, "sweep": sweep, "champion": champion, "cfg": cfg,
            "state": s3_server.state}  # fmt: skip


def experiments(swept) -> dict[int, dict]:
    """max_steps -> the experiment's name, rev and eval metrics, from `dvc exp show --json`."""
    shown = json.loads(run([BIN / "dvc", "exp", "show", "--json"], swept["ws"], swept["env"]).stdout)
    found = {}
    for group in (g for commit in shown for g in commit.get("experiments") or []):  # the workspace, then HEAD
        for rev in group["revs"]:
            data = rev["data"]
            steps = data["params"]["params.yaml"]["data"]["train"]["max_steps"]
            found[steps] = {"name": rev["name"], "rev": rev["rev"],
                            "metrics": data["metrics"]["artifacts/eval/metrics.json"]["data"],
                            "gate": data["metrics"]["artifacts/gate_metrics.json"]["data"]}  # fmt: skip
    return found


def test_a_sweep_records_both_experiments_in_dvc(swept):
    out = swept["sweep"].stdout
    assert "Queued experiment" in out and "train.max_steps" in out
    assert "Started '2' new experiments task queue workers." in out  # --jobs 2 reached DVC's queue
    found = experiments(swept)
    assert set(found) == {200, 400}, found
    for exp in found.values():
        assert exp["metrics"]["val_bits_per_byte"] > 0 and exp["metrics"]["train_steps"] in (200, 400)
        assert exp["gate"]["checks"] == 4  # promoted exactly when every check passed
        assert exp["gate"]["promote"] == (exp["gate"]["checks_passed"] == exp["gate"]["checks"]), exp["gate"]
    assert found[400]["metrics"]["val_bits_per_byte"] < found[200]["metrics"]["val_bits_per_byte"]
    # each experiment's gate pulled the champion from the remote and scored it on the same val text
    recorded = swept["champion"].metrics["val_bits_per_byte"]  # its own evaluate, on this same text
    for exp in found.values():
        assert exp["gate"]["champion_val_bits_per_byte"] == pytest.approx(recorded, rel=1e-5), exp["gate"]
    # lmforge sweep's own table: best first, and the way to ship it
    table = out[out.rindex("\nexperiment ") :]
    assert table.index(found[400]["name"]) < table.index(found[200]["name"])
    assert f"dvc exp apply {found[400]['name']} && lmforge run" in out

    diff = json.loads(run([BIN / "dvc", "metrics", "diff", "HEAD", found[400]["rev"], "--json"],
                          swept["ws"], swept["env"]).stdout)  # fmt: skip
    val = diff["artifacts/eval/metrics.json"]["val_bits_per_byte"]
    champion_val = swept["champion"].metrics["val_bits_per_byte"]
    assert val["old"] == champion_val and val["new"] == found[400]["metrics"]["val_bits_per_byte"]
    assert val["diff"] < 0  # 400 steps beat 100
    plots = json.loads(run([BIN / "dvc", "plots", "diff", "HEAD", found[400]["rev"], "--json"],
                           swept["ws"], swept["env"]).stdout)  # fmt: skip
    assert not plots.get("errors"), plots["errors"]
    [loss] = plots["data"]["loss"]  # the train and val series of both revisions, in one vega plot
    assert loss["revisions"] == ["HEAD", found[400]["rev"]]
    values = loss["content"]["data"]["values"]
    assert {v["rev"] for v in values} == {"HEAD", found[400]["rev"]}
    assert max(v["step"] for v in values if v["rev"] == "HEAD") == 100
    # the sweep promoted nothing, and left the workspace on the champion's params
    assert read_champion(swept["cfg"], swept["state"]) == swept["champion"]
    assert yaml.safe_load((swept["ws"] / "params.yaml").read_text())["train"]["max_steps"] == 100


def test_the_best_experiment_reaches_the_champion_only_through_the_gate(swept):
    ws, env = swept["ws"], swept["env"]
    best = experiments(swept)[400]
    run([BIN / "dvc", "exp", "apply", best["name"]], ws, env)
    shipped = run([BIN / "lmforge", "run", "--source", swept["corpus"]], ws, env)
    assert "gate          PROMOTED" in shipped.stdout, shipped.stdout[-3000:]
    champion = read_champion(swept["cfg"], swept["state"])
    assert champion.bento_tag != swept["champion"].bento_tag
    assert champion.params["train"]["max_steps"] == 400
    assert champion.metrics["val_bits_per_byte"] == best["metrics"]["val_bits_per_byte"]  # the experiment's model


def test_a_fresh_clone_runs_dvc_repro_after_lmforge_up(tmp_path, s3_server):
    """This repo as a user clones it: `lmforge up` rebuilds data/ (the builtin corpus, which data.dvc
    records and a new remote lacks), and `dvc repro` runs every stage from the committed dvc.lock. Tiny
    model params, as a user's `-p` would set them: the demo's own numbers are `make record`'s, checked by
    test_run_record, and the demo sizes on a real corpus are `make test-demo`'s tinyshakespeare run."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    if not (clone / "data.dvc").is_file():
        pytest.skip("this checkout has no committed run record")
    write_overrides(
        clone, [f"storage.endpoint_url={s3_server.cfg.endpoint_url}", "storage.bucket=fresh-clone", *TINY]
    )
    env = dict(
        os.environ, LMFORGE_STATE_DIR=str(s3_server.state), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"
    )
    env.pop("PREFECT_API_URL", None)
    up = run([BIN / "lmforge", "up"], clone, env)
    assert "data/: rebuilt from the builtin corpus" in up.stdout, up.stdout
    recorded = (clone / "data.dvc").read_text()
    run([BIN / "dvc", "repro"], clone, env, timeout=1200)
    assert (clone / "data.dvc").read_text() == recorded
    status = run([BIN / "dvc", "status", "--json"], clone, env)
    changed = json.loads(status.stdout)
    assert set(changed) <= {"base", "gate"} and all(why == ["always changed"] for why in changed.values()), status.stdout
    metrics = json.loads((clone / "artifacts" / "eval" / "metrics.json").read_text())
    assert (
        metrics["train_steps"] == 10 and 1 < metrics["val_perplexity"] < 300
    )  # the tiny params' model, vocab 300
    gate = json.loads((clone / "artifacts" / "gate_metrics.json").read_text())
    assert gate["checks"] == 4 and not gate["promote"]  # 10 steps do not beat the bigram by the margin
