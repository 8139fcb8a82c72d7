"""Training: the schedule, checkpoints and resume, a tiny-model regression, and real torchrun runs."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infra.torchrun import torchrun_command
from lmforge.config import ConfigError
from lmforge.data.shards import load_shard
from lmforge.params_file import load_params, resolve_params, write_overrides
from lmforge.runs.contracts import read_train_log
from lmforge.training.checkpoints import resume_latest, run_fingerprint, save_checkpoint
from lmforge.training.model import build_model, load_model
from lmforge.training.optimizer import build_optimizer, lr_at
from lmforge.training.windows import TokenWindows
from pipeline.train import train
from tests.conftest import tiny_base

TRAIN = resolve_params(
    {}, ["train.lr=0.01", "train.min_lr=0.001", "train.warmup_steps=10", "train.max_steps=110"]
).train


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """train() sets this process's thread count (train.threads_per_rank, as each rank does), and so do the
    tests that pin it: every test here gives the next one the count it found."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, TRAIN) == pytest.approx(0.001)
    assert lr_at(9, TRAIN) == pytest.approx(0.01)  # end of warmup: the peak
    assert lr_at(60, TRAIN) == pytest.approx(0.0055)  # halfway through the cosine: the midpoint
    assert lr_at(110, TRAIN) == pytest.approx(0.001) and lr_at(500, TRAIN) == pytest.approx(0.001)
    decay = [lr_at(s, TRAIN) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_weight_decay_groups(tiny_workspace):
    _, params = tiny_workspace
    model = build_model(params.model, 300, 0)
    optimizer, _ = build_optimizer(model, params.train, torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


def test_windows_are_a_function_of_step_and_rank(tiny_workspace):
    ws, _ = tiny_workspace
    shards = load_shard(ws.shards_dir, "train")
    rank0, rank1 = TokenWindows(shards, 32, 0, 2), TokenWindows(shards, 32, 1, 2)
    a = rank0.batch(4, seed=1, step=3, micro=0, rank=0)
    assert a.shape == (4, 32) and torch.equal(a, rank0.batch(4, seed=1, step=3, micro=0, rank=0))
    assert not torch.equal(a, rank0.batch(4, seed=1, step=4, micro=0, rank=0))
    half = len(shards[0]) // 2
    assert all(hi <= half + 1 for _, _, hi in rank0.parts) and all(lo >= half - 1 for _, lo, _ in rank1.parts)
    with pytest.raises(ConfigError, match="model.block_size"):
        TokenWindows(shards, 10**7)


def _one_step_loss(model, optimizer, scheduler, batch) -> float:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def test_checkpoint_round_trip_gives_identical_next_step(tiny_workspace, tmp_path):
    ws, params = tiny_workspace
    torch.manual_seed(0)
    windows = TokenWindows(load_shard(ws.shards_dir, "train"), 32)
    model = build_model(params.model, 300, 0)
    optimizer, scheduler = build_optimizer(model, params.train, torch.device("cpu"))
    for step in range(3):
        _one_step_loss(model, optimizer, scheduler, windows.batch(4, 0, step, 0, 0))
    save_checkpoint(tmp_path, model, optimizer, scheduler, 3, "fp", keep=2)
    expected = [_one_step_loss(model, optimizer, scheduler, windows.batch(4, 0, s, 0, 0)) for s in (3, 4)]

    fresh = build_model(params.model, 300, 0)
    fresh_opt, fresh_sched = build_optimizer(fresh, params.train, torch.device("cpu"))
    assert resume_latest(tmp_path, "fp", fresh, fresh_opt, fresh_sched, print) == 3
    assert fresh_sched.last_epoch == 3
    resumed = [_one_step_loss(fresh, fresh_opt, fresh_sched, windows.batch(4, 0, s, 0, 0)) for s in (3, 4)]
    assert resumed == expected  # bit for bit: weights, Adam moments and schedule all came back


def test_corrupt_latest_checkpoint_falls_back(tiny_workspace, tmp_path, capsys):
    ws, params = tiny_workspace
    model = build_model(params.model, 300, 0)
    optimizer, scheduler = build_optimizer(model, params.train, torch.device("cpu"))
    save_checkpoint(tmp_path, model, optimizer, scheduler, 5, "fp", keep=3)
    latest = save_checkpoint(tmp_path, model, optimizer, scheduler, 10, "fp", keep=3)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated file
    assert resume_latest(tmp_path, "fp", model, optimizer, scheduler, print) == 5
    out = capsys.readouterr().out
    assert "step_000010 is unreadable" in out and "resuming from step_000005" in out
    assert resume_latest(tmp_path, "other-run", model, optimizer, scheduler, print) == 0
    assert "belongs to another run" in capsys.readouterr().out


def test_fingerprint_tracks_params_and_data(tiny_workspace):
    ws, params = tiny_workspace
    base = run_fingerprint(params, ws.shards_dir)
    assert run_fingerprint(params, ws.shards_dir) == base
    assert run_fingerprint(load_params(ws.root, ["train.lr=0.001"]), ws.shards_dir) != base
    assert run_fingerprint(load_params(ws.root, ["train.max_restarts=5"]), ws.shards_dir) == base
    # how long the run goes and how it logs do not change what its weights mean: it continues
    longer = ["train.max_steps=999", "train.eval_every=7", "train.checkpoint_every=3", "train.keep_checkpoints=9",
              "train.compile=true", "train.threads_per_rank=2", "train.rdzv_endpoint=localhost:29400"]  # fmt: skip
    assert run_fingerprint(load_params(ws.root, longer), ws.shards_dir) == base
    # the seed and the world size (each rank's slice of the data, its RNG) do
    for other in (["train.seed=1"], ["train.nproc_per_node=3"], ["train.batch_size=5"], ["model.dropout=0.1"]):
        assert run_fingerprint(load_params(ws.root, other), ws.shards_dir) != base, other


# Measured once with this seed, data and model (1 thread, fp32); a change in the training math moves them.
EXPECTED_LOSSES = [5.68579, 5.58205, 5.42446, 5.34451, 5.19532, 5.1127, 4.96695, 4.93924, 4.89916, 4.88305]


def test_tiny_model_regression(tiny_workspace):
    ws, params = tiny_workspace
    torch.set_num_threads(1)
    summary = train(params, ws)
    log = [json.loads(line) for line in ws.train_log.read_text().splitlines()]
    losses = [r["train_loss"] for r in log]
    assert [r["step"] for r in log] == list(range(1, 11))
    assert losses == pytest.approx(EXPECTED_LOSSES, abs=2e-3)
    assert "val_loss" in log[4] and "val_loss" in log[9]
    assert summary["steps"] == 10 and len(summary["rank_weight_checksums"]) == 1
    assert sorted(p.name for p in ws.checkpoints_dir.iterdir()) == ["step_000005", "step_000010"]
    model = load_model(ws.model_dir)  # safetensors, loads back
    assert (ws.model_dir / "model.safetensors").is_file() and (ws.model_dir / "tokenizer.json").is_file()
    assert model.config.n_layer == 1


def test_torchrun_command_from_params():
    single = resolve_params({}, ["train.nproc_per_node=2", "train.max_restarts=3"]).train
    assert torchrun_command(single, "pipeline.train")[2:] == [
        "infra.torchrun",
        "--nproc-per-node=2",
        "--max-restarts=3",
        "--standalone",
        "--local-addr=127.0.0.1",
        "-m",
        "pipeline.train",
    ]
    multi = resolve_params(
        {}, ["train.nnodes=2", "train.rdzv_endpoint=10.0.0.1:29500", "train.rdzv_id=job7"]
    ).train
    multi_cmd = torchrun_command(multi, "pipeline.train")
    assert "--nnodes=2" in multi_cmd and "--rdzv-endpoint=10.0.0.1:29500" in multi_cmd
    with pytest.raises(ConfigError, match="multi-node needs a fixed rdzv_endpoint"):
        resolve_params({}, ["train.nnodes=2"])


def _launch(ws, **popen):
    env = dict(os.environ, LMFORGE_ROOT=str(ws.root), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train"],
        cwd=ws.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical_and_learns(tiny_workspace):
    ws, _ = tiny_workspace
    write_overrides(
        ws.root,
        ["train.nproc_per_node=2", "train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=20",
         "model.dropout=0.1"],
    )  # fmt: skip
    proc = _launch(ws)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((ws.model_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["rank_weight_checksums"]) == 2
    assert summary["rank_weight_checksums"][0] == summary["rank_weight_checksums"][1]
    # each rank seeds with seed + rank, so draws its own dropout masks, and its RNG state is checkpointed
    state = torch.load(ws.checkpoints_dir / "step_000040" / "state.pt", weights_only=True)
    ranks = state["rng"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    losses = [json.loads(line)["train_loss"] for line in ws.train_log.read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does_and_checkpoints_in_shards(tiny_workspace):
    """train.strategy=fsdp on 2 ranks (FSDP2: each block and the root sharded): the same losses as DDP on
    the same data, step for step, and the same final weights; its checkpoints hold each rank's shards."""
    ws, _ = tiny_workspace
    runs = {}
    for strategy in ("ddp", "fsdp"):
        write_overrides(ws.root, [f"train.strategy={strategy}", "train.nproc_per_node=2", "train.max_steps=8",
                                  "train.eval_every=4", "train.checkpoint_every=4", "train.grad_accum=2"])  # fmt: skip
        proc = _launch(ws)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        assert f"params trained (full, {strategy})" in out
        runs[strategy] = (read_train_log(ws.train_log), load_model(ws.model_dir).state_dict())
        if strategy == "fsdp":
            step = ws.checkpoints_dir / "step_000008"
            assert not (step / "model.safetensors").exists()
            assert len(list((step / "sharded").glob("*.distcp"))) == 2  # one file of shards per rank
            summary = json.loads((ws.model_dir / "train_summary.json").read_text())
            assert summary["world_size"] == 2 and len(summary["rank_weight_checksums"]) == 1
        for path in (ws.checkpoints_dir, ws.model_dir):
            shutil.rmtree(path)
        ws.train_log.unlink()
    (ddp_log, ddp_weights), (fsdp_log, fsdp_weights) = runs["ddp"], runs["fsdp"]
    assert [r["step"] for r in fsdp_log] == list(range(1, 9))
    # every rank's peak memory while training, in the log (the model's directory stays reproducible)
    assert len(fsdp_log[-1]["peak_memory_mib"]) == 2 and all(m > 100 for m in fsdp_log[-1]["peak_memory_mib"])
    for key in ("train_loss", "val_loss"):
        assert [r.get(key) for r in fsdp_log] == pytest.approx([r.get(key) for r in ddp_log], abs=1e-4), key
    assert ddp_weights.keys() == fsdp_weights.keys()
    for name, weight in ddp_weights.items():
        torch.testing.assert_close(fsdp_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_fine_tune_from_a_local_base_model(tiny_workspace, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.preprocess import preprocess

    ws, params = tiny_workspace
    base = tmp_path / "base-model"
    build_model(params.model, 300, 0).save_pretrained(base)
    AutoTokenizer.from_pretrained(ws.tokenizer_dir).save_pretrained(base)
    write_overrides(ws.root, [f"model.base={base}", "preprocess.vocab_size=500"])
    params = load_params(ws.root)
    manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, base_dir=base)
    assert manifest.tokenizer == "base" and manifest.vocab_size == 300  # the base's, not vocab_size
    summary = train(params, ws, base_dir=base)
    assert summary["steps"] == 10
    assert (ws.model_dir / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    with pytest.raises(ConfigError, match="exceeds the base model's context"):
        build_model(load_params(ws.root, ["model.block_size=64"]).model, 300, 0, base_dir=base)


def _checkpoints(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_pruning_keeps_the_newest_checkpoints_of_this_run(tiny_workspace, tmp_path, capsys):
    """train.keep_checkpoints counts this run's checkpoints. Another run's (other data or params, in the same
    persist: true directory) are never resumed here, so they are set aside whole under other-runs/, never
    deleted, and never push this run's own out."""
    import shutil

    ws, params = tiny_workspace
    ckpts = tmp_path / "checkpoints"
    model = build_model(params.model, 300, 0)
    optimizer, scheduler = build_optimizer(model, params.train, torch.device("cpu"))
    for step in (100, 200, 300, 400):
        save_checkpoint(ckpts, model, optimizer, scheduler, step, "old-run", keep=2)
    assert _checkpoints(ckpts) == ["step_000300", "step_000400"]
    # a new run's first checkpoint sorts before the old run's: by name alone it was pruned at once
    save_checkpoint(ckpts, model, optimizer, scheduler, 100, "new-run", keep=2)
    assert _checkpoints(ckpts) == ["other-runs", "step_000100"]
    assert _checkpoints(ckpts / "other-runs" / "old-run") == ["step_000300", "step_000400"]
    for step in (200, 300):
        save_checkpoint(ckpts, model, optimizer, scheduler, step, "new-run", keep=2)
    assert _checkpoints(ckpts) == ["other-runs", "step_000200", "step_000300"]
    assert _checkpoints(ckpts / "other-runs" / "old-run") == ["step_000300", "step_000400"]
    # a newer checkpoint of another run (as an earlier lmforge left them) is passed over, not a reason
    # to start from scratch
    other = save_checkpoint(tmp_path / "other", model, optimizer, scheduler, 900, "old-run", keep=2)
    shutil.copytree(other, ckpts / other.name)
    fresh = build_model(params.model, 300, 0)
    fresh_opt, fresh_sched = build_optimizer(fresh, params.train, torch.device("cpu"))
    capsys.readouterr()
    assert resume_latest(ckpts, "new-run", fresh, fresh_opt, fresh_sched, print) == 300
    assert "checkpoint step_000900 belongs to another run" in capsys.readouterr().out
    assert resume_latest(ckpts, "old-run", fresh, fresh_opt, fresh_sched, print) == 900
    (ckpts / "step_000300" / "state.pt").write_bytes(b"")  # unreadable: the one before, of this run
    assert resume_latest(ckpts, "new-run", fresh, fresh_opt, fresh_sched, print) == 200


def test_train_keeps_train_keep_checkpoints(tiny_workspace):
    ws, _ = tiny_workspace
    write_overrides(ws.root, ["train.keep_checkpoints=1", "train.checkpoint_every=3"])
    train(load_params(ws.root), ws)
    assert _checkpoints(ws.checkpoints_dir) == ["step_000010"]  # 3, 6, 9 and 10 written, the newest kept


def upload_tiny_base(tiny_workspace, s3_server, monkeypatch, local: Path):
    """A tiny base model (weights and tokenizer) saved to local and uploaded under a fresh s3:// prefix;
    (its uri, the params naming it as model.base, the S3 client)."""
    import uuid

    from transformers import AutoTokenizer

    from infra.s3 import s3_client

    ws, params = tiny_workspace
    monkeypatch.setenv("LMFORGE_STATE_DIR", str(s3_server.state))  # the server's keys are there
    build_model(params.model, 300, 0).save_pretrained(local)
    AutoTokenizer.from_pretrained(ws.tokenizer_dir).save_pretrained(local)
    prefix = f"bases/{uuid.uuid4().hex[:8]}/tiny"
    client = s3_client(s3_server.cfg, s3_server.state)
    for path in local.iterdir():
        client.upload_file(str(path), s3_server.cfg.bucket, f"{prefix}/{path.name}")
    uri = f"s3://{s3_server.cfg.bucket}/{prefix}"
    write_overrides(ws.root, [f"model.base={uri}", f"storage.endpoint_url={s3_server.cfg.endpoint_url}",
                              f"storage.bucket={s3_server.cfg.bucket}"])  # fmt: skip
    return uri, load_params(ws.root), client


def test_the_base_stage_pins_what_model_base_is_now(tiny_workspace, s3_server, monkeypatch, tmp_path):
    """artifacts/base.json names the base's version: the champion's md5 (none yet is a clear error), a
    local directory's files. It is rewritten only when that changed, so DVC re-runs the stages after it
    exactly then; champion is read from the pin, never from a champion that moved on since."""
    import uuid

    from lmforge.runs.contracts import ChampionRecord, Decision
    from lmforge.runs.registry import promote
    from pipeline.base_model import pin_base, resolve_base
    from pipeline.package import lineage

    ws, params = tiny_workspace
    monkeypatch.setenv("LMFORGE_STATE_DIR", str(s3_server.state))
    write_overrides(ws.root, ["model.base=champion", f"storage.endpoint_url={s3_server.cfg.endpoint_url}",
                              f"storage.bucket={s3_server.cfg.bucket}", f"storage.registry_prefix=r-{uuid.uuid4().hex[:8]}"])  # fmt: skip
    params = load_params(ws.root)
    with pytest.raises(ConfigError, match=r"model.base: champion is read from .*base.json.*run `dvc repro base`"):
        resolve_base("champion", ws, params)
    with pytest.raises(ConfigError, match=r"has no champion yet: promote a model first"):
        pin_base(ws, params)
    promote(ChampionRecord(model_md5="0" * 32 + ".dir", metrics={}), params.storage, ws.state, None)
    assert pin_base(ws, params) == {"base": "champion", "version": "0" * 32 + ".dir"}
    written = ws.base_pin.stat().st_mtime_ns
    pin_base(ws, params)
    assert ws.base_pin.stat().st_mtime_ns == written  # unchanged: DVC sees the same file
    metrics = dict.fromkeys(["val_bits_per_byte", "test_bits_per_byte", "bigram_val_bits_per_byte", "val_perplexity",
                             "test_perplexity"], 1.0)  # fmt: skip
    labels = lineage(ws, params, Decision(promote=True, reasons=[], challenger=metrics, champion=None), None)
    assert (labels["model_base"], labels["model_base_revision"]) == ("champion", "0" * 32 + ".dir")

    base = tiny_base("gpt2", tmp_path / "gpt2", ws.tokenizer_dir)
    write_overrides(ws.root, [f"model.base={base}"])
    first = pin_base(ws, load_params(ws.root))["version"]
    assert pin_base(ws, load_params(ws.root))["version"] == first
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")  # the base changed
    assert pin_base(ws, load_params(ws.root))["version"] != first
    write_overrides(ws.root, ["model.base=null"])
    assert pin_base(ws, load_params(ws.root)) == {"base": None, "version": None}


def test_a_base_model_in_s3_is_downloaded_once_into_the_state_dir(
    tiny_workspace, s3_server, monkeypatch, tmp_path
):
    from pipeline.base_model import resolve_base
    from pipeline.preprocess import preprocess

    ws, _ = tiny_workspace
    local = tmp_path / "base-model"
    uri, params, client = upload_tiny_base(tiny_workspace, s3_server, monkeypatch, local)
    prefix = uri.split("/", 3)[3]

    base = resolve_base(uri, ws, params)
    assert base.parent == s3_server.state.resolve() / "base-models"
    assert {p.name: p.read_bytes() for p in base.iterdir()} == {
        p.name: p.read_bytes() for p in local.iterdir()
    }
    for path in local.iterdir():  # gone from S3: a second resolve must not fetch again
        client.delete_object(Bucket=s3_server.cfg.bucket, Key=f"{prefix}/{path.name}")
    assert resolve_base(uri, ws, params) == base
    # and it is what preprocess and train fine-tune from
    manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, base_dir=base)
    assert manifest.tokenizer == "base" and manifest.vocab_size == 300
    assert train(params, ws, base_dir=base)["steps"] == 10


def test_an_interrupted_base_download_is_fetched_again_not_taken_for_the_model(
    tiny_workspace, s3_server, monkeypatch, tmp_path
):
    import pipeline.base_model
    from infra.s3 import StorageError

    ws, _ = tiny_workspace
    uri, params, _ = upload_tiny_base(tiny_workspace, s3_server, monkeypatch, tmp_path / "base-model")
    real_download = pipeline.base_model.download_prefix

    def cut_after_the_first_file(uri, dest, cfg, state):
        written = real_download(uri, dest, cfg, state)
        for path in written[1:]:
            path.unlink()  # what a connection lost after the first object leaves behind
        raise StorageError(f"download {uri}: connection reset")

    monkeypatch.setattr(pipeline.base_model, "download_prefix", cut_after_the_first_file)
    with pytest.raises(StorageError, match="connection reset"):
        pipeline.base_model.resolve_base(uri, ws, params)
    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    left = [p.name for p in (ws.state / "base-models").iterdir() if name in p.name]
    assert left == []  # no partial copy left to be taken for the whole model
    monkeypatch.setattr(pipeline.base_model, "download_prefix", real_download)
    base = pipeline.base_model.resolve_base(uri, ws, params)
    assert sorted(p.name for p in base.iterdir()) == sorted(
        p.name for p in (tmp_path / "base-model").iterdir()
    )


@pytest.mark.slow
def test_grad_accum_on_two_ranks_trains_as_one_batch_of_their_micro_batches(tiny_workspace):
    """train.grad_accum=2 on 2 ranks (no gradient sync on the first micro-step, one on the last): every
    step's logged loss, and the final weights, are those of one process stepping on the four micro-batches
    of that step (2 ranks x 2 micro-steps, each loss a quarter)."""
    from lmforge.runs.contracts import Manifest
    from lmforge.training.checkpoints import seed_everything
    from lmforge.training.loss import training_loss
    from lmforge.training.windows import fixed_windows

    ws, _ = tiny_workspace
    write_overrides(ws.root, ["train.nproc_per_node=2", "train.grad_accum=2", "train.max_steps=4",
                              "train.eval_every=100", "train.checkpoint_every=100"])  # fmt: skip
    proc = _launch(ws)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((ws.model_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["rank_weight_checksums"])) == 1
    logged = [json.loads(line)["train_loss"] for line in ws.train_log.read_text().splitlines()]

    params = load_params(ws.root)
    cfg, mcfg, world = params.train, params.model, 2
    manifest = Manifest.read(ws.shards_dir)
    shards = load_shard(ws.shards_dir, "train", manifest)
    windows = [TokenWindows(shards, mcfg.block_size, rank, world) for rank in range(world)]
    val = fixed_windows(load_shard(ws.shards_dir, "val", manifest), mcfg.block_size, cfg.batch_size)
    seed_everything(cfg.seed)
    model = build_model(mcfg, manifest.vocab_size, manifest.eos_token_id)
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"))
    loss_fn, _ = training_loss(model, val[:2])
    model.train()
    expected = []
    for step in range(cfg.max_steps):
        total = 0.0
        for rank in range(world):
            for micro in range(cfg.grad_accum):
                batch = windows[rank].batch(cfg.batch_size, cfg.seed, step, micro, rank)
                loss = loss_fn(batch) / (cfg.grad_accum * world)
                loss.backward()
                total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        expected.append(total)
    assert logged == pytest.approx(expected, abs=2e-5)  # the log rounds to 5 decimals
    trained = load_model(ws.model_dir).state_dict()
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(trained[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_raising_max_steps_continues_the_run(tiny_workspace, capsys):
    """A longer run of the same data and model, logging and checkpointing on another rhythm, is the same
    run: it resumes from the last checkpoint and its steps continue."""
    ws, params = tiny_workspace  # 10 steps, a checkpoint every 5
    threads = torch.get_num_threads()
    try:
        train(params, ws)
        write_overrides(ws.root, ["train.max_steps=16", "train.checkpoint_every=3", "train.eval_every=4"])
        capsys.readouterr()
        train(load_params(ws.root), ws)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "resuming from step_000010" in out and "steps 10 -> 16" in out, out[-2000:]
    assert [r["step"] for r in read_train_log(ws.train_log)] == list(range(1, 17))
    assert [p.name for p in sorted(ws.checkpoints_dir.glob("step_*"))] == ["step_000015", "step_000016"]
    # shortened again: no checkpoint past the new end is resumed, the newest one before it is
    write_overrides(ws.root, ["train.max_steps=15"])
    try:
        train(load_params(ws.root), ws)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "step_000016 is past train.max_steps (15): not resumed" in out and "resuming from step_000015" in out


def _agree(rank: int, store_path: str, steps: list[int], errors) -> None:
    from lmforge.training.distributed import Dist, agree_on_step

    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(store_path, 2), rank=rank,
                                         world_size=2)  # fmt: skip
    try:
        agree_on_step(steps[rank], Dist(rank, rank, 2, torch.device("cpu")))
        errors.put((rank, None))
    except ConfigError as exc:
        errors.put((rank, str(exc)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("steps", [[50, 50], [50, 0]])
def test_ranks_agree_on_the_step_they_resumed_from(tmp_path, steps):
    """Without a shared checkpoint directory, one node resumes and the other starts over: both stop at
    once with the reason, instead of waiting forever at the first collective."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(r, str(tmp_path / "store"), steps, errors)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(errors.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    if steps[0] == steps[1]:
        assert results == {0: None, 1: None}
    else:
        for message in results.values():
            assert message.startswith("the ranks resumed from different checkpoints (rank 0: step 50, rank 1: step 0)")
            assert "a shared filesystem" in message


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_on_a_tiny_llama_on_two_ranks(tiny_workspace, tmp_path, strategy):
    """train.method: lora: the base stays bit for bit as it was, the adapters are the same on both ranks
    (ddp; fsdp keeps one sharded copy), the checkpoints hold the adapters alone, and the merged model gives
    peft's own base + adapter logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.preprocess import preprocess

    ws, _ = tiny_workspace
    base = tiny_base("llama", tmp_path / "llama", ws.tokenizer_dir)
    write_overrides(ws.root, [
        f"model.base={base}", "train.method=lora", "train.lora.r=4", "train.lora.alpha=8", "train.nproc_per_node=2",
        "train.max_steps=20", "train.lr=0.01", "train.min_lr=0.001", "train.eval_every=10", "train.checkpoint_every=10",
        f"train.strategy={strategy}",
    ])  # fmt: skip
    preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, load_params(ws.root), base_dir=base)
    proc = _launch(ws)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((ws.model_dir / "train_summary.json").read_text())
    trained = re.search(rf"train: ([\d,]+) of ([\d,]+) params trained \(lora, {strategy}\)", out)
    assert trained, out[-3000:]
    if strategy == "ddp":
        assert summary["rank_weight_checksums"][0] == summary["rank_weight_checksums"][1]  # base + adapters
        checkpoint = load_file(ws.checkpoints_dir / "step_000020" / "model.safetensors")
        names, sizes = list(checkpoint), [t.numel() for t in checkpoint.values()]
    else:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(ws.checkpoints_dir / "step_000020" / "sharded").read_metadata()
        weights = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}
        names, sizes = list(weights), [v.size.numel() for v in weights.values()]
    assert names and all("lora_" in name for name in names), sorted(names)[:5]
    assert int(trained[1].replace(",", "")) == sum(sizes)

    merged = load_file(ws.model_dir / "model.safetensors")
    original = load_file(base / "model.safetensors")
    adapted = {name for name in original if any(m in name for m in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"))}  # fmt: skip
    for name, tensor in original.items():
        if name not in adapted:  # embeddings, norms, the head: never touched
            assert torch.equal(merged[name], tensor), name
    assert any(not torch.equal(merged[name], original[name]) for name in adapted)  # the adapters learnt
    assert (ws.model_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((ws.model_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4

    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ws.model_dir / "adapter")
        expected = reference.eval()(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(ws.model_dir).eval()(input_ids=x).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_activation_checkpointing_gives_the_same_gradients(tiny_workspace, method):
    """Recomputing the blocks in backward changes memory, not math: one step's loss and gradients agree."""
    from lmforge.training.loss import FusedNextTokenLoss
    from lmforge.training.model import with_lora

    ws, params = tiny_workspace
    batch = TokenWindows(load_shard(ws.shards_dir, "train"), 32).batch(4, 0, 0, 0, 0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(params.model, 300, 0)
        if method == "lora":
            model = with_lora(model, params.train.lora).get_base_model()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        calls = []
        model.base_model.h[0].attn.c_attn.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        loss = FusedNextTokenLoss(model)(batch)
        loss.backward()
        grads.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        assert len(calls) == (2 if checkpointing else 1)  # the block ran again in backward
    (plain_loss, plain), (ckpt_loss, ckpt) = grads
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == ckpt.keys() and all(torch.allclose(plain[n], ckpt[n], atol=1e-6) for n in plain)


def test_a_hub_base_comes_from_the_hub_cache_and_offline_says_so(tiny_workspace):
    """model.base as a Hub id (org/name[@revision]): fetched once into the state dir's Hub cache by
    huggingface_hub. These machines have no network (the tests set HF_HUB_OFFLINE=1): an id that is not in
    the cache is a clear error, and one that is resolves to its commit's snapshot, which training takes."""
    import shutil

    from pipeline.base_model import resolve_base

    ws, params = tiny_workspace
    threads = torch.get_num_threads()
    try:
        train(params, ws)  # a model to stand for the Hub's
        with pytest.raises(ConfigError, match=r"model.base: acme/tiny-gpt could not be fetched .*HF_HUB_OFFLINE=1"):
            resolve_base("acme/tiny-gpt", ws, params)
        # the cache as huggingface_hub keeps it: the model at a commit, and main pointing at that commit
        commit = "0123456789abcdef0123456789abcdef01234567"
        snapshot = ws.state / "hub" / "models--acme--tiny-gpt" / "snapshots" / commit
        shutil.copytree(ws.model_dir, snapshot)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text(commit)
        assert resolve_base("acme/tiny-gpt", ws, params) == snapshot
        assert resolve_base(f"acme/tiny-gpt@{commit}", ws, params) == snapshot
        with pytest.raises(ConfigError, match="could not be fetched"):
            resolve_base("acme/tiny-gpt@v9", ws, params)  # a revision the cache does not have
        tuned = load_params(ws.root, ["model.base=acme/tiny-gpt", "train.max_steps=3"])
        shutil.rmtree(ws.checkpoints_dir)
        train(tuned, ws, base_dir=resolve_base(tuned.model.base, ws, tuned))
    finally:
        torch.set_num_threads(threads)
    assert json.loads((ws.model_dir / "train_summary.json").read_text())["steps"] == 3
    # the lineage names the base and the commit it resolved to
    from lmforge.runs.contracts import Decision
    from pipeline.package import lineage

    figures = {f"{k}_perplexity": 1.0 for k in ("val", "test")} | {
        k: 1.0 for k in ("val_bits_per_byte", "test_bits_per_byte", "bigram_val_bits_per_byte")
    }
    labels = lineage(ws, tuned, Decision(promote=True, reasons=[], challenger=figures, champion=None), None)
    assert (labels["model_base"], labels["model_base_revision"]) == ("acme/tiny-gpt", commit)
