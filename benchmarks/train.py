"""The train section: the train stage (torchrun, DDP) against the bare loop (benchmarks.bare_loop) on the
same model, batch and process count, and both as a fraction of this machine's dense matmul FLOP/s.

Both sides are the steady state by the one rule in pipeline.throughput: the first fifth of the steps is
warm-up. The serve section trains through run_train_stage here too.
"""

from __future__ import annotations

import json
import shutil
import sys

import torch

from benchmarks.bare_loop import OUT_ENV
from benchmarks.harness import Bench, figure, quiet, side
from pipeline.config import Params, Workspace, write_overrides
from pipeline.contracts import Manifest, read_train_log
from pipeline.throughput import steady, steady_median


def run(b: Bench) -> dict:
    from pipeline.model import build_model
    from pipeline.throughput import flops_per_token

    ws = b.ws
    ensure_shards(b)
    params = b.params
    cfg = params.train
    procs, threads = cfg.nproc_per_node, cfg.threads_per_rank
    manifest = Manifest.read(ws.shards_dir)
    flops_tok = flops_per_token(
        build_model(params.model, manifest.vocab_size, manifest.eos_token_id), params.model
    )

    figures = {}
    if procs > 1 and cfg.nnodes == 1:
        # the same cores as one process with all the threads: does DDP use them better than intra-op threads?
        b.log(f"train: the stage, 1 process x {procs * threads} threads")
        write_overrides(ws.root, ["train.nproc_per_node=1", f"train.threads_per_rank={procs * threads}"])
        run_train_stage(b)
        single_tokens, single_seconds, _ = stage_throughput(ws, b.params)
        write_overrides(ws.root, [f"train.nproc_per_node={procs}", f"train.threads_per_rank={threads}"])

    b.log(f"train: the stage, {procs} processes x {threads} threads")
    run_train_stage(b)
    tokens, seconds, stage_mfu = stage_throughput(ws, params)
    b.log(f"train: bare loop, {procs} processes x {threads} threads")
    bare = run_bare_loop(b)
    bare_tokens, bare_seconds = steady_tokens(bare["step_tokens"], bare["records"])
    peak = side(
        f"dense fp32 matmul, {procs} x {threads} threads", bare["peak_flop"], "FLOP", bare["peak_seconds"]
    )

    stage = side(f"train stage, {procs} x {threads} threads", tokens, "tokens", seconds)
    figures["tokens_per_s"] = figure(
        "train: tokens/s",
        stage,
        side("bare forward/backward/AdamW loop", bare_tokens, "tokens", bare_seconds),
        note=f"{cfg.max_steps} steps, the first fifth skipped",
    )
    figures["mfu"] = figure(
        "train: CPU MFU (stage FLOP/s / matmul FLOP/s)",
        side("train stage", tokens * flops_tok, "FLOP", seconds),
        peak,
        note=f"{flops_tok / 1e6:.2f} MFLOP/token (6N + attention)",
        flops_per_token=flops_tok,
        stage_reported_mfu=stage_mfu,  # against the peak the stage measured at its own start
    )
    figures["bare_mfu"] = figure(
        "train: bare-loop CPU MFU",
        side("bare loop", bare_tokens * flops_tok, "FLOP", bare_seconds),
        peak,
        note="the ceiling for this model and batch with a plain loop",
    )
    if procs > 1 and cfg.nnodes == 1:
        figures["scaling"] = figure(
            f"train: tokens/s, {procs} processes x {threads} vs 1 x {procs * threads} threads",
            stage,
            side(
                f"train stage, 1 process x {procs * threads} threads", single_tokens, "tokens", single_seconds
            ),
            note="on a CPU the same cores either way: above 1 means DDP uses them better than intra-op threads",
        )
    return figures


def ensure_shards(b: Bench) -> None:
    """Token shards for a section run without the preprocess section before it."""
    from pipeline.preprocess import preprocess

    if not (b.ws.shards_dir / Manifest.FILE).is_file():
        b.log("preprocess: the stage (for the sections after it)")
        preprocess(b.ws.data, b.ws.tokenizer_dir, b.ws.shards_dir, b.params)


def run_train_stage(b: Bench) -> None:
    """The train stage exactly as DVC runs it (`python -m pipeline.train`: preflight, then torchrun)."""
    from infra.processes import stream_command, venv_env

    ws = b.ws
    for path in (ws.checkpoints_dir, ws.model_dir):
        shutil.rmtree(path, ignore_errors=True)
    ws.train_log.unlink(missing_ok=True)
    stream_command(
        [sys.executable, "-m", "pipeline.train"],
        ws.root,
        quiet(b.log),
        env=venv_env({"LMFORGE_ROOT": str(ws.root)}),
    )


def steady_tokens(step_tokens: int, records: list[dict]) -> tuple[float, float]:
    """(tokens, seconds) of the steady steps, from each step's tokens_per_s."""
    kept = steady(records)
    return step_tokens * len(kept), sum(step_tokens / r["tokens_per_s"] for r in kept)


def stage_throughput(ws: Workspace, params: Params) -> tuple[float, float, float]:
    """(tokens, seconds, the stage's own median MFU) from artifacts/train_log.jsonl."""
    cfg, world = params.train, params.train.nproc_per_node * params.train.nnodes
    records = read_train_log(ws.train_log)
    step_tokens = cfg.batch_size * params.model.block_size * cfg.grad_accum * world
    tokens, seconds = steady_tokens(step_tokens, records)
    return tokens, seconds, steady_median(records, "mfu")


def run_bare_loop(b: Bench) -> dict:
    """The bare loop under the train stage's own launcher, same process count and threads."""
    from infra.processes import stream_command, venv_env
    from infra.torchrun import torchrun_command, torchrun_env

    ws, cfg = b.ws, b.params.train
    out = ws.artifacts / "bench_bare_loop.json"
    out.unlink(missing_ok=True)
    env = venv_env(
        torchrun_env(cfg, cuda=torch.cuda.is_available()) | {"LMFORGE_ROOT": str(ws.root), OUT_ENV: str(out)}
    )
    stream_command(torchrun_command(cfg, "benchmarks.bare_loop"), ws.root, quiet(b.log), env=env)
    return json.loads(out.read_text())
