"""The token shards on disk, written and read without torch: preprocess writes them and reads them back
for contamination, and importing torch there would add about 300 MB to its peak memory for nothing.

Shards are raw arrays opened with np.memmap, so nothing is loaded whole; the manifest (contracts.Manifest)
says their dtype and files.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

from lmforge.runs.contracts import Manifest


def load_shard(shards_dir: Path, split: str, manifest: Manifest | None = None) -> list[np.memmap]:
    """The split's shards as read-only memmaps (no copy into memory)."""
    manifest = manifest or Manifest.read(shards_dir)
    dtype = np.dtype(manifest.dtype)
    return [np.memmap(shards_dir / s.file, dtype=dtype, mode="r") for s in manifest.splits[split].shards]


def sorted_unique(values: np.ndarray, return_counts: bool = False):
    """np.unique by sort and compare: numpy 2.4's np.unique takes 23 s on 16 M uint64 here, np.sort 0.5 s."""
    ordered = np.sort(values)
    first = np.concatenate([[True], ordered[1:] != ordered[:-1]]) if len(ordered) else np.empty(0, bool)
    unique = ordered[first]
    if not return_counts:
        return unique
    return unique, np.diff(np.append(np.flatnonzero(first), len(ordered)))


class ShardWriter:
    """Appends token arrays to <split>_NNN.bin files of at most shard_tokens each.

    With masks (conversations), each array is one whole conversation, never cut across shards, and its
    loss mask goes to <split>_NNN.mask.bin and its first token's offset to <split>_NNN.starts.bin."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int, masks: bool = False):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._fh = None
        self.tokens = 0
        self.masks = masks
        self._mask_fh, self._starts = None, array("I")

    def write_conversation(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if self._fh is None or self.shards[-1]["tokens"] + len(ids) > self.shard_tokens:
            self._open_next()
        self._starts.append(self.shards[-1]["tokens"])
        mask.astype(np.uint8).tofile(self._mask_fh)
        self.write(ids)

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._fh is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, ids = ids[:room], ids[room:]
            chunk.astype(self.dtype, copy=False).tofile(self._fh)
            self.shards[-1]["tokens"] += len(chunk)
            self.tokens += len(chunk)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}"
        self._fh = (self.out_dir / f"{name}.bin").open("wb")
        self.shards.append({"file": f"{name}.bin", "tokens": 0})
        if self.masks:
            self._mask_fh = (self.out_dir / f"{name}.mask.bin").open("wb")
            self.shards[-1] |= {"mask": f"{name}.mask.bin", "starts": f"{name}.starts.bin"}

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._mask_fh is not None:
            self._mask_fh.close()
            self._mask_fh = None
            (self.out_dir / self.shards[-1]["starts"]).write_bytes(self._starts.tobytes())
            self._starts = array("I")
