"""Train: token shards -> a causal LM, with DDP or FSDP2 under torchrun.

`python -m pipeline.train` outside torchrun checks what every rank would check, then launches torchrun
with the settings in params (that is the DVC stage's command); inside torchrun it is one rank. gloo on
CPU, nccl on CUDA, bf16 autocast on GPUs that have it. Only rank 0 logs, evaluates and writes.

A run is resumable (lmforge.training.checkpoints). The batch of step s on rank r is a pure function of
(seed, s, r), so the data position is the step itself and a resumed run sees exactly the batches it
would have seen.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from infra.atomic import replace_dir
from lmforge.config import ConfigError, Params, TrainConfig
from lmforge.data.shards import load_shard
from lmforge.params_file import load_params
from lmforge.runs.contracts import Manifest, TrainSummary, read_train_log
from lmforge.serving.chat_template import render_text
from lmforge.serving.settings import ADAPTER_DIR
from lmforge.training.checkpoints import resume_latest, run_fingerprint, save_checkpoint, seed_everything
from lmforge.training.distributed import (
    Dist,
    agree_on_step,
    agreed_loss,
    end_process_group,
    every_rank,
    every_rank_rng,
    gathered_copy,
    gradient_sync,
    parallelize,
    rank_checksums,
    setup_distributed,
    weight_sum,
)
from lmforge.training.loss import compiled
from lmforge.training.model import autocast_for, build_model, count_parameters, with_lora
from lmforge.training.optimizer import build_optimizer
from lmforge.training.throughput import flops_per_token, mfu, peak_flops, steady_median
from lmforge.training.windows import (
    ConversationRows,
    TokenWindows,
    fixed_windows,
    mean_loss,
    packing_isolates,
    rows_of,
)
from lmforge.workspace import Workspace
from pipeline.base_model import resolve_base
from pipeline.stage import run_stage

# ---------------------------------------------------------------------------------------------
# the training loop (one rank)


def train(params: Params, ws: Workspace, base_dir: Path | None = None) -> dict | None:
    """Train from the last checkpoint of this run (or from scratch) to max_steps; rank 0 exports the
    model and returns its summary, the other ranks return None."""
    from tqdm import tqdm

    cfg, mcfg = params.train, params.model
    dist = setup_distributed(cfg.threads_per_rank)
    log = (lambda msg: print(msg, flush=True)) if dist.is_main else (lambda msg: None)
    seed_everything(cfg.seed)  # the same seed on every rank: identical initial weights

    # data: this rank's slice of train, and fixed val windows for the loss curve
    manifest = Manifest.read(ws.shards_dir)
    windows, val_windows = training_data(ws, manifest, params, dist)

    # model, optimizer, and where this run left off
    model = build_model(mcfg, manifest.vocab_size, manifest.eos_token_id, base_dir).to(dist.device)
    adapted = with_lora(model, cfg.lora) if cfg.method == "lora" else None  # the same adapters on every rank
    if adapted is not None:
        model = adapted.get_base_model()  # the model's own modules, the adapters inside them
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trained, total = count_parameters(model, trainable=True), count_parameters(model)
    flops_tok = flops_per_token(model, mcfg)
    packing = ""
    if isinstance(windows, ConversationRows):
        if not all(every_rank(packing_isolates(model, windows, dist.device), dist)):
            windows, val_windows = training_data(ws, manifest, params, dist, packed=False)
        packing = f"; conversations {'packed' if windows.packed else 'one a row, padded'}"
    sample = val_windows["input_ids"] if isinstance(val_windows, dict) else val_windows
    loss_module, loss_kind = agreed_loss(model, sample[:2].to(dist.device), dist)
    wrapper = parallelize(loss_module, model, cfg, dist)  # FSDP shards in place: count and probe before
    seed_everything(cfg.seed + dist.rank)  # from here on each rank draws its own dropout masks
    optimizer, scheduler = build_optimizer(model, cfg, dist.device)
    fingerprint = run_fingerprint(params, ws.shards_dir)
    step = resume_latest(
        ws.checkpoints_dir, fingerprint, model, optimizer, scheduler, log, dist.rank, cfg.max_steps
    )
    agree_on_step(step, dist)
    forward = compiled(wrapper) if cfg.compile else wrapper
    sharded = cfg.strategy == "fsdp"
    # validation runs on the unwrapped module (DDP would wait for the other ranks), or on every rank (FSDP
    # gathers each block's shards from all of them)
    validator = loss_module if not sharded else wrapper

    tokens_per_step = cfg.batch_size * mcfg.block_size * cfg.grad_accum * dist.world_size
    peak = peak_flops(dist.device, dist.world_size)  # every rank at once: see lmforge.training.throughput
    if dist.is_main:
        truncate_log(ws.train_log, step)
        log(f"train: {trained:,} of {total:,} params trained ({cfg.method}, {cfg.strategy}), "
            f"{dist.world_size} x {dist.device.type}, {tokens_per_step:,} tokens/step, "
            f"steps {step} -> {cfg.max_steps}; loss: {loss_kind}{packing}")  # fmt: skip

    model.train()
    bar = tqdm(
        total=cfg.max_steps, initial=step, unit="step", disable=not dist.is_main, file=sys.stdout,
        mininterval=1.0 if sys.stdout.isatty() else 10.0,  # a log file gets a line every 10 s
    )  # fmt: skip
    tick = time.perf_counter()
    while step < cfg.max_steps:
        loss = train_step(forward, wrapper, model, optimizer, scheduler, windows, cfg, step, dist)
        step += 1

        now = time.perf_counter()
        tok_s, tick = tokens_per_step / (now - tick), now
        record = {"step": step, "train_loss": round(loss, 5), "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": round(tok_s)}  # fmt: skip
        if step == cfg.max_steps:  # in the log, not the model's directory: it differs run to run
            record["peak_memory_mib"] = every_rank(peak_memory_mib(dist.device), dist)
        if (dist.is_main or sharded) and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            record["val_loss"] = round(mean_loss(validator, val_windows, cfg.batch_size, dist.device)[0], 5)
            tick = time.perf_counter()  # evaluation time is not training throughput
        if dist.is_main:
            record["mfu"] = round(mfu(tok_s, flops_tok, peak), 4)
            # refresh=False: update() redraws at most every mininterval, a refresh here would print every step
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}",
                            mfu=f"{record['mfu']:.2f}", refresh=False)  # fmt: skip
            bar.update(1)
            with ws.train_log.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            rng = every_rank_rng(dist)
            if dist.is_main or sharded:
                save_checkpoint(ws.checkpoints_dir, model, optimizer, scheduler, step, fingerprint,
                                cfg.keep_checkpoints, rng, dist.rank, sharded)  # fmt: skip
            if dist.world_size > 1:
                torch.distributed.barrier()  # no rank runs ahead of a checkpoint it may need to resume from
            tick = time.perf_counter()  # nor is checkpoint I/O
    bar.close()

    if sharded:  # rank 0 gets a whole copy to export; there are no replicas to compare
        model, adapted = gathered_copy(model, params, manifest, base_dir, dist)
        checksums = [weight_sum(model)] if dist.is_main else []
    else:
        checksums = rank_checksums(model, dist)  # DDP must leave every rank with the same weights
    summary = None
    if dist.is_main:
        summary = export(model, ws, checksums, adapted)
        log(f"train: final model in {ws.model_dir}")
    if dist.world_size > 1:
        del forward, wrapper, validator, loss_module  # see end_process_group
        end_process_group()
    return summary


def train_step(forward, wrapper, model, optimizer, scheduler, windows: TokenWindows | ConversationRows, cfg: TrainConfig, step: int,
               dist: Dist) -> float:  # fmt: skip
    """One optimizer step over grad_accum micro-batches; the loss averaged over every rank."""
    loss_sum = torch.zeros((), device=dist.device)
    for micro in range(cfg.grad_accum):
        batch = rows_of(windows.batch(cfg.batch_size, cfg.seed, step, micro, dist.rank), 0, cfg.batch_size)
        batch = {key: value.to(dist.device) for key, value in batch.items()}
        # Gradients sync once per optimizer step, on the last micro-step only.
        with gradient_sync(wrapper, micro == cfg.grad_accum - 1):
            with autocast_for(dist.device):
                loss = forward(**batch) / cfg.grad_accum
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
    return loss_sum.item()


def training_data(ws: Workspace, manifest: Manifest, params: Params, dist: Dist, packed: bool = True):
    """This rank's train batches and the fixed val batch of the loss curve: windows of text, or rows of
    whole conversations."""
    block, cfg = params.model.block_size, params.train
    if manifest.format == "chat":
        train = ConversationRows(ws.shards_dir, manifest, "train", block, dist.rank, dist.world_size, packed)
        val = ConversationRows(ws.shards_dir, manifest, "val", block, packed=packed)
        return train, val.fixed(cfg.eval_batches * cfg.batch_size)
    train = TokenWindows(load_shard(ws.shards_dir, "train", manifest), block, dist.rank, dist.world_size)
    val = fixed_windows(load_shard(ws.shards_dir, "val", manifest), block, cfg.eval_batches * cfg.batch_size)
    return train, val


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far, in MiB: what the GPU allocated, or the resident set on a CPU
    (Python and the libraries included)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# the log and the exported model


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step: a restart continues the curve instead of doubling it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [r for r in read_train_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def export(model, ws: Workspace, rank_weight_checksums: list[float], adapted=None) -> dict:
    """save_pretrained (safetensors) + the tokenizer + train_summary.json, renamed into artifacts/model
    when complete. A LoRA run's adapter is saved on its own (artifacts/model/adapter, for servers that
    serve adapters on a shared base), then merged: artifacts/model is a whole model every server loads."""
    from transformers import AutoTokenizer

    tmp = ws.model_dir.with_name(".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapted is not None:
        adapted.save_pretrained(tmp / ADAPTER_DIR)
        model = adapted.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(ws.tokenizer_dir).save_pretrained(tmp)
    records = read_train_log(ws.train_log)
    rate, mfu = steady_median(records, "tokens_per_s"), steady_median(records, "mfu")
    summary = TrainSummary(
        steps=records[-1]["step"] if records else 0,
        final_train_loss=records[-1]["train_loss"] if records else None,
        tokens_per_s=None if rate is None else round(rate),
        mfu=None if mfu is None else round(mfu, 4),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        parameters=count_parameters(model),
        rank_weight_checksums=rank_weight_checksums,
    )
    summary.save(tmp / summary.FILE)
    replace_dir(tmp, ws.model_dir)
    return summary.to_dict()


# ---------------------------------------------------------------------------------------------
# the stage: checked once, then launched under torchrun


def preflight(params: Params, ws: Workspace) -> None:
    """What every rank would check, checked once before torchrun starts.

    A rank that fails a check exits, torchrun restarts it max_restarts times, and the error drowns in
    its output; here it costs no process and no checkpoint.
    """
    from transformers import AutoConfig, AutoTokenizer

    from lmforge.architecture import context_length

    manifest = Manifest.read(ws.shards_dir)
    mcfg, world = params.model, params.train.nproc_per_node * params.train.nnodes
    for rank in range(world):  # memmaps: nothing is read whole
        training_data(ws, manifest, params, Dist(rank, rank, world, torch.device("cpu")))

    context = mcfg.block_size
    if mcfg.base:
        base = AutoConfig.from_pretrained(resolve_base(mcfg.base, ws, params))
        context = context_length(base)
        if mcfg.block_size > context:
            raise ConfigError(
                f"model.block_size {mcfg.block_size} exceeds the base model's context {context}"
            )
        if base.vocab_size < manifest.vocab_size:
            raise ConfigError(
                f"model.base: its vocabulary ({base.vocab_size}) is smaller than the tokenizer's "
                f"({manifest.vocab_size})"
            )
    # evaluate generates from each prompt with this model: prompt + new tokens must fit its positions
    tokenizer = AutoTokenizer.from_pretrained(ws.tokenizer_dir)
    template = manifest.chat_template  # a chat model's samples are replies to the prompts as user messages
    prompts = [render_text(tokenizer, template, [{"role": "user", "content": p}], True) if template else p
               for p in params.evaluate.prompts]  # fmt: skip
    longest = max(len(tokenizer(p, add_special_tokens=not template)["input_ids"]) for p in prompts)
    if longest + params.evaluate.max_new_tokens > context:
        raise ConfigError(
            f"evaluate.max_new_tokens ({params.evaluate.max_new_tokens}) plus the longest of evaluate.prompts "
            f"({longest} tokens) exceeds the model's context ({context} tokens)"
        )


def launch(params: Params, ws: Workspace) -> None:
    """Run torchrun with this module as its worker, streaming its output; raises CommandError on failure."""
    from infra.processes import stream_command, venv_env
    from infra.torchrun import torchrun_command, torchrun_env

    env = venv_env(torchrun_env(params.train, cuda=torch.cuda.is_available()))
    stream_command(torchrun_command(params.train, "pipeline.train"), ws.root, print, env=env)


def run() -> None:
    ws = Workspace.find()
    params = load_params(ws.root)
    if "LOCAL_RANK" not in os.environ:  # the DVC stage: start torchrun, which runs run() per rank
        preflight(params, ws)
        launch(params, ws)
        return
    base_dir = resolve_base(params.model.base, ws, params) if params.model.base else None
    train(params, ws, base_dir)


def main() -> int:
    return run_stage("train", run)


if __name__ == "__main__":
    raise SystemExit(main())
