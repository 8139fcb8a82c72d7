"""Throughput accounting: FLOPs per token, this machine's matmul peak, and the steady state of a run.

One policy for all of it, used by the train stage's log and summary and by `lmforge bench`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.model import count_parameters

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
