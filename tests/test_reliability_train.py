"""Training faults: a killed rank, a damaged checkpoint, and bad params that must fail before any process starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from infra.processes import descendants
from lmforge.config import ConfigError
from lmforge.params_file import resolve_params, write_overrides
from lmforge.training.throughput import measure_matmul_flops
from lmforge.workspace import Workspace
from pipeline.train import truncate_log
from tests.test_train import _launch

BIN = Path(sys.executable).parent

# ---------------------------------------------------------------------------------------------
# helpers


def _log(ws: Workspace) -> list[dict]:
    return [json.loads(line) for line in ws.train_log.read_text().splitlines()]


def _final_val_loss(ws: Workspace) -> float:
    last = _log(ws)[-1]
    assert "val_loss" in last, last  # the last step is always evaluated
    return last["val_loss"]


def _rank_pid(launcher: subprocess.Popen, rank: int, local_rank: int | None = None) -> int | None:
    """The pid of one torchrun worker, found by its RANK (and LOCAL_RANK, the same on one node) in the
    environment."""
    local_rank = rank if local_rank is None else local_rank
    for pid in descendants(launcher.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and f"LOCAL_RANK={local_rank}".encode() in env:
            return pid
    return None


def _wait_for_checkpoints(ws: Workspace, proc: subprocess.Popen, count: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(list(ws.checkpoints_dir.glob("step_*"))) < count:
        assert proc.poll() is None, (
            f"training ended before {count} checkpoints:\n" + proc.stdout.read()[-3000:]
        )
        assert time.time() < deadline, f"no {count} checkpoints after {timeout} s"
        time.sleep(0.02)


def _kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher, torchrun and every rank at once (listed first: orphans cannot be found)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            _kill_everything(proc)
    return out


# ---------------------------------------------------------------------------------------------
# 1. one rank SIGKILLed mid-run: torchrun restarts, the run resumes and ends where it would have

KILL_RUN = [
    "train.nproc_per_node=2",
    "train.max_steps=300",
    "train.checkpoint_every=25",
    "train.eval_every=100",
    "train.max_restarts=2",
    # dropout makes the result depend on the restored RNG state, not only on weights and optimizer
    "model.dropout=0.1",
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_killed_rank_restarts_and_resumes(tiny_workspace, strategy):
    """fsdp: every rank reloads its own shards of the weights and optimizer from the sharded checkpoint."""
    ws, _ = tiny_workspace
    write_overrides(ws.root, [*KILL_RUN, f"train.strategy={strategy}"])

    # The reference: the same params and seed, never interrupted.
    proc = _launch(ws, start_new_session=True)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    reference_log = _log(ws)
    reference = _final_val_loss(ws)
    for path in (ws.checkpoints_dir, ws.model_dir):
        shutil.rmtree(path)
    ws.train_log.unlink()

    proc = _launch(ws, start_new_session=True)
    try:
        _wait_for_checkpoints(ws, proc, 1)
        victim = _rank_pid(proc, 1)
        assert victim is not None, "no rank 1 worker found"
        os.kill(victim, signal.SIGKILL)  # one rank dies mid-run
    finally:
        out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from step_" in out
    steps = [r["step"] for r in _log(ws)]
    assert steps == list(range(1, 301))  # one continuous curve: no gap, no repeated steps
    assert (ws.model_dir / "model.safetensors").is_file()

    resumed = _final_val_loss(ws)
    relative = abs(resumed - reference) / reference
    print(
        f"final val loss: uninterrupted {reference}, killed and resumed {resumed}, relative difference {relative:.2e}"
    )
    assert relative < 0.02
    # Stronger than the promise: batches, Adam moments, schedule and RNG all came back, so the resumed
    # curve retraces the reference one (to float noise of the all-reduce).
    assert [r["train_loss"] for r in _log(ws)] == pytest.approx(
        [r["train_loss"] for r in reference_log], abs=1e-3
    )


# ---------------------------------------------------------------------------------------------
# 2. two nodes on this machine: docs/scaling.md's two-machine commands, one process per node

TWO_NODES = [
    "train.nnodes=2",
    "train.nproc_per_node=1",
    "train.rdzv_id=two-nodes",
    "train.max_steps=200",
    "train.checkpoint_every=20",
    "train.eval_every=100",
    "train.max_restarts=2",
]


@pytest.mark.slow
def test_two_nodes_train_together_and_both_resume_when_one_loses_its_rank(tiny_workspace, tmp_path):
    """Two torchrun agents, each started as a node runs it (`python -m pipeline.train` on the same
    workspace and params), meet at a c10d rendezvous on 127.0.0.1 and train as ranks 0 and 1, sharing
    the checkpoint directory. The second node's rank is SIGKILLed mid-run: both agents restart their
    workers, which resume from the shared checkpoint, and finish with the same weights on both ranks."""
    from .conftest import free_port

    ws, _ = tiny_workspace
    write_overrides(ws.root, [*TWO_NODES, f"train.rdzv_endpoint=127.0.0.1:{free_port()}"])
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    env = dict(os.environ, LMFORGE_ROOT=str(ws.root), PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
    nodes = [
        subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=ws.root, env=env,
                         stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        for log in logs
    ]  # fmt: skip
    try:
        deadline = time.time() + 300
        while not list(ws.checkpoints_dir.glob("step_*")):
            assert all(n.poll() is None for n in nodes), [log.read_text()[-2000:] for log in logs]
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        [victim] = [pid for node in nodes if (pid := _rank_pid(node, rank=1, local_rank=0))]
        os.kill(victim, signal.SIGKILL)
        for node in nodes:
            node.wait(timeout=600)
    finally:
        for node in nodes:
            if node.poll() is None:
                _kill_everything(node)
    outs = [log.read_text() for log in logs]
    assert [n.returncode for n in nodes] == [0, 0], [out[-3000:] for out in outs]
    both = "".join(outs)
    assert sum("failed (exitcode: -9)" in out for out in outs) == 1  # the killed rank's agent saw it die
    # rank 0, on the other node, was restarted too: it started twice, and the second time resumed
    assert both.count("params trained (full, ddp), 2 x cpu") == 2 and "resuming from step_" in both, both[-3000:]
    assert [r["step"] for r in _log(ws)] == list(range(1, 201))  # one curve: no gap, no repeat
    summary = json.loads((ws.model_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    first, second = summary["rank_weight_checksums"]
    assert first == second  # the ranks on the two nodes ended with the same weights


# ---------------------------------------------------------------------------------------------
# 3. the newest checkpoint is damaged (a kill or a full disk mid-write): fall back to the one before

CORRUPT_RUN = [
    "train.nproc_per_node=2",
    "train.max_steps=150",
    "train.checkpoint_every=10",
    "train.eval_every=50",
    "train.keep_checkpoints=100",  # nothing is pruned while the test picks the latest two
    "train.max_restarts=0",
]


@pytest.mark.slow
def test_truncated_latest_checkpoints_resume_from_the_newest_whole_one(tiny_workspace):
    """The newest checkpoint's weights and the one before's optimizer state (state.pt) are both cut in
    half: each is named unreadable in turn, and the run resumes from the third newest."""
    ws, _ = tiny_workspace
    write_overrides(ws.root, CORRUPT_RUN)
    proc = _launch(ws, start_new_session=True)
    try:
        _wait_for_checkpoints(ws, proc, 3)
    finally:
        _kill_everything(proc)  # the whole tree at once, as a power cut or an OOM-killed job would
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    *_, whole, previous, latest = sorted(ws.checkpoints_dir.glob("step_*"))
    for target in (latest / "model.safetensors", previous / "state.pt"):
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])

    proc = _launch(ws, start_new_session=True)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert f"checkpoint {latest.name} is unreadable" in out, out[-3000:]
    assert f"checkpoint {previous.name} is unreadable" in out, out[-3000:]
    assert f"resuming from {whole.name}" in out
    assert [r["step"] for r in _log(ws)] == list(range(1, 151))  # continuous: no gap, no repeat
    assert (ws.model_dir / "model.safetensors").is_file()


def test_throughput_probe_leaves_the_global_rng_alone():
    # It runs after a resume restored the RNG: drawing from it shifted every later dropout mask
    # (measured: val loss 5.7e-4 off the uninterrupted run with dropout 0.1; now bit-identical).
    torch.manual_seed(0)
    before = torch.get_rng_state()
    measure_matmul_flops(torch.device("cpu"), size=64, repeats=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_truncate_log_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "train_lo')
    truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


# ---------------------------------------------------------------------------------------------
# 4. out-of-range params: rejected at load with the key path, before any process starts

BAD_PARAMS = [
    (["train.batch_size=0"], "train.batch_size"),
    (["train.lr=-1"], "train.lr"),
    (["train.lr=.nan"], "train.lr"),
    (["train.lr=.inf"], "train.lr"),
    (["train.min_lr=.nan"], "train.min_lr"),
    (["train.weight_decay=.inf"], "train.weight_decay"),  # had no upper bound: inf passed before
    (["train.grad_clip=.nan"], "train.grad_clip"),
    (["train.nproc_per_node=0"], "train.nproc_per_node"),
    (["train.grad_accum=0"], "train.grad_accum"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.min_lr=0.1", "train.lr=0.01"], "min_lr (0.1) exceeds lr (0.01)"),
    (["model.dropout=-0.1"], "model.dropout"),
    (["model.dropout=.nan"], "model.dropout"),
    (["model.block_size=4"], "model.block_size"),
    (["evaluate.temperature=.inf"], "evaluate.temperature"),  # inf passed before
    (["evaluate.smoothing_k=.nan"], "evaluate.smoothing_k"),
    (["evaluate.prompts=['']"], "evaluate.prompts"),
    (
        ["evaluate.max_new_tokens=128"],
        "evaluate.max_new_tokens (128) leaves no room for a prompt in model.block_size",
    ),
    (["preprocess.val_fraction=.nan"], "preprocess.val_fraction"),
    # no gate check may be switched off by an infinite bound, in either of YAML's spellings
    (["gate.max_val_perplexity=inf"], "gate.max_val_perplexity: Input should be a finite number"),
    (["gate.champion_tolerance=.inf"], "gate.champion_tolerance: Input should be a finite number"),
    (["gate.max_contamination=.nan"], "gate.max_contamination: Input should be a finite number"),
    (["gate.tasks=[{file: t.yaml, metric: acc, max_drop: .inf}]"], "gate.tasks.0.max_drop: Input should be a finite"),
    (["gate.tasks=[{file: t.yaml, metric: acc}]"], "give max_drop (against the champion), threshold, or both"),
    (["storage.region=us-east-1", "prefect.port=.inf"], "prefect.port"),
    (["serve.default_max_new_tokens=300"], "default_max_new_tokens (300) exceeds max_new_tokens_cap"),
    (["train.strategy=fsdp", "train.nproc_per_node=1"], "strategy fsdp shards the model across ranks: it needs"),
    (["train.strategy=zero3"], "train.strategy"),
    (["train.method=qlora"], "train.method"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_PARAMS)
def test_bad_value_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        resolve_params({}, overrides)
    assert key in str(err.value)


def test_sensible_edge_values_are_accepted():
    # eval_every/checkpoint_every beyond max_steps: the last step is always evaluated and checkpointed
    params = resolve_params(
        {}, ["train.max_steps=10", "train.eval_every=1000", "train.checkpoint_every=1000"]
    )
    assert params.train.eval_every == 1000
    # a base model's context is not known here: checked against the base before training starts
    assert (
        resolve_params({}, ["model.base=/some/dir", "evaluate.max_new_tokens=500"]).evaluate.max_new_tokens
        == 500
    )


SPAWN_HOOK = """\
import os, subprocess

# Test hook: record every process this interpreter starts (subprocess or fork).
_log = os.environ["LMFORGE_TEST_SPAWN_LOG"]
_execute_child = subprocess.Popen._execute_child


def _record(what):
    with open(_log, "a") as fh:
        fh.write(repr(what) + "\\n")


def _logged_execute_child(self, args, *rest, **kwargs):
    _record(args)
    return _execute_child(self, args, *rest, **kwargs)


subprocess.Popen._execute_child = _logged_execute_child
os.register_at_fork(before=lambda: _record("fork"))
"""


@pytest.fixture
def spawn_watch(tmp_path) -> tuple[dict[str, str], Path]:
    """An environment whose Python processes log every process they start, and that log."""
    hook = tmp_path / "spawn-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SPAWN_HOOK)
    spawned = tmp_path / "spawned.log"
    env = dict(os.environ, PYTHONPATH=str(hook), LMFORGE_TEST_SPAWN_LOG=str(spawned))
    # the hook is live: a process that does start one is seen
    subprocess.run([sys.executable, "-c", "import subprocess; subprocess.run(['true'])"], env=env, check=True)
    assert "'true'" in spawned.read_text()
    spawned.unlink()
    return env, spawned


def _edit_params(root: Path, section: str, key: str, value) -> None:
    """Write a value straight into params.yaml, as a user editing it would (no validation on the way)."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw.setdefault(section, {})[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _assert_clean_failure(
    result: subprocess.CompletedProcess, key: str, spawned: Path, ws: Workspace
) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert key in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not spawned.exists(), f"processes were started: {spawned.read_text()}"
    assert sorted(p.name for p in ws.artifacts.iterdir()) == [
        "shards",
        "tokenizer",
    ]  # no checkpoints, log or model


@pytest.mark.parametrize(
    ("overrides", "key"),
    [(["train.batch_size=0"], "train.batch_size"), (["train.lr=.nan"], "train.lr")],
)
def test_cli_rejects_bad_params_before_anything_runs(tiny_workspace, spawn_watch, overrides, key):
    ws, _ = tiny_workspace
    env, spawned = spawn_watch
    before = (ws.root / "params.yaml").read_text()
    flags = [arg for o in overrides for arg in ("-p", o)]
    for command in (["params"], ["run"]):
        result = subprocess.run(
            [str(BIN / "lmforge"), *command, *flags], cwd=ws.root, env=env, capture_output=True, text=True
        )
        _assert_clean_failure(result, key, spawned, ws)
    assert (ws.root / "params.yaml").read_text() == before  # `run` writes overrides only once they validate


def _base_model(ws: Workspace, params, dest: Path) -> Path:
    """A local base model with the workspace's tokenizer and a 32-token context."""
    from transformers import AutoTokenizer

    from lmforge.training.model import build_model

    build_model(params.model, 300, 0).save_pretrained(dest)
    AutoTokenizer.from_pretrained(ws.tokenizer_dir).save_pretrained(dest)
    return dest


@pytest.mark.parametrize(
    "case",
    ["nproc_zero", "lr_nan", "block_size_over_base", "block_size_over_data", "samples_over_context"],
)
def test_train_stage_rejects_bad_params_before_torchrun(tiny_workspace, spawn_watch, tmp_path, case):
    ws, params = tiny_workspace
    env, spawned = spawn_watch
    if case == "nproc_zero":
        _edit_params(ws.root, "train", "nproc_per_node", 0)
        key = "train.nproc_per_node"
    elif case == "lr_nan":
        _edit_params(ws.root, "train", "lr", float("nan"))
        key = "train.lr"
    elif case == "block_size_over_base":  # valid as config; the base model only knows 32 positions
        base = _base_model(ws, params, tmp_path / "base")
        write_overrides(ws.root, [f"model.base={base}", "model.block_size=64"])
        key = "model.block_size 64 exceeds the base model's context 32"
    elif case == "block_size_over_data":  # the tiny corpus has no window this long for each rank
        write_overrides(ws.root, ["model.block_size=100000"])
        key = "model.block_size"
    else:  # 31 < block_size passes at load; the prompt's real token count does not fit beside it
        write_overrides(ws.root, ["evaluate.max_new_tokens=31"])
        key = "evaluate.max_new_tokens (31) plus the longest of evaluate.prompts"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train"], cwd=ws.root, env=env, capture_output=True, text=True
    )
    _assert_clean_failure(result, key, spawned, ws)
