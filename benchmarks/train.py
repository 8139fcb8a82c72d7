"""The train section: the train stage (torchrun, DDP) against the bare loop (benchmarks.bare_loop) on the
same model, batch and process count, and both as a fraction of this machine's dense matmul FLOP/s.

Two rows keep two things apart: the stage's overhead, against a bare loop with the same fused loss,
and the fused loss's own gain, the bare loop with it against the bare loop with the model's own loss.
Every side runs REPEATS times, interleaved round by round: the stage, then the bare loop (one launch
that measures the peak, then runs the fused and the unfused loop), then in full mode the stage in one
process. Both sides are the steady state by the one rule in lmforge.training.throughput: the first fifth of
the steps is warm-up. The serve section trains through run_train_stage here too.
"""

from __future__ import annotations

import json
import shutil
import sys

import torch

from benchmarks.bare_loop import LOSS_ENV, LOSSES, OUT_ENV
from benchmarks.harness import REPEATS, Bench, Run, figure, interleaved, quiet, side, span
from lmforge.config import Params
from lmforge.params_file import write_overrides
from lmforge.runs.contracts import Manifest, read_train_log
from lmforge.training.throughput import peak_try_flop, steady, steady_median
from lmforge.workspace import Workspace


def run(b: Bench) -> dict:
    from lmforge.training.model import build_model
    from lmforge.training.throughput import flops_per_token

    ws = b.ws
    ensure_shards(b)
    params = b.params
    cfg = params.train
    procs, threads = cfg.nproc_per_node, cfg.threads_per_rank
    manifest = Manifest.read(ws.shards_dir)
    flops_tok = flops_per_token(
        build_model(params.model, manifest.vocab_size, manifest.eos_token_id), params.model
    )
    # the same cores as one process with all the threads: does DDP use them better than intra-op threads?
    # (full mode only: three more launches, and no target)
    scaling = procs > 1 and cfg.nnodes == 1 and not b.quick
    stage_logs: list[dict] = []  # what each stage run's own log says about its MFU
    loss_modules: list[str] = []

    def stage() -> tuple[float, float]:
        b.log(f"train: the stage, {procs} processes x {threads} threads")
        run_train_stage(b)
        records = read_train_log(ws.train_log)
        stage_logs.append(
            {
                "median_mfu": steady_median(records, "mfu"),
                "max_mfu": max(r["mfu"] for r in records),
                "steps": len(records),
            }
        )
        return stage_throughput(ws, params)

    def bare() -> tuple:
        b.log(f"train: bare loops ({', '.join(LOSSES)}), {procs} processes x {threads} threads")
        out = run_bare_loop(b)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        flop = peak_try_flop(device, procs * cfg.nnodes)
        peak = span(flop, flop / out["peak_flops"], *out["peak_span"])
        loops = [out["loops"][loss] for loss in LOSSES]
        loss_modules[:] = [x["loss_module"] for x in loops]  # the class each loop really called
        return (*(span(*steady_tokens(x["step_tokens"], x["records"]), *x["span"]) for x in loops), peak)

    def single_process() -> tuple[float, float]:
        b.log(f"train: the stage, 1 process x {procs * threads} threads")
        write_overrides(ws.root, ["train.nproc_per_node=1", f"train.threads_per_rank={procs * threads}"])
        try:
            run_train_stage(b)
            return stage_throughput(ws, b.params)
        finally:
            write_overrides(ws.root, [f"train.nproc_per_node={procs}", f"train.threads_per_rank={threads}"])

    measures = [stage, bare] + ([single_process] if scaling else [])
    stage_runs, bare_runs, *single_runs = interleaved(REPEATS, *measures)
    fused_runs, unfused_runs, peak_runs = (list(x) for x in zip(*bare_runs, strict=True))

    width = f"{procs} x {threads} threads"
    stage_side = side(f"train stage, {width}", "tokens", stage_runs)
    fused = side(f"bare loop with the stage's fused loss, {width}", "tokens", fused_runs)
    unfused = side(f"bare loop with the model's own loss (labels=), {width}", "tokens", unfused_runs)
    peak = side(f"dense fp32 matmul on every rank at once (peak_flops), {width}", "FLOP", peak_runs)
    flop_runs = [Run(r.amount * flops_tok, r.seconds, r.start, r.end) for r in stage_runs]
    bare_flop_runs = [Run(r.amount * flops_tok, r.seconds, r.start, r.end) for r in fused_runs]
    steps = f"{cfg.max_steps} steps a run, the first fifth skipped"
    figures = {
        "overhead": figure(
            "train: tokens/s, the stage vs a bare loop with the same fused loss",
            stage_side,
            fused,
            note=f"{steps}; the stage adds data windows, clipping, the schedule, logging and checkpoints",
        ),
        "fused_loss": figure(
            "train: the fused loss's gain (bare loop, fused vs the model's own loss)",
            fused,
            unfused,
            note=f"{steps}; the same bare loop, model, batch and processes, only the loss differs",
            loss_modules=dict(zip(LOSSES, loss_modules, strict=True)),
        ),
        "mfu": figure(
            "train: CPU MFU (stage FLOP/s / matmul peak FLOP/s)",
            side(f"train stage, {width}", "FLOP", flop_runs),
            peak,
            note=f"{flops_tok / 1e6:.2f} MFLOP/token (6N + attention); the peak as the stage measures it, "
            "in the bare loop's launches; the stage's own log reported a median MFU of "
            + ", ".join(f"{x['median_mfu']:.3f}" for x in stage_logs)
            + f" and at most {max(x['max_mfu'] for x in stage_logs):.3f} in any step",
            flops_per_token=flops_tok,
            stage_logs=stage_logs,
        ),
        "bare_mfu": figure(
            "train: bare-loop CPU MFU (fused loss)",
            side(f"bare loop with the fused loss, {width}", "FLOP", bare_flop_runs),
            peak,
            note="the ceiling for this model and batch with a plain loop",
            flops_per_token=flops_tok,
        ),
    }
    if scaling:
        figures["scaling"] = figure(
            f"train: tokens/s, {procs} processes x {threads} vs 1 x {procs * threads} threads",
            stage_side,
            side(f"train stage, 1 process x {procs * threads} threads", "tokens", single_runs[0]),
            note="on a CPU the same cores either way: above 1 means DDP uses them better than intra-op threads",
        )
    return figures


def ensure_shards(b: Bench) -> None:
    """Token shards for a section run without the preprocess section before it."""
    from pipeline.preprocess import preprocess

    if not (b.ws.shards_dir / Manifest.FILE).is_file():
        b.log("preprocess: the stage (for the sections after it)")
        preprocess(b.ws.data, b.ws.tokenizer_dir, b.ws.shards_dir, b.params)


def run_train_stage(b: Bench) -> None:
    """The train stage exactly as DVC runs it (`python -m pipeline.train`: preflight, then torchrun)."""
    from infra.processes import stream_command, venv_env

    ws = b.ws
    for path in (ws.checkpoints_dir, ws.model_dir):
        shutil.rmtree(path, ignore_errors=True)
    ws.train_log.unlink(missing_ok=True)
    stream_command(
        [sys.executable, "-m", "pipeline.train"],
        ws.root,
        quiet(b.log),
        env=venv_env({"LMFORGE_ROOT": str(ws.root)}),
    )


def steady_tokens(step_tokens: int, records: list[dict]) -> tuple[float, float]:
    """(tokens, seconds) of the steady steps, from each step's tokens_per_s."""
    kept = steady(records)
    return step_tokens * len(kept), sum(step_tokens / r["tokens_per_s"] for r in kept)


def stage_throughput(ws: Workspace, params: Params) -> tuple[float, float]:
    """(tokens, seconds) of the steady steps in artifacts/train_log.jsonl."""
    cfg, world = params.train, params.train.nproc_per_node * params.train.nnodes
    step_tokens = cfg.batch_size * params.model.block_size * cfg.grad_accum * world
    return steady_tokens(step_tokens, read_train_log(ws.train_log))


def run_bare_loop(b: Bench) -> dict:
    """The bare loops under the train stage's own launcher, same process count and threads."""
    from infra.processes import stream_command, venv_env
    from infra.torchrun import torchrun_command, torchrun_env

    ws, cfg = b.ws, b.params.train
    out = ws.artifacts / "bench_bare_loop.json"
    out.unlink(missing_ok=True)
    env = venv_env(
        torchrun_env(cfg, cuda=torch.cuda.is_available())
        | {"LMFORGE_ROOT": str(ws.root), OUT_ENV: str(out), LOSS_ENV: ",".join(LOSSES)}
    )
    stream_command(torchrun_command(cfg, "benchmarks.bare_loop"), ws.root, quiet(b.log), env=env)
    return json.loads(out.read_text())
