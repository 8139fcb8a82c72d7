"""Data: the token shards preprocess wrote, as windows for training and evaluation, and the loss over them.

Shards are raw arrays opened with np.memmap, so nothing is loaded whole; the manifest (contracts.Manifest)
says their dtype and files. Text is cut into windows anywhere (TokenWindows); conversations are kept
whole and packed into rows (ConversationRows), and only the assistant's tokens are learnt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.config import ConfigError
from lmforge.runs.contracts import Manifest
from lmforge.training.loss import NextTokenLoss, body_inputs
from lmforge.training.model import autocast_for

IGNORE = -100  # the label of a token nothing is learnt from (transformers' and torch's ignore_index)


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


class ConversationRows:
    """Whole conversations, packed into rows of at most block_size tokens, from one rank's share of them.

    A batch is a dict of model inputs: `labels` hold the assistant's tokens (IGNORE elsewhere, and on
    each conversation's first token, which nothing before it may predict). Packed rows carry position_ids
    that restart at each conversation (attention then stays inside it, see model.body_inputs); with
    packed=False each row holds one conversation and an attention mask over its padding, for a model
    that cannot keep packed conversations apart."""

    def __init__(self, shards_dir: Path, manifest: Manifest, split: str, block_size: int, rank: int = 0,
                 world_size: int = 1, packed: bool = True):  # fmt: skip
        self.block, self.packed, self.pad = block_size, packed, manifest.eos_token_id
        dtype = np.dtype(manifest.dtype)
        self.tokens, self.masks, found = [], [], []
        for k, shard in enumerate(manifest.splits[split].shards):
            self.tokens.append(np.memmap(shards_dir / shard.file, dtype=dtype, mode="r"))
            self.masks.append(np.memmap(shards_dir / shard.mask, dtype=np.uint8, mode="r"))
            starts = np.fromfile(shards_dir / shard.starts, dtype=np.uint32).astype(np.int64)
            ends = np.append(starts[1:], len(self.tokens[-1]))
            found += [(k, int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)]
        mine = found[len(found) * rank // world_size : len(found) * (rank + 1) // world_size]
        self.rows: list[list[tuple[int, int, int]]] = []
        for conversation in mine:  # in corpus order, each row filled as far as the next one fits
            if not packed or not self.rows or sum(c[2] for c in self.rows[-1]) + conversation[2] > block_size:
                self.rows.append([])
            self.rows[-1].append(conversation)
        if not self.rows:
            raise ConfigError(
                f"the {split} split has {len(found):,} conversations, none for rank {rank} of {world_size}: "
                "use more data or fewer processes"
            )

    def batch(self, batch_size: int, seed: int, step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([seed, step, micro, rank])
        return self.collate([self.rows[i] for i in rng.integers(len(self.rows), size=batch_size)])

    def fixed(self, limit: int | None) -> dict[str, torch.Tensor]:
        """Rows spread evenly over the split (all of them without a limit): the same every time."""
        picks = range(len(self.rows))
        if limit and len(self.rows) > limit:
            picks = np.linspace(0, len(self.rows) - 1, limit).round().astype(int)
        return self.collate([self.rows[i] for i in picks])

    def collate(self, rows: list[list[tuple[int, int, int]]]) -> dict[str, torch.Tensor]:
        ids = np.full((len(rows), self.block), self.pad, np.int64)
        labels = np.full((len(rows), self.block), IGNORE, np.int64)
        positions = np.zeros((len(rows), self.block), np.int64)
        attention = np.zeros((len(rows), self.block), np.int64)
        for r, row in enumerate(rows):
            at = 0
            for shard, start, length in row:
                span = slice(at, at + length)
                ids[r, span] = self.tokens[shard][start : start + length]
                mask = self.masks[shard][start : start + length].astype(bool)
                mask[0] = False
                labels[r, span] = np.where(mask, ids[r, span], IGNORE)
                positions[r, span] = np.arange(length)
                attention[r, span] = 1
                at += length
            positions[r, at:] = np.arange(self.block - at)  # the padding is a sequence of its own
        batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.packed:
            return batch | {"position_ids": torch.from_numpy(positions)}
        return batch | {"attention_mask": torch.from_numpy(attention)}


def rows_of(
    windows: torch.Tensor | dict[str, torch.Tensor], start: int, stop: int
) -> dict[str, torch.Tensor]:
    """Rows start:stop of text windows or of a conversation batch, as the loss's keyword arguments."""
    if isinstance(windows, dict):
        return {key: value[start:stop] for key, value in windows.items()}
    return {"input_ids": windows[start:stop]}


@torch.no_grad()
def mean_loss(
    loss: NextTokenLoss,
    windows: torch.Tensor | dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy over the windows (`loss`: a model's NextTokenLoss, or
    the module wrapping it), and how many tokens it covers: every next token of text, the assistant's
    tokens of conversations."""
    was_training = loss.training
    loss.eval()
    total, count = 0.0, 0
    rows = len(windows["input_ids"]) if isinstance(windows, dict) else len(windows)
    for i in range(0, rows, batch_size):
        batch = {key: value.to(device) for key, value in rows_of(windows, i, i + batch_size).items()}
        with autocast_for(device):
            value = loss(**batch)
        targets = batch.get("labels", batch["input_ids"])[:, 1:]
        n = int((targets != IGNORE).sum())
        total += value.item() * n
        count += n
    loss.train(was_training)
    return total / max(count, 1), count


@torch.no_grad()
def packing_isolates(model, rows: ConversationRows, device: torch.device) -> bool:
    """Whether the model keeps packed conversations apart: each conversation's logits in a packed row
    equal its logits alone. A model whose attention ignores restarting position_ids fails this."""
    row = next((r for r in rows.rows if len(r) > 1), None)
    if row is None:
        return True  # nothing is packed
    ids = rows.collate([row])
    was_training = model.training
    model.eval()
    packed = (
        model(**body_inputs(ids["input_ids"].to(device), ids["position_ids"].to(device))).logits[0].float()
    )
    at, worst = 0, 0.0
    for _, _, length in row:
        alone = model(**body_inputs(ids["input_ids"][:, at : at + length].to(device))).logits[0].float()
        gap = (packed[at : at + length] - alone).abs().max() / alone.abs().max().clamp(min=1e-6)
        worst, at = max(worst, float(gap)), at + length
    model.train(was_training)
    return worst < 1e-4
