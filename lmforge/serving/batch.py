"""The KV cache of the rows decoding together: rows join it (left-padded to one width, their caches
concatenated) and leave it (the cache sliced), between two decode steps."""

from __future__ import annotations

import torch

from lmforge.serving.rows import Row


class Batch:
    """The rows decoding together: their KV cache, attention mask, next positions and last logits.

    Row i of every tensor is rows[i]. Rows join with left padding, so all end in the same column."""

    def __init__(self):
        self.rows: list[Row] = []
        self.cache = self.mask = self.positions = self.logits = None

    @property
    def mergeable(self) -> bool:
        """Whether rows can join mid-decode: a cache of plain per-layer key/value tensors. Sliding-window
        and recurrent caches cannot be padded like that, so such models decode in waves."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        return type(self.cache) is DynamicCache and all(
            type(layer) is DynamicLayer for layer in self.cache.layers
        )

    def join(self, rows: list[Row], cache, mask, positions, logits) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.logits = (
                rows,
                cache,
                mask,
                positions,
                logits,
            )
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([pad_left(mine.keys, width, 2), pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([pad_left(mine.values, width, 2), pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([pad_left(self.mask, width, 1), pad_left(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.rows = self.rows + rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows; then drop leading columns that are padding for every row left."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache = self.mask = self.positions = self.logits = None
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead and self.mergeable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]


def pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros before `tensor` along dim, up to width (a zero mask column hides the zero keys)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
