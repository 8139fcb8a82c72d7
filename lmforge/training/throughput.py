"""Throughput accounting: FLOPs per token, this machine's matmul peak, MFU, and the steady state of a run.

One definition for all of it, used by the train stage (its progress bar, train_log.jsonl and
train_summary.json, which evaluate copies into metrics.json) and by `lmforge bench`:
MFU = tokens/s x flops_per_token / peak_flops, where peak_flops is measured on every rank at once.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.training.model import count_parameters

# The first fifth of a run's steps is warm-up (allocator, caches, thread pools); rates exclude it.
WARMUP_PERCENT = 20


def steady(records: list[dict]) -> list[dict]:
    """The train log's records past the warm-up."""
    return records[len(records) * WARMUP_PERCENT // 100 :]


def steady_median(records: list[dict], key: str) -> float | None:
    """The median of key over the steady records (None for an empty log)."""
    values = [r[key] for r in steady(records)]
    return float(np.median(values)) if values else None


def flops_per_token(model, cfg: ModelConfig) -> float:
    """6N for the matmuls forward and backward, plus attention (the PaLM / nanoGPT estimate)."""
    n = count_parameters(model)
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the model's matmuls need at this rate, over the peak
    (peak_flops). Above 1 is a wrong peak or a wrong rate, never a fast run."""
    return tokens_per_s * flops_per_token / peak


PEAK_TRIES = 3  # peak_flops keeps the best of this many
PEAK_REPEATS = 16  # matmuls per try (on a CPU, 2 x 1024^3 FLOP each: about 0.2 s a try per core here)


def peak_flops(device: torch.device, world_size: int = 1) -> float:
    """The dense matmul FLOP/s of all ranks together: the peak that MFU divides by.

    Every rank measures at the same time, as training runs (a barrier first, so a rank still importing
    or building its model cannot leave the other one measuring alone, or sharing the cores with that
    work), with its own thread setting, which must be the training one. The ranks' rates are summed;
    the best of PEAK_TRIES sums is kept. With world_size > 1 every rank must call it (a collective),
    and every rank gets the same number."""
    distributed = world_size > 1
    best = 0.0
    for _ in range(PEAK_TRIES):
        if distributed:
            torch.distributed.barrier()
        rate = torch.tensor(
            [measure_matmul_flops(device, repeats=PEAK_REPEATS)], dtype=torch.float64, device=device
        )
        if distributed:
            torch.distributed.all_reduce(rate)  # the sum over ranks
        best = max(best, rate.item())
    return best


def peak_try_flop(device: torch.device, world_size: int = 1) -> float:
    """The FLOP that one try of peak_flops multiplies, summed over the ranks."""
    return 2 * matmul_size(device) ** 3 * PEAK_REPEATS * world_size


def matmul_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 1024  # a GPU needs a big matmul to reach its peak


def measure_matmul_flops(device: torch.device, size: int | None = None, repeats: int = 8) -> float:
    """This process's dense matmul FLOP/s in the dtype training computes in (fp32 on a CPU, bf16 on a
    GPU that has it), with its thread setting: the peak that MFU divides by."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    size = size or matmul_size(device)
    # A generator of its own: drawing from the global one after a resume restored it would shift every
    # dropout mask of the resumed run against the uninterrupted one.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen, dtype=dtype)
    b = torch.randn(size, size, device=device, generator=gen, dtype=dtype)
    a @ b  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)
