"""The bare training loop that the train section sets against the train stage: one rank of it.

`python -m benchmarks.bare_loop` under torchrun, launched by benchmarks.train with the train stage's own
launcher. It is the loop a user writes first (forward with labels=, backward, AdamW, on random tokens)
with the stage's model, batch, steps, device, dtype and process group (pipeline.train's own setup), and
nothing else: no data windows, clipping, schedule, logging or checkpoints.

Rank 0 writes each step's rate and this machine's matmul peak to the file named by OUT_ENV; the bench
takes the steady state of those steps by the same rule as the stage's log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from pipeline.config import Workspace, load_params
from pipeline.contracts import Manifest
from pipeline.model import autocast_for, build_model
from pipeline.throughput import matmul_size, measure_matmul_flops
from pipeline.train import Dist, end_process_group, seed_everything, setup_distributed

OUT_ENV = "LMFORGE_BENCH_OUT"  # where rank 0 writes its result
MATMUL_REPEATS = 16  # per try of the peak measurement


def main() -> None:
    ws = Workspace.find()
    params = load_params(ws.root)
    cfg, mcfg = params.train, params.model
    dist = setup_distributed(cfg.threads_per_rank)
    manifest = Manifest.read(ws.shards_dir)
    seed_everything(cfg.seed)
    model = build_model(mcfg, manifest.vocab_size, manifest.eos_token_id).to(dist.device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.world_size > 1 else model
    forward = torch.compile(ddp) if cfg.compile else ddp
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=dist.device.type == "cuda"
    )
    peak = matmul_peak(dist)

    model.train()
    records = []
    step_tokens = cfg.batch_size * mcfg.block_size * cfg.grad_accum * dist.world_size
    for step in range(cfg.max_steps):
        start = time.perf_counter()
        for micro in range(cfg.grad_accum):
            batch = torch.randint(
                0, manifest.vocab_size, (cfg.batch_size, mcfg.block_size), device=dist.device
            )
            last = micro == cfg.grad_accum - 1
            with (
                ddp.no_sync() if dist.world_size > 1 and not last else nullcontext(),
                autocast_for(dist.device),
            ):
                loss = forward(input_ids=batch, labels=batch).loss / cfg.grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()  # the stage syncs on its loss every step too
        records.append({"step": step + 1, "tokens_per_s": step_tokens / (time.perf_counter() - start)})

    if dist.is_main:
        # what measure_matmul_flops multiplied in one try, on every rank
        flop = 2 * matmul_size(dist.device) ** 3 * MATMUL_REPEATS * dist.world_size
        result = {
            "step_tokens": step_tokens,
            "records": records,
            "peak_flop": flop,
            "peak_seconds": flop / peak,
        }
        Path(os.environ[OUT_ENV]).write_text(json.dumps(result) + "\n")
    if dist.world_size > 1:
        del forward, ddp  # see end_process_group
        end_process_group()


def matmul_peak(dist: Dist) -> float:
    """This machine's dense matmul FLOP/s, measured on every rank at once as in training: the best of 3."""
    peak = 0.0
    for _ in range(3):
        if dist.world_size > 1:
            torch.distributed.barrier()
        rate = torch.tensor(
            [measure_matmul_flops(dist.device, repeats=MATMUL_REPEATS)],
            dtype=torch.float64,
            device=dist.device,
        )
        if dist.world_size > 1:
            torch.distributed.all_reduce(rate)
        peak = max(peak, rate.item())
    return peak


if __name__ == "__main__":
    if "LOCAL_RANK" not in os.environ:
        sys.exit(
            "python -m benchmarks.bare_loop is the bare training loop run by torchrun; use `lmforge bench`"
        )
    main()
