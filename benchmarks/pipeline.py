"""The pipeline section: wall times of a first `lmforge run` on a fresh workspace and S3 (once), then of
a no-change `dvc repro` and a no-change `lmforge run` (REPEATS times each, interleaved).

It runs in a git copy of the project with an S3 server of its own on free ports, and none of the
caller's workspace, Prefect server or AWS account.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.harness import QUICK, REPEATS, SOURCE_ROOT, Bench, Log, figure, interleaved, quiet, side, span
from lmforge.params_file import write_overrides

CALLER_VARS = (
    "LMFORGE_ROOT",
    "PREFECT_API_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


def run(b: Bench) -> dict:
    """A first `lmforge run` on a fresh workspace, then a no-change `dvc repro` and `lmforge run`."""
    from infra.dvc import copy_project
    from infra.embedded_s3 import start_on_free_ports
    from infra.processes import bin_path, venv_env
    from lmforge.config import StorageConfig

    root, state = b.tmp / "pipeline-ws", b.tmp / "pipeline-state"
    root.mkdir()
    # a git workspace holding the project's files (the stages run the code in it), without its data
    copy_project(SOURCE_ROOT, root)
    shutil.copy2(b.source_root / "params.yaml", root / "params.yaml")
    b.log("pipeline: starting S3")
    server = start_on_free_ports(state, lambda url: StorageConfig(endpoint_url=url, bucket="lmforge-bench"))
    try:
        write_overrides(
            root,
            [
                f"storage.endpoint_url={server.cfg.endpoint_url}",
                f"storage.bucket={server.cfg.bucket}",
                "storage.embedded=true",
            ]
            + (QUICK if b.quick else []),
            b.profile,
        )
        for args in (
            ["init", "-q"],
            ["add", "-A"],
            ["-c", "user.name=bench", "-c", "user.email=bench@lmforge", "commit", "-qm", "bench"],
        ):
            subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
        env = venv_env({"LMFORGE_STATE_DIR": str(state), "BENTOML_HOME": str(state / "bentoml")})
        for var in CALLER_VARS:
            env.pop(var, None)  # nothing of the caller's workspace, Prefect server or AWS account
        lmforge = bin_path("lmforge")
        dvc_bin = bin_path("dvc")

        b.log("pipeline: first run (lmforge up; lmforge run)")
        started = time.time()
        first = timed([lmforge, "up"], root, env, b.log)[0]
        first += timed([lmforge, "run", "--source", b.source], root, env, b.log)[0]
        first_run = span(None, first, started, time.time())  # once: it needs a fresh workspace and S3
        tails = []

        def repro() -> tuple[None, float]:
            b.log("pipeline: no-change dvc repro")
            return None, timed([dvc_bin, "repro"], root, env, b.log)[0]

        def rerun() -> tuple[None, float]:
            b.log("pipeline: no-change lmforge run")
            seconds, tail = timed([lmforge, "run", "--source", b.source], root, env, b.log)
            tails.append(tail)
            return None, seconds

        repro_runs, rerun_runs = interleaved(REPEATS, repro, rerun)
    finally:
        server.stop()
    what = "first `lmforge up` + `lmforge run`"
    no_change = sum(any("no change" in line for line in tail) for tail in tails)
    return {
        "first_run": figure(
            "pipeline: quick-params first run (not the demo)"
            if b.quick
            else "pipeline: full demo (`make demo`)",
            side(what, "", [first_run]),
            note="fresh workspace and S3; in full mode this is exactly `make demo` without the venv install",
        ),
        "dvc_repro": figure(
            "pipeline: no-change `dvc repro`",
            side("dvc repro", "", repro_runs),
            note="the gate stage is always_changed, so it runs every time",
        ),
        "rerun": figure(
            "pipeline: no-change `lmforge run`",
            side("lmforge run", "", rerun_runs),
            note=f"{no_change} of {len(tails)} ended in 'no change'",
        ),
    }


def timed(cmd: list[str], cwd: Path, env: dict, log: Log) -> tuple[float, list[str]]:
    """(seconds, the last lines of output) of one command."""
    from infra.processes import stream_command

    start = time.perf_counter()
    tail = stream_command(cmd, cwd, quiet(log), env=env)
    return time.perf_counter() - start, tail
