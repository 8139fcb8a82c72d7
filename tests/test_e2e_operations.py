"""Operating lmforge, for real: the Prefect server that `lmforge up --prefect` starts, the flow's tasks,
logs and artifacts through its API, the UI in a headless Chromium, a no-change rerun, and cancelling a
scheduled run in the middle of training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from infra.prefect_server import PrefectServer
from infra.processes import port_is_free
from pipeline.config import PrefectConfig, load_params, write_overrides
from pipeline.registry import read_champion

from .conftest import lag2_corpus, listening_in_tree
from .test_e2e_data import BIN, PASSING_TRAINING, api, free_port, make_workspace, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STAGE_TASKS = {"check-storage", "ingest", "validate", "preprocess", "train", "evaluate", "gate", "package", "push",
               "publish"}  # fmt: skip
ARTIFACTS = {"validation-report", "metrics", "loss-curve", "gate-decision", "comparison", "bento", "lineage"}


@pytest.fixture(scope="module")
def operated(tmp_path_factory, s3_server):
    """A workspace with its own Prefect server (started by `lmforge up --prefect`) and one promoted run."""
    root = tmp_path_factory.mktemp("operated")
    ws, env, bucket = make_workspace(root / "ws", s3_server, "operated")
    env = dict(env, PREFECT_HOME=str(root / "prefect"))  # its own database: only this module's runs
    port = free_port()
    write_overrides(ws, [f"prefect.port={port}", *PASSING_TRAINING])
    up = run([BIN / "lmforge", "up", "--prefect"], ws, env)
    assert f"Prefect started at http://127.0.0.1:{port}" in up.stdout
    server = PrefectServer(PrefectConfig(port=port), s3_server.state)
    listening = listening_in_tree(server.pid())
    assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening  # loopback default
    corpus = lag2_corpus(root / "corpus")
    try:
        first = run([BIN / "lmforge", "run", "--source", corpus], ws, env)
        yield {"ws": ws, "env": env, "bucket": bucket, "api": server.api_url, "corpus": corpus, "first": first,
               "cfg": s3_server.cfg.model_copy(update={"bucket": bucket}), "state": s3_server.state}  # fmt: skip
    finally:
        server.stop()
    assert server.pid() is None and port_is_free(port)


def flow_runs(api_url: str) -> list[dict]:
    return api(f"{api_url}/flow_runs/filter", {"sort": "START_TIME_ASC"})


def test_the_flow_run_shows_every_stage_its_logs_and_artifacts(operated):
    api_url = operated["api"]
    assert "gate          PROMOTED" in operated["first"].stdout  # no PREFECT_API_URL given: found by the CLI
    [flow_run] = flow_runs(api_url)
    assert (flow_run["state_type"], flow_run["state_name"]) == ("COMPLETED", "Promoted")
    champion = read_champion(operated["cfg"], operated["state"])
    assert {f"data:{champion.data_md5[:12]}", f"params:{champion.lineage['params_hash']}",
            "profile:demo"} <= set(flow_run["tags"]), flow_run["tags"]  # fmt: skip
    tasks = api(f"{api_url}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    assert {t["name"].rsplit("-", 1)[0] for t in tasks} == STAGE_TASKS
    assert all(t["state_type"] == "COMPLETED" for t in tasks)

    # torchrun's own output, line by line, in the train task's logs
    train_task = next(t for t in tasks if t["name"].startswith("train-"))
    logs = api(
        f"{api_url}/logs/filter", {"logs": {"task_run_id": {"any_": [train_task["id"]]}}, "limit": 200}
    )
    messages = [entry["message"] for entry in logs]
    assert any(m.startswith("train: ") and "params, 2 x cpu" in m for m in messages), messages[:20]

    artifacts = api(f"{api_url}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    by_key = {a["key"]: a for a in artifacts}
    assert set(by_key) == ARTIFACTS
    assert by_key["loss-curve"]["data"].startswith(
        "![training and validation loss](data:image/png;base64,iVBOR"
    )
    assert by_key["metrics"]["type"] == "table"
    rows = json.loads(by_key["metrics"]["data"])
    assert rows[0]["split"] == "val" and rows[0]["model"] < rows[0]["bigram"]
    champion = read_champion(operated["cfg"], operated["state"])
    assert champion.flow_run_id == flow_run["id"]
    assert champion.bento_tag in by_key["bento"]["data"] and champion.bento_tag in by_key["lineage"]["data"]
    assert flow_run["id"] in by_key["lineage"]["data"] and champion.data_md5 in by_key["lineage"]["data"]
    assert "# Gate: PROMOTE" in by_key["gate-decision"]["data"]
    assert by_key["comparison"]["data"].startswith("# No champion yet")
    assert "![loss curves](data:image/png;base64,iVBOR" in by_key["comparison"]["data"]


def test_a_rerun_on_unchanged_data_is_a_quick_no_change(operated):
    champion = read_champion(operated["cfg"], operated["state"])
    start = time.monotonic()
    again = run([BIN / "lmforge", "run", "--source", operated["corpus"]], operated["ws"], operated["env"])
    elapsed = time.monotonic() - start
    assert "no change" in again.stdout
    assert read_champion(operated["cfg"], operated["state"]) == champion  # nothing re-promoted
    last = flow_runs(operated["api"])[-1]
    assert (last["state_type"], last["state_name"]) == ("COMPLETED", "No change")
    assert elapsed < 30, f"the no-change rerun took {elapsed:.1f} s"


def test_a_rejected_challenger_ends_in_a_state_named_rejected_with_a_comparison(operated):
    """A 40-step challenger loses to the 400-step champion: the run's state says so, and its comparison
    artifact puts the two side by side."""
    champion = read_champion(operated["cfg"], operated["state"])
    ws, env = operated["ws"], operated["env"]
    short = ["train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=40"]
    try:
        rejected = run([BIN / "lmforge", "run", "--source", operated["corpus"], *(a for o in short for a in ("-p", o))],
                       ws, env)  # fmt: skip
    finally:
        write_overrides(ws, PASSING_TRAINING)
    assert "gate          REJECTED" in rejected.stdout, rejected.stdout[-2000:]
    last = flow_runs(operated["api"])[-1]
    assert (last["state_type"], last["state_name"]) == ("COMPLETED", "Rejected")
    assert "FAIL: val perplexity" in last["state"]["message"]
    assert read_champion(operated["cfg"], operated["state"]) == champion
    artifacts = api(
        f"{operated['api']}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [last["id"]]}}}
    )
    compared = next(a["data"] for a in artifacts if a["key"] == "comparison")
    assert compared.startswith(f"# Challenger against champion `{champion.bento_tag}`")
    challenger = json.loads((ws / "artifacts" / "eval" / "metrics.json").read_text())["val_perplexity"]
    assert challenger > champion.metrics["val_perplexity"]
    assert f"| val_perplexity | {challenger} | {champion.metrics['val_perplexity']} |" in compared
    assert "![loss curves](data:image/png;base64,iVBOR" in compared
    assert champion.loss_curve[-1]["step"] == 400 and any("val_loss" in p for p in champion.loss_curve)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def page_text(browser: str, url: str, want: str, profile: Path, timeout: float = 60) -> str:
    """The visible text of url in headless Chromium, once it shows `want` (or at the timeout).

    Driven over the DevTools protocol: the Prefect UI is a single-page app that fetches the run after
    loading, so a one-shot --dump-dom would see an empty shell.
    """
    from websockets.sync.client import connect

    port = free_port()
    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                    targets = json.loads(response.read())
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "Chromium did not start"
                time.sleep(0.2)
        target = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(target, max_size=None) as cdp:
            cdp.send(json.dumps({"id": 1, "method": "Page.navigate", "params": {"url": url}}))
            text, request, deadline = "", 1, time.time() + timeout
            while want not in text and time.time() < deadline:
                time.sleep(0.5)
                request += 1
                expression = "document.body ? document.body.innerText : ''"
                cdp.send(json.dumps({"id": request, "method": "Runtime.evaluate",
                                     "params": {"expression": expression, "returnByValue": True}}))  # fmt: skip
                while (reply := json.loads(cdp.recv())).get("id") != request:
                    pass
                text = reply["result"]["result"].get("value") or ""
            return text
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_prefect_ui_shows_the_flow_run_in_a_real_browser(operated, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed and could not be installed here (`make test` tries apt-get)")
    flow_run = flow_runs(operated["api"])[0]
    page = operated["api"].removesuffix("/api") + f"/runs/flow-run/{flow_run['id']}"
    text = page_text(browser, page, flow_run["name"], tmp_path / "chromium")
    # the state is named for the outcome, and the tags say what the run trained on
    assert flow_run["name"] in text and "Promoted" in text and "profile:demo" in text, text[:1000]
    assert "Can't connect to Server API" not in text


def test_concurrent_runs_wait_for_the_workspace_lock(operated):
    from infra.dvc import WorkspaceBusy, workspace_lock

    holder = subprocess.Popen(
        [BIN / "python", "-c", "import sys, time; from pathlib import Path; "
         "from infra.dvc import workspace_lock\n"
         "with workspace_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
         str(operated["state"])],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy, match=rf"another lmforge run \(pid {holder.pid}\)"):
            with workspace_lock(operated["state"], wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(operated["state"], wait=False):  # released when its holder died
        pass


def training_processes(ws: Path) -> list[int]:
    """torchrun and its ranks working in this workspace."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"pipeline.train" in cmdline and Path(os.readlink(proc / "cwd")) == ws:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_cancelling_a_scheduled_run_stops_every_rank(operated):
    ws, env, api_url = operated["ws"], operated["env"], operated["api"]
    write_overrides(ws, ["train.max_steps=100000", "train.checkpoint_every=1000", "train.eval_every=1000"])
    params = load_params(ws)
    scheduler = subprocess.Popen(
        [BIN / "lmforge", "schedule", "--cron", "0 3 * * *", "--source", str(operated["corpus"])],
        cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (deployments := api(f"{api_url}/deployments/filter")):
            assert scheduler.poll() is None and time.time() < deadline, scheduler.stdout.read()[-3000:]
            time.sleep(1)
        [deployment] = deployments
        assert deployment["name"] == params.prefect.deployment
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        flow_run = api(f"{api_url}/deployments/{deployment['id']}/create_flow_run", {})
        deadline = time.time() + 300
        while len(training_processes(ws)) < 3:  # torchrun and both ranks are up
            assert scheduler.poll() is None and time.time() < deadline, scheduler.stdout.read()[-3000:]
            time.sleep(0.5)
        time.sleep(3)  # mid-training
        api(f"{api_url}/flow_runs/{flow_run['id']}/set_state",
            {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})  # fmt: skip
        deadline = time.time() + 30
        while training_processes(ws):
            assert time.time() < deadline, f"still running 30 s after the cancel: {training_processes(ws)}"
            time.sleep(0.5)
        deadline = time.time() + 60
        while (
            state := api(f"{api_url}/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})[0][
                "state_type"
            ]
        ) not in ("CANCELLED", "CRASHED", "FAILED"):
            assert time.time() < deadline, f"flow run still {state}"
            time.sleep(1)
        assert state == "CANCELLED"
    finally:
        os.killpg(scheduler.pid, signal.SIGINT)
        try:
            scheduler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(scheduler.pid, signal.SIGKILL)
    assert not training_processes(ws)
