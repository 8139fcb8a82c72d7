"""Data: the token shards preprocess wrote, as windows for training and evaluation, and the loss over them.

Shards are raw arrays opened with np.memmap, so nothing is loaded whole; the manifest (contracts.Manifest)
says their dtype and files.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.model import NextTokenLoss, autocast_for


class TokenWindows:
    """Random block_size+1 windows from one rank's slice of every shard; nothing is loaded whole."""

    def __init__(self, shards: list[np.ndarray], block_size: int, rank: int = 0, world_size: int = 1):
        self.block = block_size
        self.parts = []
        for shard in shards:
            lo, hi = len(shard) * rank // world_size, len(shard) * (rank + 1) // world_size
            if hi - lo > block_size + 1:
                self.parts.append((shard, lo, hi))
        if not self.parts:
            sizes = [len(s) for s in shards]
            raise ConfigError(
                f"model.block_size: the train split ({sum(sizes):,} tokens) has no window of {block_size + 1} tokens "
                f"for each of {world_size} ranks; use more data, fewer processes or a smaller block_size"
            )
        weights = np.array([hi - lo - block_size - 1 for _, lo, hi in self.parts], dtype=np.float64)
        self.weights = weights / weights.sum()

    def batch(self, batch_size: int, seed: int, step: int, micro: int, rank: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, step, micro, rank])
        picks = rng.choice(len(self.parts), size=batch_size, p=self.weights)
        rows = []
        for part in picks:
            shard, lo, hi = self.parts[part]
            start = int(rng.integers(lo, hi - self.block - 1))
            rows.append(shard[start : start + self.block])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def fixed_windows(shards: list[np.ndarray], block_size: int, limit: int | None) -> torch.Tensor:
    """Non-overlapping windows spread evenly over the split (all of them without a limit): the same every time."""
    starts = [(k, i * block_size) for k, shard in enumerate(shards) for i in range(len(shard) // block_size)]
    if not starts:
        raise ConfigError(
            f"model.block_size: the evaluation split is shorter than one window of {block_size} tokens"
        )
    if limit and len(starts) > limit:
        starts = [starts[j] for j in np.linspace(0, len(starts) - 1, limit).round().astype(int)]
    return torch.from_numpy(np.stack([shards[k][i : i + block_size] for k, i in starts]).astype(np.int64))


@torch.no_grad()
def mean_loss(loss: NextTokenLoss, windows: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy over the windows (`loss`: a model's NextTokenLoss, or
    the module wrapping it), and how many tokens it covers."""
    was_training = loss.training
    loss.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        with autocast_for(device):
            value = loss(batch)
        n = batch.numel() - len(batch)  # each window predicts all but its first token
        total += value.item() * n
        count += n
    loss.train(was_training)
    return total / count, count
