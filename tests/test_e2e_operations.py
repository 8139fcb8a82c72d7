"""Operating lmforge, for real: the Prefect server that `lmforge up --prefect` starts, the flow's tasks,
logs and artifacts through its API, the UI in a headless Chromium, a no-change rerun, and cancelling a
scheduled run in the middle of training."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from infra.dvc import stage_out_md5
from lmforge.params_file import load_params, write_overrides
from lmforge.runs.contracts import Decision
from lmforge.runs.registry import read_champion

from .conftest import POOL, listening_in_tree, stop_group
from .test_e2e_data import (
    BIN,
    PASSING_TRAINING,
    api,
    bentos_in_store,
    free_port,
    run,
    summary_value,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STAGE_TASKS = {"check-storage", "ingest", "base", "validate", "preprocess", "train", "evaluate", "gate", "package", "push",
               "publish"}  # fmt: skip
ARTIFACTS = {"validation-report", "metrics", "loss-curve", "gate-decision", "comparison", "bento", "lineage"}


def flow_runs(api_url: str) -> list[dict]:
    return api(f"{api_url}/flow_runs/filter", {"sort": "START_TIME_ASC"})


def test_the_flow_run_shows_every_stage_its_logs_and_artifacts(operated):
    api_url = operated["api"]
    # `lmforge schedule --pool`, given no PREFECT_API_URL, found the workspace's server by itself
    assert f"on pool {POOL}" in operated["scheduled"].stdout
    [flow_run] = flow_runs(api_url)
    assert (flow_run["state_type"], flow_run["state_name"]) == ("COMPLETED", "Promoted")
    assert (
        flow_run["work_pool_name"] == POOL and flow_run["id"] in operated["worker_log"]
    )  # the worker ran it
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
    assert any(m.startswith("train: ") and "params trained (full, ddp), 2 x cpu" in m for m in messages), messages[:20]

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
    # the first champion has nothing to go back to: rollback refuses and changes nothing
    rolled = run([BIN / "lmforge", "rollback"], operated["ws"], operated["env"], check=False)
    assert rolled.returncode == 1 and "no earlier champion" in rolled.stderr, rolled.stderr
    assert read_champion(operated["cfg"], operated["state"]) == champion


def run_watched(cmd: list, cwd: Path, env: dict, actions: dict, on_start=None) -> tuple[int, str]:
    """Run cmd, reading its merged output line by line: the first line that holds one of the keys of
    `actions` runs that action, once (a fault the test sets right while the command waits to retry)."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines, pending = [], dict(actions)
    try:
        if on_start:
            on_start(proc)
        for line in proc.stdout:
            lines.append(line)
            for key in [k for k in pending if k in line]:
                pending.pop(key)()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines)


# The flow's real tasks, each in a flow of its own (reporting to the module's Prefect server), so that
# Prefect's own task runner does the retrying.
PUBLISH_ONLY = """
import json, sys
from pathlib import Path
from prefect import flow
from flows.retrain import publish_task
from infra.dvc import data_md5
from lmforge.params_file import load_params
from lmforge.workspace import Workspace
from lmforge.runs.contracts import Decision

ws = Workspace(Path(sys.argv[1]))
params = load_params(ws.root)
params = params.model_copy(update={"storage": params.storage.model_copy(
    update={"endpoint_url": sys.argv[2], "bucket": sys.argv[3]})})
bento = json.loads((ws.package_dir / "bento.json").read_text())
decision = Decision.load(ws.gate_file).model_copy(update={"champion": None})  # judged with no champion there

@flow(name="publish-only")
def publish_only():
    return publish_task(ws, params, data_md5(ws.root), bento, decision)

print("published", publish_only().bento_url, flush=True)
"""

INGEST_ONLY = """
import sys
from pathlib import Path
from prefect import flow
from flows.retrain import ingest_task
from lmforge.params_file import load_params
from lmforge.workspace import Workspace

ws = Workspace(Path(sys.argv[1]))

@flow(name="ingest-only")
def ingest_only():
    return ingest_task(sys.argv[2], ws, load_params(ws.root))

print("ingested", ingest_only(), flush=True)
"""


def test_publish_retries_a_storage_outage_but_never_a_lost_race(operated, tmp_path):
    """The publish task against an S3 server of its own that is down when it starts: the
    TransientStorageError is retried, and once the server is back the retry exports the Bento and makes
    it the champion there. The same decision again is a lost race (ConflictError: it was judged against no
    champion, and there is one now), which fails at once, never retried."""
    from infra.s3 import s3_client

    from .conftest import start_embedded_s3

    state = tmp_path / "s3"
    server = start_embedded_s3(state, bucket="publish-retry")
    try:
        server.stop()
        env = dict(operated["env"], PREFECT_API_URL=operated["api"], LMFORGE_STATE_DIR=str(state))
        cmd = [BIN / "python", "-c", PUBLISH_ONLY, operated["ws"], server.cfg.endpoint_url, server.cfg.bucket]
        code, out = run_watched(cmd, operated["ws"], env, {"Retry 1/2": server.start})
        assert code == 0, out[-4000:]
        assert (
            "TransientStorageError" in out
            and f"S3 endpoint {server.cfg.endpoint_url} is not reachable" in out
        )
        published = read_champion(server.cfg, state)
        bento = json.loads((operated["ws"] / "artifacts" / "package" / "bento.json").read_text())
        assert published.bento_tag == bento["bento_tag"] and f"published {published.bento_url}" in out
        key = published.bento_url.removeprefix(f"s3://{server.cfg.bucket}/")
        assert (
            s3_client(server.cfg, state).head_object(Bucket=server.cfg.bucket, Key=key)["ContentLength"] > 0
        )

        code, out = run_watched(cmd, operated["ws"], env, {})
        assert code == 1, out[-4000:]
        assert "ConflictError" in out and "the champion changed since the gate judged this model" in out
        assert "Retry 1/2" not in out
        assert read_champion(server.cfg, state) == published
    finally:
        server.stop()


def test_ingest_retries_an_os_error(operated, tmp_path):
    """The ingest task on a workspace of its own: swapping the new corpus into data/ fails with an OSError
    (a leftover directory in the way, as a crashed ingest of the same pid leaves one), the task retries,
    and with the leftover gone the retry swaps the corpus in and records it with `dvc add`."""
    from infra.dvc import data_md5
    from lmforge.workspace import Workspace
    from pipeline.ingest import ingest

    from .test_e2e_data import REPO, words_corpus

    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    write_overrides(root, ["validation.min_fraction_of_champion=0"])  # no champion to compare with
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    ws = Workspace(root)
    first, second = words_corpus(tmp_path / "first", seed=1), words_corpus(tmp_path / "second", seed=2)
    md5_first = ingest(str(first), ws, load_params(root), on_line=lambda line: None)
    leftover: list[Path] = []

    def block_the_swap(proc: subprocess.Popen) -> None:
        leftover.append(root / f".data-old-{proc.pid}")  # where replace_dir moves the old data/ aside
        (leftover[0] / "junk").mkdir(parents=True)

    env = dict(operated["env"], PREFECT_API_URL=operated["api"])
    code, out = run_watched([BIN / "python", "-c", INGEST_ONLY, root, second], root, env,
                            {"Retry 1/2": lambda: shutil.rmtree(leftover[0])}, on_start=block_the_swap)  # fmt: skip
    assert code == 0, out[-4000:]
    assert "OSError" in out and "Directory not empty" in out and "Retry 2/2" not in out
    md5 = data_md5(root)
    assert md5 != md5_first and f"ingested {md5}" in out
    assert (root / "data" / "docs.jsonl").read_bytes() == (second / "docs.jsonl").read_bytes()


def test_a_champion_bento_only_in_s3_is_imported_before_serving(operated, monkeypatch):
    """A fresh clone, or a machine whose store never had it: the champion's Bento is only in S3.
    ensure_local_bento, which `lmforge serve` calls first, imports it, with its model."""
    import bentoml
    from bentoml.exceptions import NotFound

    from lmforge.workspace import Workspace
    from pipeline.package import PackageError, ensure_local_bento

    monkeypatch.setenv("LMFORGE_STATE_DIR", str(operated["state"]))  # the S3 keys, as in the CLI's env
    ws = Workspace(operated["ws"])
    params = load_params(ws.root)
    champion = read_champion(operated["cfg"], operated["state"])
    stored = bentoml.get(champion.bento_tag)
    model_tag = stored.info.labels["model_tag"]
    bentoml.delete(champion.bento_tag)
    bentoml.models.delete(model_tag)
    with pytest.raises(NotFound):
        bentoml.get(champion.bento_tag)
    with pytest.raises(PackageError, match="is not in the local store and has no S3 copy"):
        ensure_local_bento(ws, params, champion.bento_tag, None)
    ensure_local_bento(ws, params, champion.bento_tag, champion.bento_url)
    imported = bentoml.get(champion.bento_tag)
    assert (
        imported.info.labels == stored.info.labels and imported.info.labels["data_md5"] == champion.data_md5
    )
    model = bentoml.models.get(model_tag)
    assert (Path(model.path) / "model.safetensors").is_file()
    ensure_local_bento(ws, params, champion.bento_tag, "s3://no-such-bucket/x.bento")  # there now: no fetch


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


def test_a_code_only_change_retrains_to_the_same_model_while_a_second_run_waits(operated):
    """Two `lmforge run` at once, the first after a change to the train stage's code that leaves its math
    alone: DVC reruns train, which resumes from the run's last checkpoint and exports the very model the
    champion is, so the flow ends in "No change" after the gate (nothing packaged or published). The
    second run waits for the workspace lock meanwhile, then finds nothing stale: "No change" as well."""
    ws, env, corpus = operated["ws"], operated["env"], operated["corpus"]
    champion = read_champion(operated["cfg"], operated["state"])
    bentos = bentos_in_store(env)
    train_py = ws / "pipeline" / "train.py"
    train_py.write_text(train_py.read_text() + "\n# the stage's code changed; its math did not\n")
    lock = operated["state"] / "run.lock"
    cmd = [str(c) for c in (BIN / "lmforge", "run", "--source", corpus)]
    first = subprocess.Popen(
        cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    second = None
    try:
        deadline = time.monotonic() + 300
        while not (lock.is_file() and lock.read_text().strip() == f"pid {first.pid}"):
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the workspace lock"
            time.sleep(0.05)
        second = subprocess.Popen(
            cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        out_first, _ = first.communicate(timeout=900)
        out_second, _ = second.communicate(timeout=300)
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert first.returncode == 0, out_first[-4000:]
    assert second.returncode == 0, out_second[-4000:]
    assert "Running stage 'train'" in out_first and "resuming from step_000400" in out_first
    assert "no change: same data and model as the champion" in out_first
    assert "waiting for it to finish" not in out_first
    assert (
        f"another lmforge run (pid {first.pid}) is using this workspace: waiting for it to finish"
        in out_second
    )
    assert re.findall(r"Running stage '(\w+)'", out_second) == ["base"]  # the pin alone: it always runs
    for out in (out_first, out_second):
        assert "gate          no change (the champion is this same model)" in out, out[-3000:]
    runs = flow_runs(operated["api"])[-2:]
    assert [(r["state_type"], r["state_name"]) for r in runs] == [("COMPLETED", "No change")] * 2
    tasks = api(f"{operated['api']}/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
    names = {t["name"].rsplit("-", 1)[0] for t in tasks}
    assert {"train", "gate"} <= names and not names & {"package", "push", "publish"}, names
    assert read_champion(operated["cfg"], operated["state"]) == champion
    assert bentos_in_store(env) == bentos


def test_a_smaller_vocabulary_better_per_token_but_worse_on_the_same_bytes_is_rejected(operated):
    """A challenger with a 300-token vocabulary, trained like the champion (1,024 tokens): every token is
    easier to guess, so its perplexity per token is lower, which the old per-token comparison took for
    better. Scored on the same val bytes as the champion, re-scored with its own tokenizer, it needs far
    more bits per byte: the head-to-head check rejects it, the run's state says so, and its comparison
    artifact puts the two side by side. A rejected model is never packaged."""
    champion = read_champion(operated["cfg"], operated["state"])
    ws, env = operated["ws"], operated["env"]
    pushed, bentos = remote_keys(operated), bentos_in_store(env)
    try:
        rejected = run([BIN / "lmforge", "run", "--source", operated["corpus"], "-p", "preprocess.vocab_size=300"],
                       ws, env)  # fmt: skip
    finally:
        write_overrides(ws, [*PASSING_TRAINING, "preprocess.vocab_size=1024"])
    assert "gate          REJECTED" in rejected.stdout, rejected.stdout[-2000:]
    last = flow_runs(operated["api"])[-1]
    assert (last["state_type"], last["state_name"]) == ("COMPLETED", "Rejected")
    assert "worse than the champion on the same bytes" in last["state"]["message"]
    assert read_champion(operated["cfg"], operated["state"]) == champion
    assert bentos_in_store(env) == bentos
    gate = Decision.load(ws / "artifacts" / "gate.json")
    assert gate.promote is False and gate.champion == champion
    failed = [r for r in gate.reasons if r.startswith("FAIL")]
    assert len(failed) == 1 and "worse than the champion on the same bytes" in failed[0], gate.reasons
    metrics = json.loads((ws / "artifacts" / "eval" / "metrics.json").read_text())
    assert metrics["val_perplexity"] < champion.metrics["val_perplexity"]  # better per token...
    head = gate.head_to_head["champion"]["val"]
    assert head["interval"][0] > 0.02 and head["challenger_bits_per_byte"] == metrics["val_bits_per_byte"]
    # ...worse per byte, on the same documents as the champion, which used its own 1,024 tokens for them
    assert head["other_bits_per_byte"] < metrics["val_bits_per_byte"]
    artifacts = api(
        f"{operated['api']}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [last["id"]]}}}
    )
    compared = next(a["data"] for a in artifacts if a["key"] == "comparison")
    assert compared.startswith(f"# Challenger against champion `{champion.bento_tag}`")
    row = (f"| val bits/byte vs champion | {head['challenger_bits_per_byte']} | {head['other_bits_per_byte']} "
           f"| {head['relative_difference']:+.2%} |")  # fmt: skip
    assert row in compared, compared[:2000]
    assert "![loss curves](data:image/png;base64,iVBOR" in compared
    assert champion.loss_curve[-1]["step"] == 400 and any("val_loss" in p for p in champion.loss_curve)
    # nothing was published, but the rejected run's data, checkpoints and model reached the DVC remote
    # all the same: `dvc push` is on the reject branch too, so the run can be pulled and looked into
    now = remote_keys(operated)
    assert pushed < now
    outs = [stage_out_md5(ws, "train", out) for out in ("artifacts/model", "artifacts/checkpoints")]
    for md5 in outs:
        key = f"dvc/files/md5/{md5[:2]}/{md5[2:]}"
        assert key in now and key not in pushed, key
    assert not any(k.startswith("bentos/") for k in now - pushed)


def test_a_fine_tune_of_the_champion_starts_from_the_model_in_service(operated):
    """model.base=champion: the base stage pins the champion's model md5 (artifacts/base.json), the model
    comes from the DVC remote, training starts from its weights, and evaluate scores it as the base on the
    same bytes it was promoted on. (Its gate threshold is set out of reach, so the champion stays.)"""
    import math

    from lmforge.runs.contracts import read_train_log

    champion = read_champion(operated["cfg"], operated["state"])
    ws, env = operated["ws"], operated["env"]
    threshold = load_params(ws).gate.max_val_perplexity
    overrides = ["model.base=champion", "train.max_steps=10", "gate.max_val_perplexity=1.0001"]
    try:
        tuned = run([BIN / "lmforge", "run", "--source", operated["corpus"], *(a for o in overrides for a in ("-p", o))],
                    ws, env)  # fmt: skip
    finally:
        write_overrides(ws, ["model.base=null", *PASSING_TRAINING, f"gate.max_val_perplexity={threshold}"])
    assert "gate          REJECTED" in tuned.stdout, tuned.stdout[-2000:]
    assert json.loads((ws / "artifacts" / "base.json").read_text()) == {"base": "champion", "version": champion.model_md5}
    first = read_train_log(ws / "artifacts" / "train_log.jsonl")[0]["train_loss"]
    trained_to = [p["train_loss"] for p in champion.loss_curve[-20:]]
    assert first < max(trained_to) + 0.3 < math.log(1024), (first, trained_to)  # not a random model's loss
    metrics = json.loads((ws / "artifacts" / "eval" / "metrics.json").read_text())
    assert metrics["base_val_bits_per_byte"] == pytest.approx(champion.metrics["val_bits_per_byte"], rel=1e-5)
    assert read_champion(operated["cfg"], operated["state"]) == champion


def remote_keys(operated) -> set[str]:
    """Every object in the workspace's bucket."""
    from infra.s3 import list_keys

    return set(list_keys(operated["cfg"], operated["state"], ""))


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


def rank_pid(ws: Path, rank: int) -> int | None:
    """The training rank `rank` working in this workspace (torchrun gives each its RANK)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env and f"LOCAL_RANK={rank}".encode() in env:
                if Path(os.readlink(proc / "cwd")) == ws:
                    return int(proc.name)
        except OSError:
            continue
    return None


def test_a_training_that_dies_is_retried_by_the_flow_and_resumes_from_its_checkpoint(operated):
    """With train.max_restarts 0, torchrun gives up when a rank is SIGKILLed after the run's first
    checkpoint: dvc repro train fails, Prefect retries the train task (retries=1), and the retry resumes
    from that checkpoint instead of step 0. The workspace still holds an earlier run's checkpoints (other
    params), which must neither be resumed nor push this run's own out. Trained 1,000 steps against the
    champion's 400, it is really better on the same bytes, and the default gate promotes it: the second
    champion, which the rollback test below goes back from."""
    ws, env, corpus = operated["ws"], operated["env"], operated["corpus"]
    assert list((ws / "artifacts" / "checkpoints").glob("step_*")), "an earlier run's checkpoints are there"
    changes = ["train.seed=11", "train.max_restarts=0", "train.max_steps=1000", "train.checkpoint_every=50"]
    cmd = [BIN / "lmforge", "run", "--source", corpus, *(a for o in changes for a in ("-p", o))]
    killed: list[int] = []

    def kill_a_rank_after_the_first_checkpoint() -> None:
        log = ws / "artifacts" / "train_log.jsonl"
        deadline, fresh = time.monotonic() + 600, False
        while time.monotonic() < deadline:
            steps = (
                [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.is_file() else []
            )
            fresh = fresh or not steps or steps[-1] < 60  # this run's log, not the earlier run's 400 steps
            # step 50's checkpoint is written before step 51 is logged
            if fresh and steps and steps[-1] >= 60 and (pid := rank_pid(ws, 1)):
                os.kill(pid, signal.SIGKILL)
                killed.append(steps[-1])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_rank_after_the_first_checkpoint, daemon=True)
    try:
        killer.start()
        result = run(cmd, ws, env, timeout=900)
        killer.join(5)
    finally:
        write_overrides(ws, [*PASSING_TRAINING, "train.seed=1337", "train.max_restarts=2"])
    out = result.stdout + result.stderr
    assert killed, "no rank was killed"
    assert "Retry 1/1" in out, out[-4000:]
    resumed = [
        int(line.split("resuming from step_")[1][:6])
        for line in out.splitlines()
        if "resuming from step_" in line
    ]
    assert len(resumed) == 1 and 50 <= resumed[0] <= killed[0], (resumed, killed)
    assert [
        json.loads(line)["step"] for line in (ws / "artifacts" / "train_log.jsonl").read_text().splitlines()
    ] == list(range(1, 1001))
    checkpoints = ws / "artifacts" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000950", "step_001000"]
    assert list((checkpoints / "other-runs").glob("*/step_*"))  # the earlier runs': set aside, not deleted
    # 1,000 steps against the champion's 400: really better on the same bytes, promoted by the default gate
    assert "gate          PROMOTED" in result.stdout, result.stdout[-3000:]
    head = Decision.load(ws / "artifacts" / "gate.json").head_to_head["champion"]["val"]
    assert head["interval"][1] < 0, head
    # the summary names what was promoted: the model in the DVC remote, and the Bento exported to S3
    champion = read_champion(operated["cfg"], operated["state"])
    assert champion.model_url == summary_value(result.stdout, "model in S3")
    assert summary_value(result.stdout, "Bento") == f"{champion.bento_tag}  ({champion.bento_url})"
    assert champion.bento_tag in bentos_in_store(env) and champion.lineage["data_md5"] == champion.data_md5
    last = flow_runs(operated["api"])[-1]
    tasks = api(f"{operated['api']}/task_runs/filter", {"flow_runs": {"id": {"any_": [last["id"]]}}})
    (train,) = [t for t in tasks if t["name"].startswith("train-")]
    assert (train["state_type"], train["run_count"]) == ("COMPLETED", 2)


def test_rollback_then_serve_serves_the_model_rolled_back_to(operated):
    """`lmforge rollback` makes the champion before the current one current again, and `lmforge serve`
    then serves it: its /v1/models card names that model and lineage. This machine's store no longer
    has that Bento (pruned, or a fresh clone), so serve first imports it from S3."""
    import bentoml

    from lmforge.runs.contracts import record_name
    from lmforge.runs.registry import read_history

    from .test_e2e_data import lmforge_serve

    ws, env, cfg, state = operated["ws"], operated["env"], operated["cfg"], operated["state"]
    current = read_champion(cfg, state)
    earlier = [
        r
        for r in read_history(cfg, state)
        if r.promoted_at < current.promoted_at and r.bento_tag != current.bento_tag
    ]
    assert earlier, "the retry test above promoted a second champion"
    previous = earlier[-1]
    rolled = run([BIN / "lmforge", "rollback"], ws, env)
    assert (
        f"champion is now {record_name(previous)} (rolled back from {record_name(current)})" in rolled.stdout
    )
    champion = read_champion(cfg, state)
    assert champion.bento_tag == previous.bento_tag and champion.rolled_back_from == record_name(current)

    model_tag = bentoml.get(previous.bento_tag).info.labels["model_tag"]
    bentoml.delete(previous.bento_tag)
    bentoml.models.delete(model_tag)
    with lmforge_serve(ws, env) as (reply, server, _):
        card = reply["data"][0]
        listening = listening_in_tree(server.pid)
    assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening  # loopback default
    assert card["id"] == model_tag
    assert card["lineage"] == previous.lineage
    assert card["lineage"]["params_hash"] != current.lineage["params_hash"]
    assert bentoml.get(previous.bento_tag).info.labels["model_tag"] == model_tag  # imported back


FOLLOW_PROMPTS = ["the river", "a stone and", "light on the", "where the", "and then the", "in a", "of the old",
                  "the quick"]  # fmt: skip


def test_serve_follow_switches_through_a_promotion_and_a_rollback_and_no_stream_fails(operated, tmp_path):
    """`lmforge serve --follow` serves the champion and switches to each new one without a restart. Eight
    clients (the openai SDK) stream completions the whole time, through a promotion (the registry's own
    conditional write, as a run makes it) and `lmforge rollback`. No stream fails; each names one model in
    all its chunks; /v1/models names the new champion after each switch; and the two models answer the
    same prompt differently, each always the same way, so a stream that named the wrong model would show."""
    import openai

    from lmforge.runs.registry import promote, read_history

    ws, env, cfg, state = operated["ws"], operated["env"], operated["cfg"], operated["state"]
    first = read_champion(cfg, state)  # the one the rollback test above went back to
    second = max((r for r in read_history(cfg, state) if r.bento_tag != first.bento_tag),
                 key=lambda r: r.promoted_at)  # fmt: skip
    tag_of = {r.bento_tag: bentos_model_tag(r.bento_tag) for r in (first, second)}
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [BIN / "lmforge", "serve", "--follow", "--follow-interval", "1", "--port", str(port)],
        cwd=ws, env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    streams: list[tuple[str, set[str], str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def stream_until_stopped(prompt: str) -> None:
        while not stop.is_set():
            try:
                chunks = list(client.completions.create(model="lmforge", prompt=prompt, max_tokens=16,
                                                        temperature=0, stream=True))  # fmt: skip
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                streams.append((prompt, {c.model for c in chunks}, text))
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                failures.append(f"{prompt!r}: {exc!r}")

    def answering() -> str | None:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                return json.loads(response.read())["data"][0]["id"]
        except OSError:
            return None

    def wait_until_served(bento_tag: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while answering() != tag_of[bento_tag] or not any(tag_of[bento_tag] in m for _, m, _ in streams[-8:]):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)

    clients = [threading.Thread(target=stream_until_stopped, args=(p,), daemon=True) for p in FOLLOW_PROMPTS]
    try:
        deadline = time.monotonic() + 180
        while answering() is None:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        for thread in clients:
            thread.start()
        wait_until_served(first.bento_tag)
        promote(second, cfg, state, judged_against=first)
        wait_until_served(second.bento_tag)
        rolled = run([BIN / "lmforge", "rollback"], ws, env)
        assert f"champion is now {first.bento_tag}" in rolled.stdout
        wait_until_served(first.bento_tag)
        time.sleep(1)  # streams that began on the model just retired finish
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
        stop_group(server, signal.SIGTERM, grace=30)
    out = log.read_text()
    assert not failures, failures[:5]
    assert all(len(models) == 1 for _, models, _ in streams), [m for _, m, _ in streams if len(m) != 1][:5]
    served = [next(iter(models)) for _, models, _ in streams]
    order = [tag for i, tag in enumerate(served) if i == 0 or tag != served[i - 1]]
    a, b = tag_of[first.bento_tag], tag_of[second.bento_tag]
    assert order[0] == a and b in order and order[-1] == a, order
    answers: dict[tuple[str, str], set[str]] = {}
    for prompt, models, text in streams:
        answers.setdefault((prompt, next(iter(models))), set()).add(text)
    assert all(len(texts) == 1 for texts in answers.values()), answers  # greedy: one answer per model
    differ = [p for p in FOLLOW_PROMPTS if (p, a) in answers and (p, b) in answers and answers[p, a] != answers[p, b]]
    assert len(differ) >= len(FOLLOW_PROMPTS) // 2, answers
    assert f"switching from {a} to {b}" in out and f"switching from {b} to {a}" in out, out[-3000:]


def bentos_model_tag(bento_tag: str) -> str:
    import bentoml

    return bentoml.get(bento_tag).info.labels["model_tag"]


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
        stop_group(scheduler, signal.SIGINT, grace=30)
    assert not training_processes(ws)
