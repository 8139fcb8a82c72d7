"""The bare training loop that the train section sets against the train stage: one rank of it.

`python -m benchmarks.bare_loop` under torchrun, launched by benchmarks.train with the train stage's own
launcher. It is the loop a user writes (forward, backward, AdamW, on random tokens) with the stage's
model, batch, steps, device, dtype and process group (lmforge.training.distributed, as the stage sets
them up), and nothing else: no data windows, clipping, schedule, logging or checkpoints. It runs once
per loss in LOSS_ENV, one after the other in the same processes, each from the stage's initial weights:
  fused    the stage's own loss module (lmforge.training.distributed.agreed_loss: the fused, chunked
           output layer and cross-entropy), so that the stage's overhead is measured against the same
           arithmetic;
  unfused  the model's own loss (`model(input_ids, labels=...)`), the loop a user writes first.

First it measures this machine's matmul peak the way the stage does (lmforge.training.throughput.peak_flops).
Rank 0 writes the peak and each loop's step rates, with the wall-clock span of each, to the file named
by OUT_ENV; the bench takes the steady state of those steps by the same rule as the stage's log.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lmforge.params_file import load_params
from lmforge.runs.contracts import Manifest
from lmforge.training.checkpoints import seed_everything
from lmforge.training.distributed import agreed_loss, end_process_group, setup_distributed
from lmforge.training.loss import NextTokenLoss, compiled
from lmforge.training.model import autocast_for, build_model
from lmforge.training.throughput import peak_flops
from lmforge.workspace import Workspace

OUT_ENV = "LMFORGE_BENCH_OUT"  # where rank 0 writes its result
LOSS_ENV = "LMFORGE_BENCH_LOSSES"  # the losses to run, one after the other: fused,unfused
LOSSES = ("fused", "unfused")


def main() -> None:
    ws = Workspace.find()
    params = load_params(ws.root)
    cfg = params.train
    losses = os.environ.get(LOSS_ENV, ",".join(LOSSES)).split(",")
    if not set(losses) <= set(LOSSES):
        sys.exit(f"{LOSS_ENV}={','.join(losses)}: choose from {', '.join(LOSSES)}")
    dist = setup_distributed(cfg.threads_per_rank)
    manifest = Manifest.read(ws.shards_dir)

    started = time.time()
    peak = peak_flops(dist.device, dist.world_size)  # the stage's own measurement of the peak
    result = {"peak_flops": peak, "peak_span": [started, time.time()], "loops": {}}
    for loss in losses:
        result["loops"][loss] = bare_loop(params, manifest, dist, loss)

    if dist.is_main:
        Path(os.environ[OUT_ENV]).write_text(json.dumps(result) + "\n")
    if dist.world_size > 1:
        end_process_group()


def bare_loop(params, manifest: Manifest, dist, loss: str) -> dict:
    """max_steps steps of the bare loop with this loss, from the stage's initial weights; each step's rate."""
    cfg, mcfg = params.train, params.model
    seed_everything(cfg.seed)
    model = build_model(mcfg, manifest.vocab_size, manifest.eos_token_id).to(dist.device)

    def random_batch() -> torch.Tensor:
        return torch.randint(0, manifest.vocab_size, (cfg.batch_size, mcfg.block_size), device=dist.device)

    if loss == "fused":
        loss_module, loss_kind = agreed_loss(model, random_batch()[:2], dist)
    else:
        loss_module, loss_kind = NextTokenLoss(model), "the model's own"
    ddp = torch.nn.parallel.DistributedDataParallel(loss_module) if dist.world_size > 1 else loss_module
    forward = compiled(ddp) if cfg.compile else ddp
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=dist.device.type == "cuda"
    )
    model.train()
    records = []
    step_tokens = cfg.batch_size * mcfg.block_size * cfg.grad_accum * dist.world_size
    if dist.world_size > 1:
        torch.distributed.barrier()
    started = time.time()
    for step in range(cfg.max_steps):
        start = time.perf_counter()
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            with (
                ddp.no_sync() if dist.world_size > 1 and not last else nullcontext(),
                autocast_for(dist.device),
            ):
                value = forward(random_batch()) / cfg.grad_accum
            value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value.item()  # the stage reads its loss every step, which waits for the GPU too
        records.append({"step": step + 1, "tokens_per_s": step_tokens / (time.perf_counter() - start)})
    ended = time.time()
    del forward, ddp  # see end_process_group
    gc.collect()
    return {"loss_kind": loss_kind, "loss_module": type(loss_module).__name__, "step_tokens": step_tokens,
            "records": records, "span": [started, ended]}  # fmt: skip


if __name__ == "__main__":
    if "LOCAL_RANK" not in os.environ:
        sys.exit(
            "python -m benchmarks.bare_loop is the bare training loop run by torchrun; use `lmforge bench`"
        )
    main()
