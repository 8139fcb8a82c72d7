"""Storage faults: the S3 server dies in the middle of the flow's `dvc push`.

The server here is a SeaweedFS of this test's own (the session one is shared), SIGKILLed the moment
the first checkpoint object lands in the remote: a crash, not a clean shutdown.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from infra.s3 import ensure_embedded_credentials, s3_client
from lmforge.params_file import load_params, write_overrides
from lmforge.runs.registry import read_champion

from .conftest import S3Server, lag2_corpus, start_embedded_s3
from .test_e2e_data import BIN, PASSING_TRAINING, git, make_workspace, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Wider than the other e2e tests' model and 20 checkpoints kept: ~80 MB in 40 files, so the push takes
# long enough to be caught in the middle; one layer keeps the training itself short.
BIG_PUSH = [*PASSING_TRAINING, "model.n_embd=128", "train.checkpoint_every=20", "train.keep_checkpoints=20"]


def objects(server: S3Server) -> int:
    # polled every 50 ms while a push loads the server: a reset connection is retried (boto's standard
    # mode), so that only the kill below, not a busy moment, ends a poll
    client = s3_client(server.cfg, server.state, attempts=3, read_timeout=5)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=server.cfg.bucket)
    return sum(page.get("KeyCount", 0) for page in pages)


def lock_outs(ws: Path) -> dict[str, str]:
    """Every cached out that dvc.lock names, with its md5 (files and .dir listings alike). Outs with
    `cache: false` (reports, metrics) are not in the remote by design: git would carry them."""
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    uncached = {
        path
        for stage in stages.values()
        for entry in stage.get("outs", []) + stage.get("metrics", [])
        if isinstance(entry, dict)
        for path, opts in entry.items()
        if opts.get("cache") is False
    }
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
    return {out["path"]: out["md5"] for out in outs if out["path"] not in uncached}


def tree_md5s(root: Path, rel: str) -> dict[str, str]:
    path = root / rel
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def pipeline_changes(ws: Path, env: dict) -> dict:
    """`dvc status` of the workspace, less the stages that always run (the base's pin and the gate: both
    read what lives outside DVC)."""
    status = json.loads(run([BIN / "dvc", "status", "--json"], ws, env).stdout or "{}")
    return {stage: why for stage, why in status.items() if why != ["always changed"]}


@pytest.fixture
def own_s3(tmp_path):
    server = start_embedded_s3(tmp_path / "state", bucket="lmforge-faults")
    try:
        yield S3Server(
            server.cfg, tmp_path / "state", ensure_embedded_credentials(tmp_path / "state"), server
        )
    finally:
        server.stop()


def test_s3_killed_mid_push_then_a_rerun_completes_and_a_clone_pulls_exactly_the_lock(
    own_s3, prefect_api, tmp_path
):
    (tmp_path / "ws").mkdir()
    ws, env, bucket = make_workspace(tmp_path / "ws", own_s3, "faults", prefect_api)
    own_s3 = S3Server(
        own_s3.cfg.model_copy(update={"bucket": bucket}), own_s3.state, own_s3.creds, own_s3.server
    )
    write_overrides(ws, BIG_PUSH)
    corpus = lag2_corpus(tmp_path / "corpus")
    assert not (ws / "artifacts" / "gate.json").exists()  # a fresh workspace: no earlier run's gate
    log = (tmp_path / "run1.log").open("w")
    proc = subprocess.Popen(
        [BIN / "lmforge", "run", "--source", corpus], cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        # the flow pushes only after the gate: the first objects in the bucket after it are the push
        # starting. Until the gate's file appears, a cheap file check, not a listing every 50 ms.
        baseline = objects(own_s3)
        deadline = time.time() + 900

        def wait_while_running(done, interval: float, what: str) -> None:
            while not done():
                assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-4000:]
                assert time.time() < deadline, what
                time.sleep(interval)

        wait_while_running((ws / "artifacts" / "gate.json").is_file, 0.2, "the gate never ran")
        wait_while_running(lambda: objects(own_s3) > baseline, 0.05, "the push never started")
        killed_at = objects(own_s3)
        os.killpg(own_s3.server.pid(), signal.SIGKILL)  # the server crashes mid-push
        own_s3.server.stop()  # clears the pidfile and sockets of the dead server
        proc.wait(timeout=600)  # the push task retries against the dead server, then the run fails
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "run1.log").read_text()
    assert proc.returncode == 1, out[-4000:]
    assert "Task run failed" in out and "Retry 1/3" in out, out[-4000:]  # the push task retried
    assert "PROMOTED" not in out and "promoted:" not in out

    # Nothing half-written: dvc.lock is whole and matches the workspace, there is no champion
    lock = lock_outs(ws)
    assert {"artifacts/model", "artifacts/checkpoints", "artifacts/shards"} <= set(lock)
    assert pipeline_changes(ws, env) == {}
    own_s3.server.start()
    assert objects(own_s3) >= killed_at  # what reached the server before the crash survived it
    params = load_params(ws)
    assert read_champion(params.storage, own_s3.state) is None

    # with the server back, a rerun pushes the rest and promotes, without training again
    result = run([BIN / "lmforge", "run", "--source", corpus], ws, env, timeout=900)
    assert "PROMOTED" in result.stdout, result.stdout[-3000:]
    assert "is up to date" in result.stdout + result.stderr
    assert lock_outs(ws) == lock  # the same model, not a new one
    champion = read_champion(params.storage, own_s3.state)
    assert champion.model_md5 == lock["artifacts/model"]
    assert objects(own_s3) > killed_at  # the crash really was mid-push: the rerun had more to send

    # a fresh clone at this commit pulls exactly what dvc.lock names
    git(ws, "add", "dvc.lock", "data.dvc", "params.yaml")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "trained")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ws), str(clone))
    shutil.copy(ws / ".dvc" / "config.local", clone / ".dvc" / "config.local")  # the keys: never in git
    run([BIN / "dvc", "pull"], clone, env, timeout=600)
    assert lock_outs(clone) == lock
    for rel in lock:
        assert tree_md5s(clone, rel) == tree_md5s(ws, rel), rel
    # and the remote holds everything this commit names: nothing is missing or only local
    cloud = run([BIN / "dvc", "status", "--cloud", "--json"], clone, env)
    assert json.loads(cloud.stdout or "{}") == {}, cloud.stdout
