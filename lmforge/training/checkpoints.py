"""Checkpoints: <dir>/step_000100/{model.safetensors, state.pt}, written beside and renamed into place.
An FSDP run's checkpoint holds sharded/ (torch.distributed.checkpoint: each rank's shards of the weights
and the optimizer) instead of model.safetensors, and resumes on the same world size.

A checkpoint holds the weights (safetensors), the optimizer, the scheduler, every rank's RNG states, the
step and the run's fingerprint, so a restarted run continues exactly, and never from another run's
state. The fingerprint covers what gives the weights their meaning (the model, the data, the optimizer's
hyperparameters, the seed and the data order), not how long the run goes or how often it logs: raising
max_steps continues the run. Another run's checkpoints are set aside under other-runs/, never deleted.
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

from infra.atomic import replace_dir
from lmforge.config import Params
from lmforge.runs.contracts import Manifest


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    """One rank's RNG states, as capture_rng took them."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


OTHER_RUNS = "other-runs"  # under the checkpoint dir: other runs' checkpoints, set aside by fingerprint


SHARDED = "sharded"  # in a checkpoint of an FSDP run: the weights and optimizer state, one file per rank


def save_checkpoint(
    ckpt_dir: Path, model, optimizer, scheduler, step: int, fingerprint: str, keep: int,
    rng: list[dict] | None = None, rank: int = 0, sharded: bool = False,
) -> Path:  # fmt: skip
    """rng: every rank's RNG states, in rank order (capture_rng on each); None: this process's alone.

    Unsharded (DDP, one process), rank 0 alone calls this. Sharded (FSDP), every rank calls it and writes
    its shards with torch.distributed.checkpoint; rank 0 writes the rest and renames it into place."""
    from safetensors.torch import save_file, save_model

    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp-step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if sharded:
        import torch.distributed.checkpoint as dcp

        torch.distributed.barrier()  # the directory exists before any rank writes into it
        dcp.save(sharded_state(model, optimizer), checkpoint_id=tmp / SHARDED)  # returns once all ranks wrote
        if rank != 0:
            return final
    else:
        trainable = trainable_weights(model)
        if trainable is None:
            save_model(model, str(tmp / "model.safetensors"))  # handles GPT-2's tied embedding weights
        else:  # the base is frozen: the adapters alone, a small checkpoint
            save_file(trainable, str(tmp / "model.safetensors"))
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "scheduler": scheduler.state_dict(),
        "rng": rng or [capture_rng()],
    }
    if not sharded:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, tmp / "state.pt")
    replace_dir(tmp, final)
    # Keep this run's newest `keep`. Another run's checkpoints (other data or params) cannot be resumed
    # here, and left among them they would be pruned by name (step_000100 of this run sorts before
    # step_000400 of the last): they are set aside whole, for the user to look into or go back to.
    every = sorted(ckpt_dir.glob("step_*"))
    mine = [path for path in every if checkpoint_fingerprint(path) == fingerprint]
    for old in every:
        if old in mine[-keep:]:
            continue
        if old in mine:
            shutil.rmtree(old, ignore_errors=True)
        else:
            aside = ckpt_dir / OTHER_RUNS / (checkpoint_fingerprint(old) or "unreadable") / old.name
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(old, aside)
    return final


def checkpoint_fingerprint(path: Path) -> str | None:
    """The run a checkpoint belongs to, read without loading its tensors (None when unreadable)."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True, mmap=True)
        return state.get("fingerprint")
    except Exception:  # noqa: BLE001 - a truncated or corrupt file surfaces as many error types
        return None


def trainable_weights(model) -> dict[str, torch.Tensor] | None:
    """The weights a checkpoint must hold when part of the model is frozen (LoRA); None when all train."""
    if all(p.requires_grad for p in model.parameters()):
        return None
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def sharded_options():
    """This rank's shards, frozen weights left out (a LoRA run's base is not the checkpoint's to keep)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def sharded_state(model, optimizer) -> dict:
    """The model's and optimizer's state as this rank's shards (DTensors), for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=sharded_options())
    return {"model": model_state, "optimizer": optimizer_state}


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Load one checkpoint into model/optimizer/scheduler; raises on any damage."""
    from safetensors.torch import load_file, load_model

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if (path / SHARDED).is_dir():  # every rank reads its own shards
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        shards = sharded_state(model, optimizer)
        dcp.load(shards, checkpoint_id=path / SHARDED)
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"],
                       options=sharded_options())  # fmt: skip
        scheduler.load_state_dict(state["scheduler"])
        return state
    device = str(next(model.parameters()).device)
    trainable = trainable_weights(model)
    if trainable is None:
        load_model(model, str(path / "model.safetensors"), device=device)
    else:
        weights = load_file(str(path / "model.safetensors"), device=device)
        if set(weights) != set(trainable):
            raise ValueError("its weights are not this model's trainable ones")
        model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def resume_latest(
    ckpt_dir: Path, fingerprint: str, model, optimizer, scheduler, log, rank: int = 0, max_steps: int | None = None
) -> int:
    """The step to continue from: the newest readable checkpoint of this same run, else 0. The rank's
    own RNG states come back with it.

    A damaged checkpoint falls back to the one before it; a checkpoint of another run (other data or
    params), or one past max_steps (the run was shortened), is never resumed, and is passed over: an
    older one of this run may lie beyond it.
    """
    for path in sorted(ckpt_dir.glob("step_*"), reverse=True):
        try:
            peek = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            if peek.get("fingerprint") != fingerprint:
                log(f"checkpoint {path.name} belongs to another run (data or params changed): not resumed")
                continue
            if max_steps is not None and int(peek["step"]) > max_steps:
                log(f"checkpoint {path.name} is past train.max_steps ({max_steps}): not resumed")
                continue
            state = load_checkpoint(path, model, optimizer, scheduler)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt files surface as many error types
            log(
                f"checkpoint {path.name} is unreadable ({type(exc).__name__}: {exc}); falling back to the previous one"
            )
            continue
        restore_rng(state["rng"][rank])  # the fingerprint fixes the world size: every rank has its own
        log(f"resuming from {path.name}")
        return int(state["step"])
    return 0


# Train settings that change neither the weights' meaning nor the data order (how long, how logged, how
# computed): a run that changes only these continues from its checkpoints. (The schedule's length, max_steps, is among them: a longer run
# continues on the schedule of its new length, as nanoGPT and torchtune resume.)
RUN_LOGISTICS = {
    "max_steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "compile",
    "rdzv_endpoint", "rdzv_id", "max_restarts", "threads_per_rank", "nproc_per_node", "nnodes",
    "activation_checkpointing",
}  # fmt: skip


def run_fingerprint(params: Params, shards_dir: Path) -> str:
    """What makes two runs the same run: the model, the optimizer's settings, the seed, the world size
    (each rank's slice of the data and its RNG), and the data they see."""
    train = params.train.model_dump(exclude=RUN_LOGISTICS)
    train["world_size"] = params.train.nproc_per_node * params.train.nnodes
    payload = json.dumps({"model": params.model.model_dump(), "train": train}, sort_keys=True).encode()
    return hashlib.sha256(payload + (shards_dir / Manifest.FILE).read_bytes()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Every RNG a run draws from: torch's, Python's and numpy's (capture_rng saves the same three)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
