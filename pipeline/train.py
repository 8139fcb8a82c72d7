"""Train: token shards -> a causal LM, with DDP under torchrun.

`python -m pipeline.train` outside torchrun launches torchrun with the settings in params (that is the
DVC stage's command); inside torchrun it is one rank. gloo on CPU, nccl on CUDA, bf16 autocast on GPUs
that have it. Only rank 0 logs, evaluates and writes.

A run is resumable: a checkpoint holds the weights (safetensors), the optimizer, the scheduler, every
RNG state and the step. The batch of step s on rank r is a pure function of (seed, s, r), so the
data position is the step itself and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pipeline.config import ConfigError, ModelConfig, Params, TrainConfig, Workspace, load_params
from pipeline.preprocess import MANIFEST, load_shard

# ---------------------------------------------------------------------------------------------
# the process group and device


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
    key: a restarted rank could read its peer's address from the dead attempt and wait on it forever
    (seen here: both ranks stuck in gloo's connectFullMesh). A prefix per attempt keeps them apart.
    """
    from torch.distributed import PrefixStore, TCPStore

    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=rank == 0 and not agent_hosts_it, multi_tenant=not agent_hosts_it,
    )  # fmt: skip
    return PrefixStore(f"lmforge/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def autocast_for(device: torch.device):
    """bf16 autocast where the GPU supports it; full fp32 elsewhere (CPU bf16 is slower here)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------
# schedule and optimizer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; matrices decay, biases and norms do not (the usual GPT-2 recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )
    # LambdaLR multiplies the base lr; lr_at gives absolute values, hence the division.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------
# data: windows from memmapped shards


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
def mean_loss(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the windows, and how many tokens it covers."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        with autocast_for(device):
            loss = model(input_ids=batch, labels=batch).loss
        n = batch.numel() - len(batch)  # each window predicts all but its first token
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / count, count


# ---------------------------------------------------------------------------------------------
# checkpoints: <dir>/step_000100/{model.safetensors, state.pt}, written beside and renamed into place


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
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    params) is never resumed.
    """
    for path in sorted(ckpt_dir.glob("step_*"), reverse=True):
        try:
            peek = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            if peek.get("fingerprint") != fingerprint:
                log(f"checkpoint {path.name} belongs to another run (data or params changed): starting fresh")
                return 0
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
    return hashlib.sha256(payload + (shards_dir / MANIFEST).read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# throughput accounting


def flops_per_token(model, cfg: ModelConfig) -> float:
    """6N for the matmuls forward and backward, plus attention (the PaLM / nanoGPT estimate)."""
    n = sum(p.numel() for p in model.parameters())
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


# ---------------------------------------------------------------------------------------------
# the training loop (one rank)


def train(params: Params, ws: Workspace, base_dir: Path | None = None) -> dict | None:
    from tqdm import tqdm

    from pipeline.model import FusedNextTokenLoss, NextTokenLoss, build_model, training_loss

    cfg, mcfg = params.train, params.model
    dist = setup_distributed(cfg.threads_per_rank)
    log = (lambda msg: print(msg, flush=True)) if dist.is_main else (lambda msg: None)
    torch.manual_seed(cfg.seed)  # same seed on every rank: identical initial weights
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    manifest = json.loads((ws.shards_dir / MANIFEST).read_text())
    model = build_model(mcfg, manifest["vocab_size"], manifest["eos_token_id"], base_dir).to(dist.device)
    optimizer, scheduler = build_optimizer(model, cfg, dist.device)
    fingerprint = run_fingerprint(params, ws.shards_dir)
    step = resume_latest(ws.checkpoints_dir, fingerprint, model, optimizer, scheduler, log)

    windows = TokenWindows(load_shard(ws.shards_dir, "train"), mcfg.block_size, dist.rank, dist.world_size)
    val_windows = fixed_windows(
        load_shard(ws.shards_dir, "val"), mcfg.block_size, cfg.eval_batches * cfg.batch_size
    )
    loss_module, loss_kind = training_loss(model, val_windows[:2].to(dist.device))  # the same on every rank
    if dist.world_size > 1:  # every rank must run the same graph, or DDP's gradient sync hangs
        fused = torch.tensor(
            [isinstance(loss_module, FusedNextTokenLoss)], dtype=torch.int32, device=dist.device
        )
        torch.distributed.all_reduce(fused, op=torch.distributed.ReduceOp.MIN)
        if not fused.item() and isinstance(loss_module, FusedNextTokenLoss):
            loss_module, loss_kind = NextTokenLoss(model), "the model's own (another rank's check said so)"
    ddp = torch.nn.parallel.DistributedDataParallel(loss_module) if dist.world_size > 1 else loss_module
    forward = torch.compile(ddp) if cfg.compile else ddp

    tokens_per_step = cfg.batch_size * mcfg.block_size * cfg.grad_accum * dist.world_size
    peak = measure_matmul_flops(dist.device) * dist.world_size
    flops_tok = flops_per_token(model, mcfg)
    if dist.is_main:
        ws.train_log.parent.mkdir(parents=True, exist_ok=True)
        _truncate_log(ws.train_log, step)
        log(f"train: {sum(p.numel() for p in model.parameters()):,} params, {dist.world_size} x {dist.device.type}, "
            f"{tokens_per_step:,} tokens/step, steps {step} -> {cfg.max_steps}; loss: {loss_kind}")  # fmt: skip

    model.train()
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        unit="step",
        disable=not dist.is_main,
        file=sys.stdout,
        mininterval=1.0 if sys.stdout.isatty() else 10.0,
    )  # a log file gets a line every 10 s
    tick = time.perf_counter()
    while step < cfg.max_steps:
        loss_sum = torch.zeros((), device=dist.device)
        for micro in range(cfg.grad_accum):
            batch = windows.batch(cfg.batch_size, cfg.seed, step, micro, dist.rank).to(dist.device)
            # Gradients sync once per optimizer step, on the last micro-step only.
            sync = micro == cfg.grad_accum - 1 or dist.world_size == 1
            with nullcontext() if sync else ddp.no_sync(), autocast_for(dist.device):
                loss = forward(batch) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.world_size > 1:
            torch.distributed.all_reduce(loss_sum)  # gloo has no AVG: sum, then divide
            loss_sum /= dist.world_size
        step += 1

        now = time.perf_counter()
        tok_s = tokens_per_step / (now - tick)
        tick = now
        record = {
            "step": step,
            "train_loss": round(loss_sum.item(), 5),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": round(tok_s),
        }
        if dist.is_main and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            record["val_loss"] = round(mean_loss(model, val_windows, cfg.batch_size, dist.device)[0], 5)
            tick = time.perf_counter()  # evaluation time is not training throughput
        if dist.is_main:
            mfu = tok_s * flops_tok / peak
            bar.set_postfix(
                loss=f"{record['train_loss']:.3f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{tok_s:,.0f}",
                mfu=f"{mfu:.2f}",
                refresh=False,  # update() redraws at most every mininterval; a refresh here would print every step
            )
            bar.update(1)
            with ws.train_log.open("a") as fh:
                fh.write(json.dumps(record | {"mfu": round(mfu, 4)}) + "\n")
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            if dist.is_main:
                save_checkpoint(
                    ws.checkpoints_dir, model, optimizer, scheduler, step, fingerprint, cfg.keep_checkpoints
                )
            if dist.world_size > 1:
                torch.distributed.barrier()  # no rank runs ahead of a checkpoint it may need to resume from
            tick = time.perf_counter()  # nor is checkpoint I/O
    bar.close()

    # DDP must leave every rank with the same weights; check it rather than trust it.
    with torch.no_grad():
        checksum = (
            torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1).to(dist.device)
        )
    checksums = [torch.zeros_like(checksum) for _ in range(dist.world_size)]
    if dist.world_size > 1:
        torch.distributed.all_gather(checksums, checksum)
    else:
        checksums = [checksum]
    summary = None
    if dist.is_main:
        summary = _export(model, ws, params, [c.item() for c in checksums])
        log(f"train: final model in {ws.model_dir}")
    if dist.world_size > 1:
        del forward, ddp  # see end_process_group
        end_process_group()
    return summary


def end_process_group() -> None:
    """Destroy the process group, once every DDP wrapper of the caller is deleted.

    DDP's reducer must not drop the last reference to the gloo group: its destructor would then join
    gloo's threads while holding the GIL, and a thread that needs the GIL to free a tensor deadlocks
    the rank (seen here once in a few dozen runs). destroy_process_group releases the GIL, after a
    barrier whose wait lets those threads finish."""
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step: a restart continues the curve instead of doubling it."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill that caused this restart
            continue
        if record["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def _export(model, ws: Workspace, params: Params, rank_checksums: list[float]) -> dict:
    """save_pretrained (safetensors) + the tokenizer, renamed into artifacts/model when complete."""
    from transformers import AutoTokenizer

    tmp = ws.model_dir.with_name(".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(ws.tokenizer_dir).save_pretrained(tmp)
    records = [json.loads(line) for line in ws.train_log.read_text().splitlines() if line]
    rates = [r["tokens_per_s"] for r in records[len(records) // 5 :]]  # skip warm-up steps
    summary = {
        "steps": records[-1]["step"] if records else 0,
        "final_train_loss": records[-1]["train_loss"] if records else None,
        "tokens_per_s": round(float(np.median(rates))) if rates else None,
        "mfu": round(float(np.median([r["mfu"] for r in records[len(records) // 5 :]])), 4)
        if records
        else None,
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "rank_weight_checksums": rank_checksums,
    }
    (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(ws.model_dir, ignore_errors=True)
    os.replace(tmp, ws.model_dir)
    return summary


# ---------------------------------------------------------------------------------------------
# launching torchrun


def torchrun_command(cfg: TrainConfig, module: str = "pipeline.train") -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pipeline.launch",  # torchrun, with a single node's stores on loopback
        f"--nproc-per-node={cfg.nproc_per_node}",
        f"--max-restarts={cfg.max_restarts}",
    ]
    if cfg.nnodes == 1:
        cmd += (
            ["--standalone", "--local-addr=127.0.0.1"]
            if cfg.rdzv_endpoint.endswith(":0")
            else ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}"]
        )
    else:
        cmd += [
            f"--nnodes={cfg.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={cfg.rdzv_endpoint}",
            f"--rdzv-id={cfg.rdzv_id}",
        ]
    return cmd + ["-m", module]


def torchrun_env(cfg: TrainConfig) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": str(cfg.threads_per_rank),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cfg.nnodes == 1 and not torch.cuda.is_available():
        env["GLOO_SOCKET_IFNAME"] = os.environ.get(
            "GLOO_SOCKET_IFNAME", "lo"
        )  # keep single-node gloo on loopback
    return env


def preflight(params: Params, ws: Workspace) -> None:
    """What every rank would check, checked once before torchrun starts.

    A rank that fails a check exits, torchrun restarts it max_restarts times, and the error drowns in
    its output; here it costs no process and no checkpoint.
    """
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.generation import context_length
    from pipeline.model import resolve_base

    if not (ws.shards_dir / MANIFEST).is_file():
        raise ConfigError(f"{ws.shards_dir}: no token shards; run the preprocess stage first")
    manifest = json.loads((ws.shards_dir / MANIFEST).read_text())
    mcfg, world = params.model, params.train.nproc_per_node * params.train.nnodes
    train_shards = load_shard(ws.shards_dir, "train")  # memmaps: nothing is read whole
    for rank in range(world):
        TokenWindows(train_shards, mcfg.block_size, rank, world)
    fixed_windows(load_shard(ws.shards_dir, "val"), mcfg.block_size, 1)

    context = mcfg.block_size
    if mcfg.base:
        base = AutoConfig.from_pretrained(resolve_base(mcfg.base, ws, params))
        context = context_length(SimpleNamespace(config=base))  # it reads model.config only
        if mcfg.block_size > context:
            raise ConfigError(
                f"model.block_size {mcfg.block_size} exceeds the base model's context {context}"
            )
        if base.vocab_size < manifest["vocab_size"]:
            raise ConfigError(
                f"model.base: its vocabulary ({base.vocab_size}) is smaller than the tokenizer's "
                f"({manifest['vocab_size']})"
            )
    # evaluate generates from each prompt with this model: prompt + new tokens must fit its positions
    tokenizer = AutoTokenizer.from_pretrained(ws.tokenizer_dir)
    longest = max(len(tokenizer(p)["input_ids"]) for p in params.evaluate.prompts)
    if longest + params.evaluate.max_new_tokens > context:
        raise ConfigError(
            f"evaluate.max_new_tokens ({params.evaluate.max_new_tokens}) plus the longest of evaluate.prompts "
            f"({longest} tokens) exceeds the model's context ({context} tokens)"
        )


def launch(params: Params, ws: Workspace) -> None:
    """Run torchrun with this module as its worker, streaming its output; raises CommandError on failure."""
    from pipeline.versioning import stream_command, venv_env

    stream_command(torchrun_command(params.train), ws.root, print, env=venv_env(torchrun_env(params.train)))


def main() -> int:
    try:
        ws = Workspace.find()
        params = load_params(ws.root)
        if "LOCAL_RANK" not in os.environ:  # the DVC stage: start torchrun, which runs main() per rank
            preflight(params, ws)
            launch(params, ws)
            return 0
        base_dir = None
        if params.model.base:
            from pipeline.model import resolve_base

            base_dir = resolve_base(params.model.base, ws, params)
        train(params, ws, base_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        from pipeline.versioning import CommandError

        if isinstance(exc, CommandError):
            print(f"error: training failed: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
