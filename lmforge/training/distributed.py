"""The ranks of a training run: torchrun's process group and device, the model as the ranks train it
(replicas with DDP, shards with FSDP2), and what the ranks must agree on.

gloo on CPU, nccl on CUDA. Each helper that gathers is called by every rank; with one process they
return at once, without a process group.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import ConfigError, Params, TrainConfig
from lmforge.runs.contracts import Manifest
from lmforge.training.checkpoints import capture_rng
from lmforge.training.loss import FusedNextTokenLoss, NextTokenLoss, training_loss
from lmforge.training.model import build_model, transformer_blocks, with_lora


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(threads_per_rank: int) -> Dist:
    """Join torchrun's process group (or run alone); the backend follows the device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads_per_rank)
        backend = "gloo"
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            store=attempt_store(rank, world),
            rank=rank,
            world_size=world,
            device_id=device if backend == "nccl" else None,
        )
    return Dist(rank, local_rank, world, device)


def attempt_store(rank: int, world_size: int):
    """torchrun's agent store, with keys of its own for this restart attempt.

    torchrun keeps one agent store across restarts, and gloo publishes each rank's address under a fixed
    key: a restarted rank could read its peer's address from the dead attempt and wait on it forever in
    gloo's connectFullMesh. A prefix per attempt keeps them apart.
    Across nodes each agent counts its own restarts, so the count is no common key there; multi-node
    runs get a fresh store from rank 0 every round instead (see infra.torchrun), and need no prefix.
    """
    from torch.distributed import PrefixStore, TCPStore

    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=rank == 0 and not agent_hosts_it, multi_tenant=not agent_hosts_it,
    )  # fmt: skip
    if not agent_hosts_it:
        return base
    return PrefixStore(f"lmforge/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def end_process_group() -> None:
    """Destroy the process group, once every DDP wrapper of the caller is deleted.

    DDP's reducer must not drop the last reference to the gloo group: its destructor would then join
    gloo's threads while holding the GIL, and a thread that needs the GIL to free a tensor deadlocks
    the rank. destroy_process_group releases the GIL, after a
    barrier whose wait lets those threads finish."""
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@contextmanager
def gradient_sync(wrapper, sync: bool):
    """Within it, backward syncs gradients across the ranks only if `sync`: DDP's no_sync, FSDP2's
    set_requires_gradient_sync (read in backward, so backward runs inside)."""
    if sync:
        yield
    elif isinstance(wrapper, torch.nn.parallel.DistributedDataParallel):
        with wrapper.no_sync():
            yield
    elif hasattr(wrapper, "set_requires_gradient_sync"):  # an FSDPModule
        wrapper.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapper.set_requires_gradient_sync(True)
    else:  # one process: nothing to sync
        yield


def every_rank(mine, dist: Dist) -> list:
    """Each rank's value, in rank order (every rank must call this)."""
    if dist.world_size == 1:
        return [mine]
    values = [None] * dist.world_size
    torch.distributed.all_gather_object(values, mine)
    return values


def every_rank_rng(dist: Dist) -> list[dict]:
    """Each rank's RNG states, in rank order, for rank 0 to checkpoint (every rank must call this)."""
    return every_rank(capture_rng(), dist)


def agree_on_step(step: int, dist: Dist) -> None:
    """Every rank resumed from the same step, or none goes on: a rank that found another checkpoint (no
    shared checkpoint directory across nodes) would otherwise wait forever at a collective."""
    if dist.world_size == 1:
        return
    steps = every_rank(step, dist)
    if len(set(steps)) > 1:
        by_rank = ", ".join(f"rank {r}: step {s}" for r, s in enumerate(steps))
        raise ConfigError(
            f"the ranks resumed from different checkpoints ({by_rank}): every node needs the same "
            "artifacts/checkpoints (a shared filesystem), or remove them to start again"
        )


def agreed_loss(model, sample: torch.Tensor, dist: Dist) -> tuple[NextTokenLoss, str]:
    """The training loss (fused where the model allows it), the same on every rank: DDP's gradient sync
    hangs unless every rank runs the same graph."""
    loss_module, loss_kind = training_loss(model, sample)
    if dist.world_size > 1:
        fused = torch.tensor(
            [isinstance(loss_module, FusedNextTokenLoss)], dtype=torch.int32, device=dist.device
        )
        torch.distributed.all_reduce(fused, op=torch.distributed.ReduceOp.MIN)
        if not fused.item() and isinstance(loss_module, FusedNextTokenLoss):
            loss_module, loss_kind = NextTokenLoss(model), "the model's own (another rank's check said so)"
    return loss_module, loss_kind


def weight_sum(model) -> float:
    with torch.no_grad():
        return torch.stack([p.double().sum() for p in model.parameters()]).sum().item()


def rank_checksums(model, dist: Dist) -> list[float]:
    """Every rank's sum of its weights: equal when DDP did its job (checked, not trusted)."""
    if dist.world_size == 1:
        return [weight_sum(model)]
    checksum = torch.tensor([weight_sum(model)], dtype=torch.float64, device=dist.device)
    checksums = [torch.zeros_like(checksum) for _ in range(dist.world_size)]
    torch.distributed.all_gather(checksums, checksum)
    return [c.item() for c in checksums]


def parallelize(loss_module: NextTokenLoss, model, cfg: TrainConfig, dist: Dist) -> torch.nn.Module:
    """The loss module as the ranks train it: alone, wrapped in DDP, or sharded in place with FSDP2.

    FSDP2 shards each transformer block, then the loss module as the root, which holds what is left (the
    embeddings, the final norm, the head). The root, not the model, because the fused loss calls the
    model's body and head apart: the root's hooks gather them for the whole loss either way."""
    if cfg.strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(loss_module) if dist.world_size > 1 else loss_module
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))  # explicit: the default is CUDA's
    bf16 = dist.device.type == "cuda" and torch.cuda.is_bf16_supported()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    return fully_shard(loss_module, **options)


def gathered_copy(model, params: Params, manifest: Manifest, base_dir: Path | None, dist: Dist):
    """Rank 0's whole, unsharded copy of an FSDP model (and its peft wrapper for a LoRA run), to export;
    (None, None) on the other ranks. Every rank takes part in the gather."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None, None
    copy = build_model(params.model, manifest.vocab_size, manifest.eos_token_id, base_dir)
    adapted = with_lora(copy, params.train.lora) if params.train.method == "lora" else None
    if adapted is not None:
        copy = adapted.get_base_model()
    copy.load_state_dict(weights)
    return copy, adapted
