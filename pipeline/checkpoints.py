"""Checkpoints: <dir>/step_000100/{model.safetensors, state.pt}, written beside and renamed into place.

A checkpoint holds the weights (safetensors), the optimizer, the scheduler, every RNG state, the step
and the run's fingerprint, so a restarted run continues exactly, and never from another run's state.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Params
from pipeline.contracts import Manifest


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_dir: Path, model, optimizer, scheduler, step: int, fingerprint: str, keep: int
) -> Path:
    from safetensors.torch import save_model

    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles GPT-2's tied embedding weights
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng(),
    }
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    # Keep this run's newest `keep`. Another run's checkpoints (other data or params) can never be resumed
    # here, and pruned by name alone they would outlive this run's own: step_000100 of a new run sorts
    # before step_000400 of the last one, and was deleted the moment it was written.
    every = sorted(ckpt_dir.glob("step_*"))
    mine = [path for path in every if checkpoint_fingerprint(path) == fingerprint]
    for old in every:
        if old not in mine[-keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_fingerprint(path: Path) -> str | None:
    """The run a checkpoint belongs to, read without loading its tensors (None when unreadable)."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True, mmap=True)
        return state.get("fingerprint")
    except Exception:  # noqa: BLE001 - a truncated or corrupt file surfaces as many error types
        return None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Load one checkpoint into model/optimizer/scheduler; raises on any damage."""
    from safetensors.torch import load_model

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def resume_latest(ckpt_dir: Path, fingerprint: str, model, optimizer, scheduler, log) -> int:
    """The step to continue from: the newest readable checkpoint of this same run, else 0.

    A damaged checkpoint falls back to the one before it; a checkpoint of another run (other data or
    params) is never resumed, and is passed over: an older one of this run may lie beyond it.
    """
    for path in sorted(ckpt_dir.glob("step_*"), reverse=True):
        try:
            peek = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            if peek.get("fingerprint") != fingerprint:
                log(f"checkpoint {path.name} belongs to another run (data or params changed): not resumed")
                continue
            state = load_checkpoint(path, model, optimizer, scheduler)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt files surface as many error types
            log(
                f"checkpoint {path.name} is unreadable ({type(exc).__name__}: {exc}); falling back to the previous one"
            )
            continue
        restore_rng(state["rng"])
        log(f"resuming from {path.name}")
        return int(state["step"])
    return 0


def run_fingerprint(params: Params, shards_dir: Path) -> str:
    """What makes two runs the same run: the model and train params, and the data they see."""
    payload = json.dumps(
        {"model": params.model.model_dump(), "train": params.train.model_dump(exclude={"max_restarts"})},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(payload + (shards_dir / Manifest.FILE).read_bytes()).hexdigest()[:16]
