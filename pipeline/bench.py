"""Bench: `lmforge bench` measures each stage against the bare library doing the same work.

Every figure is a ratio of two rates measured side by side, in the same process or the same run:
  validate    `lmforge validate` on a large single-file JSONL corpus against bare reading and JSON
              decoding of the same file, and its peak RSS per GB of corpus;
  preprocess  the stage's encode pass against raw `tokenizers` encode_batch, same corpus and tokenizer;
  train       the train stage (torchrun, DDP) against a bare forward/backward/AdamW loop on the same model,
              batch and process count, and both as a fraction of this machine's dense matmul FLOP/s;
  serve       the Bento over HTTP against `model.generate` (KV cache) in this process;
  pipeline    wall times of a first `lmforge run`, a no-change `dvc repro` and a no-change `lmforge run`.
Each side keeps its raw numbers (amount, seconds) so any ratio can be recomputed from results.json.

The bench works in a temporary workspace of its own (the builtin corpus, or --corpus), so it never
touches the user's data/, artifacts/, BentoML store or S3. `python -m pipeline.bench` under torchrun is
the bare training loop (one rank); the bench launches it with the train stage's own launcher.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Params, Workspace, load_params, write_overrides

SECTIONS = ("validate", "preprocess", "train", "serve", "pipeline")
SOURCE_ROOT = Path(__file__).resolve().parents[1]
BARE_LOOP_OUT = "LMFORGE_BENCH_OUT"  # where a bare-loop rank 0 writes its result

# Quick mode: a tiny model and short runs through exactly the same code paths (2 processes included).
QUICK = [
    "preprocess.vocab_size=1024",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=64",
    "train.max_steps=20",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.checkpoint_every=10",
    "evaluate.max_windows=32",
    "evaluate.max_new_tokens=8",
]
# Full mode keeps the workspace's model and batch; steady-state throughput needs no full-length run, and
# evaluate runs only so that the real package step has metrics to put in the Bento.
FULL = ["train.max_steps=100", "evaluate.max_windows=200"]
PROMPTS = [
    "The ", "Return the ", "This module provides", "If the ", "A new ", "Raise ", "The default ",
    "When ", "Each ", "For example, ", "Note that ", "This function ", "An object ", "In ", "It is ", "Use ",
]  # fmt: skip

Log = Callable[[str], None]


@dataclass
class Bench:
    ws: Workspace  # the bench's own workspace: params, data/ and artifacts/
    quick: bool
    tmp: Path  # scratch space for the pipeline section's workspace and S3 state
    source: str  # the corpus, as `lmforge run --source` takes it
    source_root: Path  # the workspace whose params.yaml the bench starts from
    profile: str | None  # a params profile to apply on top of it (demo, gpu)
    log: Log

    @property
    def params(self) -> Params:
        return load_params(self.ws.root)


# ---------------------------------------------------------------------------------------------
# figures: two measured sides and their ratio


def side(what: str, amount: float | None, unit: str, seconds: float) -> dict:
    """One side of a figure: how much work (tokens, FLOP) in how many seconds."""
    rate = amount / seconds if amount is not None and seconds > 0 else None
    return {"what": what, "amount": amount, "unit": unit, "seconds": seconds, "rate": rate}


def figure(
    measurement: str,
    lmforge: dict,
    baseline: dict | None = None,
    target: tuple[str, str, float] | None = None,
    note: str = "",
    **detail,
) -> dict:
    """lmforge's rate over the baseline's, checked against target = (of "ratio"|"seconds", op, value)."""
    ratio = lmforge["rate"] / baseline["rate"] if baseline and baseline["rate"] and lmforge["rate"] else None
    met = None
    if target:
        of, op, value = target
        got = {"ratio": ratio, "seconds": lmforge["seconds"], "rate": lmforge["rate"]}[of]
        met = got >= value if op == ">=" else got <= value
    return {
        "measurement": measurement,
        "lmforge": lmforge,
        "baseline": baseline,
        "ratio": ratio,
        "target": {"of": target[0], "op": target[1], "value": target[2]} if target else None,
        "met": met,
        "note": note,
        "detail": detail,
    }


# ---------------------------------------------------------------------------------------------
# validate

VALIDATE_CORPUS_BYTES = {True: 32 << 20, False: 1 << 30}  # quick, full
BARE_DECODE = """import json, sys
chars = 0
with open(sys.argv[1], encoding="utf-8") as fh:
    for line in fh:
        chars += len(json.loads(line)["text"])
print(chars)
"""


def write_large_corpus(path: Path, target_bytes: int, vocabulary_from: Path, seed: int = 0) -> int:
    """A single-file JSONL corpus of about target_bytes: documents of 2 to 5 paragraphs of random words
    from the bench corpus's own vocabulary (distinct, so that they survive deduplication), with 1% exact
    duplicates and 0.5% binary noise, so that the filter has work to do. Returns its document count."""
    import re

    from tqdm import tqdm

    from pipeline.config import IngestConfig
    from pipeline.corpus import read_documents

    words = sorted(
        {
            w
            for d in read_documents(vocabulary_from, IngestConfig())
            for w in re.findall(r"[A-Za-z][a-z]+", d.text)
        }
    )
    vocab, rng = np.array(words), np.random.default_rng(seed)
    written, count, previous = 0, 0, ""
    with (
        path.open("w", encoding="utf-8") as fh,
        tqdm(total=target_bytes, unit="B", unit_scale=True, desc="corpus", disable=None) as bar,
    ):
        while written < target_bytes:
            kind = rng.random()
            if kind < 0.01 and previous:
                text = previous
            elif kind < 0.015:
                text = "".join(map(chr, rng.integers(0, 32, 400)))
            else:
                text = "\n\n".join(
                    " ".join(vocab[rng.integers(0, len(vocab), rng.integers(40, 120))]) + "."
                    for _ in range(rng.integers(2, 6))
                )
                previous = text
            line = json.dumps({"id": count, "text": text}) + "\n"
            fh.write(line)
            written += len(line)
            count += 1
            bar.update(len(line))
    return count


# A small launcher between the bench and the measured command: a child forked from the bench itself
# would count the bench's own memory (torch and all) in its peak RSS until it execs.
RSS_LAUNCHER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=sys.stderr); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)"
)


def _peak_rss_run(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, output) of one command."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-S", "-c", RSS_LAUNCHER, *cmd], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, int(done.stdout.split()[-1]), done.stderr


def bench_validate(b: Bench) -> dict:
    """`lmforge validate FILE` (the CLI, start-up and GE included) against reading and json-decoding the same
    file in a bare Python loop; both in child processes of their own, so each peak RSS is its own."""
    corpus = b.tmp / "large.jsonl"
    b.log(f"validate: writing a {VALIDATE_CORPUS_BYTES[b.quick] / 2**20:,.0f} MiB JSONL corpus")
    documents = write_large_corpus(corpus, VALIDATE_CORPUS_BYTES[b.quick], b.ws.data)
    size = corpus.stat().st_size
    env = dict(os.environ, LMFORGE_ROOT=str(b.ws.root), TQDM_DISABLE="1")
    b.log("validate: bare read + json.loads")
    bare_seconds, bare_rss, _ = _peak_rss_run([sys.executable, "-c", BARE_DECODE, str(corpus)], env)
    b.log("validate: lmforge validate")
    lmforge = [str(Path(sys.executable).parent / "lmforge"), "validate", str(corpus)]
    seconds, rss, out = _peak_rss_run(lmforge, env)
    kept = next((line.strip() for line in out.splitlines() if "kept (" in line), "")

    b.log("validate: preprocess of the same corpus (bounded tokenizer sample)")
    large = Workspace(b.tmp / "large-ws")
    (large.data).mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(b.ws.root / name, large.root / name)
    (large.data / corpus.name).symlink_to(corpus)
    pre_env = dict(env, LMFORGE_ROOT=str(large.root))
    pre_seconds, pre_rss, _ = _peak_rss_run([sys.executable, "-m", "pipeline.preprocess"], pre_env)
    manifest = json.loads((large.shards_dir / "manifest.json").read_text())
    sample = manifest["tokenizer_sample"]
    return {
        "throughput": figure(
            "validate: MB/s on one large JSONL file",
            side("lmforge validate (CLI, GE suite, filter, report)", size / 1e6, "MB", seconds),
            side("bare read + json.loads of each line", size / 1e6, "MB", bare_seconds),
            None if b.quick else ("rate", ">=", 30.0),
            note=f"{size / 2**30:.2f} GiB, {documents:,} documents ({kept}); the ratio is the share of bare "
            "decoding speed that the filter, measures and suite leave",
            documents=documents,
            bytes=size,
        ),
        "peak_rss": figure(
            "validate: peak RSS per GB of corpus",
            {"what": "lmforge validate, peak RSS", "amount": rss / 1e9, "unit": "GB RSS", "seconds": None,
             "rate": (rss / 1e9) / (size / 1e9)},
            None,
            None if b.quick else ("rate", "<=", 1.5),
            note="GB of peak resident memory per GB of corpus (the targets are for full mode's 1 GiB file; "
            f"in quick mode start-up dominates both rows); bare read + json.loads peaked at {bare_rss / 1e9:.2f} GB",
            rss_bytes=rss,
            bare_rss_bytes=bare_rss,
        ),
        "preprocess_rss": figure(
            "preprocess: peak RSS per GB of corpus (same file)",
            {"what": "python -m pipeline.preprocess, peak RSS", "amount": pre_rss / 1e9, "unit": "GB RSS",
             "seconds": None, "rate": (pre_rss / 1e9) / (size / 1e9)},
            note=f"the tokenizer learned from a sample of {sample['chars']:,} chars ({sample['documents']:,} "
            f"documents; preprocess.tokenizer_train_chars {b.params.preprocess.tokenizer_train_chars:,}); "
            f"{manifest['total_tokens']:,} tokens in {pre_seconds:.0f} s, encode pass "
            f"{manifest['tokens_per_second']:,} tok/s",
            rss_bytes=pre_rss,
            seconds=pre_seconds,
            tokenizer_sample=sample,
        ),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# preprocess


def bench_preprocess(b: Bench) -> dict:
    """The stage's encode pass (read, encode_batch, write shards) against bare encode_batch."""
    from tokenizers import Tokenizer

    from pipeline.corpus import open_corpus
    from pipeline.preprocess import preprocess
    from pipeline.validate import kept_documents

    ws, params = b.ws, b.params
    b.log("preprocess: the stage")
    manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params)
    documents = sum(s["documents"] for s in manifest["splits"].values())
    # the stage appends one EOS per document that it did not encode: count encoded tokens on both sides
    stage_tokens = manifest["total_tokens"] - documents

    b.log("preprocess: bare encode_batch")
    # the documents the stage encodes (validation's kept ones), in memory before the clock starts
    texts = [d.text for d in kept_documents(open_corpus(ws.data), params)]
    tokenizer = Tokenizer.from_file(str(ws.tokenizer_dir / "tokenizer.json"))
    size = params.preprocess.encode_batch_docs
    start = time.perf_counter()
    bare_tokens = 0
    for i in range(0, len(texts), size):
        bare_tokens += sum(
            len(e.ids) for e in tokenizer.encode_batch(texts[i : i + size], add_special_tokens=False)
        )
    bare_seconds = time.perf_counter() - start

    return {
        "encode": figure(
            "preprocess: encode tokens/s",
            side("preprocess stage, encode pass", stage_tokens, "tokens", manifest["encode_seconds"]),
            side("tokenizers encode_batch", bare_tokens, "tokens", bare_seconds),
            ("ratio", ">=", 0.8),
            note=f"{len(texts):,} documents, batches of {size}; the stage also reads the corpus and writes shards",
            same_tokens=stage_tokens == bare_tokens,
            documents=len(texts),
        )
    }


# ---------------------------------------------------------------------------------------------
# train


def _ensure_shards(b: Bench) -> None:
    """Token shards for a section run without the preprocess section before it."""
    from pipeline.preprocess import MANIFEST, preprocess

    if not (b.ws.shards_dir / MANIFEST).is_file():
        b.log("preprocess: the stage (for the sections after it)")
        preprocess(b.ws.data, b.ws.tokenizer_dir, b.ws.shards_dir, b.params)


def _run_train_stage(b: Bench) -> None:
    """The train stage exactly as DVC runs it (`python -m pipeline.train`: preflight, then torchrun)."""
    from pipeline.versioning import stream_command, venv_env

    ws = b.ws
    for path in (ws.checkpoints_dir, ws.model_dir):
        shutil.rmtree(path, ignore_errors=True)
    ws.train_log.unlink(missing_ok=True)
    stream_command(
        [sys.executable, "-m", "pipeline.train"],
        ws.root,
        _quiet(b.log),
        env=venv_env({"LMFORGE_ROOT": str(ws.root)}),
    )


def _steady_state(step_tokens: int, rates: list[float]) -> tuple[float, float]:
    """(tokens, seconds) over all but the first fifth of the steps, as the stage's summary skips warm-up."""
    kept = rates[len(rates) // 5 :]
    return step_tokens * len(kept), sum(step_tokens / r for r in kept)


def _stage_throughput(ws: Workspace, params: Params) -> tuple[float, float, float]:
    """(tokens, seconds, the stage's own median MFU) from artifacts/train_log.jsonl."""
    cfg, world = params.train, params.train.nproc_per_node * params.train.nnodes
    records = [json.loads(line) for line in ws.train_log.read_text().splitlines() if line]
    step_tokens = cfg.batch_size * params.model.block_size * cfg.grad_accum * world
    tokens, seconds = _steady_state(step_tokens, [r["tokens_per_s"] for r in records])
    return tokens, seconds, float(np.median([r["mfu"] for r in records[len(records) // 5 :]]))


def _run_bare_loop(b: Bench) -> dict:
    """The bare loop under the train stage's own launcher, same process count and threads."""
    from pipeline.train import torchrun_command, torchrun_env
    from pipeline.versioning import stream_command, venv_env

    ws, cfg = b.ws, b.params.train
    out = ws.artifacts / "bench_bare_loop.json"
    out.unlink(missing_ok=True)
    env = venv_env(torchrun_env(cfg) | {"LMFORGE_ROOT": str(ws.root), BARE_LOOP_OUT: str(out)})
    stream_command(torchrun_command(cfg, module="pipeline.bench"), ws.root, _quiet(b.log), env=env)
    return json.loads(out.read_text())


def bench_train(b: Bench) -> dict:
    from pipeline.model import build_model
    from pipeline.preprocess import MANIFEST
    from pipeline.train import flops_per_token

    ws = b.ws
    _ensure_shards(b)
    params = b.params
    cfg = params.train
    procs, threads = cfg.nproc_per_node, cfg.threads_per_rank
    manifest = json.loads((ws.shards_dir / MANIFEST).read_text())
    flops_tok = flops_per_token(
        build_model(params.model, manifest["vocab_size"], manifest["eos_token_id"]), params.model
    )

    figures = {}
    if procs > 1 and cfg.nnodes == 1:
        # the same cores as one process with all the threads: does DDP use them better than intra-op threads?
        b.log(f"train: the stage, 1 process x {procs * threads} threads")
        write_overrides(ws.root, ["train.nproc_per_node=1", f"train.threads_per_rank={procs * threads}"])
        _run_train_stage(b)
        single_tokens, single_seconds, _ = _stage_throughput(ws, b.params)
        write_overrides(ws.root, [f"train.nproc_per_node={procs}", f"train.threads_per_rank={threads}"])

    b.log(f"train: the stage, {procs} processes x {threads} threads")
    _run_train_stage(b)
    tokens, seconds, stage_mfu = _stage_throughput(ws, params)
    b.log(f"train: bare loop, {procs} processes x {threads} threads")
    bare = _run_bare_loop(b)
    peak = side(
        f"dense fp32 matmul, {procs} x {threads} threads", bare["peak_flop"], "FLOP", bare["peak_seconds"]
    )

    stage = side(f"train stage, {procs} x {threads} threads", tokens, "tokens", seconds)
    figures["tokens_per_s"] = figure(
        "train: tokens/s",
        stage,
        side("bare forward/backward/AdamW loop", bare["tokens"], "tokens", bare["seconds"]),
        ("ratio", ">=", 0.95),
        note=f"{cfg.max_steps} steps, the first fifth skipped",
    )
    figures["mfu"] = figure(
        "train: CPU MFU (stage FLOP/s / matmul FLOP/s)",
        side("train stage", tokens * flops_tok, "FLOP", seconds),
        peak,
        ("ratio", ">=", 0.5),
        note=f"{flops_tok / 1e6:.2f} MFLOP/token (6N + attention)",
        flops_per_token=flops_tok,
        stage_reported_mfu=stage_mfu,  # against the peak the stage measured at its own start
    )
    figures["bare_mfu"] = figure(
        "train: bare-loop CPU MFU",
        side("bare loop", bare["tokens"] * flops_tok, "FLOP", bare["seconds"]),
        peak,
        note="the ceiling for this model and batch with a plain loop",
    )
    if procs > 1 and cfg.nnodes == 1:
        figures["scaling"] = figure(
            f"train: tokens/s, {procs} processes x {threads} vs 1 x {procs * threads} threads",
            stage,
            side(
                f"train stage, 1 process x {procs * threads} threads", single_tokens, "tokens", single_seconds
            ),
            note="on a CPU the same cores either way: above 1 means DDP uses them better than intra-op threads",
        )
    return figures


def bare_loop_worker() -> None:
    """One rank of the bare loop: the model, batch, steps, device and dtype of the train stage, nothing else."""
    from pipeline.model import build_model
    from pipeline.preprocess import MANIFEST
    from pipeline.train import autocast_for, end_process_group, matmul_size, measure_matmul_flops

    ws = Workspace.find()
    params = load_params(ws.root)
    cfg, mcfg = params.train, params.model
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.threads_per_rank)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    manifest = json.loads((ws.shards_dir / MANIFEST).read_text())
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg, manifest["vocab_size"], manifest["eos_token_id"]).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(ddp) if cfg.compile else ddp
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )

    # this machine's matmul peak, every rank at once as in training: the best of a few tries
    peak = 0.0
    for _ in range(3):
        if world > 1:
            torch.distributed.barrier()
        rate = torch.tensor([measure_matmul_flops(device, repeats=16)], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(rate)
        peak = max(peak, rate.item())

    model.train()
    rates = []
    step_tokens = cfg.batch_size * mcfg.block_size * cfg.grad_accum * world
    for _ in range(cfg.max_steps):
        start = time.perf_counter()
        for micro in range(cfg.grad_accum):
            batch = torch.randint(0, manifest["vocab_size"], (cfg.batch_size, mcfg.block_size), device=device)
            last = micro == cfg.grad_accum - 1
            with ddp.no_sync() if world > 1 and not last else nullcontext(), autocast_for(device):
                loss = forward(input_ids=batch, labels=batch).loss / cfg.grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the stage syncs on its loss every step too
        rates.append(step_tokens / (time.perf_counter() - start))
    tokens, seconds = _steady_state(step_tokens, rates)
    if rank == 0:
        flop = (
            2 * matmul_size(device) ** 3 * 16 * world
        )  # what measure_matmul_flops multiplied, on every rank
        result = {"tokens": tokens, "seconds": seconds, "peak_flop": flop, "peak_seconds": flop / peak}
        Path(os.environ[BARE_LOOP_OUT]).write_text(json.dumps(result) + "\n")
    if world > 1:
        del forward, ddp
        end_process_group()


# ---------------------------------------------------------------------------------------------
# serve


def _package_for_bench(b: Bench) -> dict:
    """The trained model through the real evaluate and package steps; returns package()'s result.

    The gate's verdict is recorded but not obeyed: a bench model trains for throughput, not quality,
    and this Bento lives only in the bench's own BentoML store.
    """
    from dataclasses import asdict

    from pipeline.evaluate import evaluate
    from pipeline.gate import decide
    from pipeline.package import package

    ws, params = b.ws, b.params
    if not (ws.model_dir / "model.safetensors").is_file():
        _ensure_shards(b)
        b.log("train: the stage (for serving)")
        _run_train_stage(b)
    threads = torch.get_num_threads()
    decision = asdict(decide(evaluate(params, ws), None, params.gate))
    torch.set_num_threads(threads)  # evaluate takes every core for this process
    ws.gate_file.write_text(json.dumps(decision | {"promote": True}) + "\n")
    return package(ws, params, data_md5=None)


def _free_port() -> int:
    from pipeline.storage import port_is_free

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return port if port_is_free(port) else _free_port()


def _start_bento(tag: str, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    bentoml_bin = str(Path(sys.executable).parent / "bentoml")
    proc = subprocess.Popen(
        [bentoml_bin, "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"bentoml serve was not ready in {timeout:.0f} s")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# Every client keeps one connection open, as any HTTP client pool (the OpenAI SDK's included) does.
# A new httpx.Client per request costs about 27 ms here (an SSL context is built even for http://),
# which is the client's cost, not the server's.


def _http_generate(client, url: str, prompt: str, max_new_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) of one greedy POST /generate."""
    start = time.perf_counter()
    response = client.post(
        f"{url}/generate",
        json={"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0},
        timeout=300,
    )
    seconds = time.perf_counter() - start
    response.raise_for_status()
    return response.json()["completion_tokens"], seconds


def _http_first_token(client, url: str, prompt: str, max_new_tokens: int) -> float:
    """Seconds from sending a streamed /v1/completions request to its first chunk of text."""
    body = {"prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the stream carried no text")
    return first


def _http_score(client, url: str, windows: torch.Tensor) -> float:
    body = {"prompt": windows.tolist(), "max_tokens": 0, "echo": True, "logprobs": 1}
    start = time.perf_counter()
    response = client.post(f"{url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    assert len(response.json()["choices"]) == windows.shape[0]
    return time.perf_counter() - start


def _aggregate(url: str, clients: int, requests_each: int, max_new_tokens: int) -> tuple[int, float]:
    """(completion tokens, wall seconds) of `clients` clients each sending requests one after another."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    sessions = [httpx.Client() for _ in range(clients)]  # made before the clock starts

    def client(k: int) -> int:
        return sum(
            _http_generate(sessions[k], url, PROMPTS[(k + i) % len(PROMPTS)], max_new_tokens)[0]
            for i in range(requests_each)
        )

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(client, range(clients)))
        return tokens, time.perf_counter() - start
    finally:
        for session in sessions:
            session.close()


def bench_serve(b: Bench) -> dict:
    import httpx
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pipeline.generation import context_length
    from pipeline.model import load_model
    from pipeline.package import use_bentoml_home
    from pipeline.preprocess import load_shard
    from pipeline.train import fixed_windows

    ws, params = b.ws, b.params
    use_bentoml_home(ws.state)  # unless the caller chose a store, the bench's own
    hf_logging.disable_progress_bar()
    bento = _package_for_bench(b)
    tag = bento["bento_tag"]
    tokenizer = AutoTokenizer.from_pretrained(ws.model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the service runs it
    model = load_model(ws.model_dir).to(device).eval()
    longest = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    new = min(
        params.serve.default_max_new_tokens,
        params.serve.max_new_tokens_cap,
        context_length(model) - longest - 1,
    )
    if b.quick:
        new = min(new, 24)
    repeats = 2 if b.quick else 5

    # the baseline: greedy generate with the KV cache in this process, with the server's thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the service's engine uses every core

    def generate(prompt: str, max_new_tokens: int) -> tuple[int, float]:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        produced = out[0, ids["input_ids"].shape[1] :].tolist()
        if tokenizer.eos_token_id in produced:  # the service does not count the EOS ending a completion
            produced = produced[: produced.index(tokenizer.eos_token_id)]
        return len(produced), seconds

    b.log("serve: model.generate in-process")
    generate(PROMPTS[0], new)  # warm-up
    direct = [generate(PROMPTS[i], new) for i in range(repeats)]
    direct_first = [generate(PROMPTS[i], 1)[1] for i in range(repeats)]
    torch.set_num_threads(threads)

    # prompt scoring, as evaluation harnesses do it: full-context windows of val tokens, one batch
    windows = fixed_windows(
        load_shard(ws.shards_dir, "val"), context_length(model), params.serve.max_batch_size
    )

    def score_in_process() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            batch = windows.to(device)
            logp = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), -1)
            logp.gather(2, batch[:, 1:].unsqueeze(2)).tolist(), logp.topk(1, dim=-1).values.tolist()
        return time.perf_counter() - start

    b.log("serve: teacher-forced scoring in-process")
    torch.set_num_threads(os.cpu_count() or 1)
    score_in_process()  # warm-up
    direct_score = [score_in_process() for _ in range(repeats)]
    torch.set_num_threads(threads)

    b.log(f"serve: bentoml serve {tag}")
    proc, url = _start_bento(tag)
    try:
        with httpx.Client() as session:
            _http_generate(session, url, PROMPTS[0], new)  # warm-up
            http = [_http_generate(session, url, PROMPTS[i], new) for i in range(repeats)]
            first = [_http_first_token(session, url, PROMPTS[i], new) for i in range(repeats)]
            _http_score(session, url, windows)  # warm-up
            http_score = [_http_score(session, url, windows) for _ in range(repeats)]
        concurrent = {c: _aggregate(url, c, 1 if b.quick else 3, new) for c in (1, 4, 16)}
    finally:
        _stop(proc)
        import bentoml

        # a store the caller chose (BENTOML_HOME) keeps none of the bench's entries
        bentoml.bentos.delete(tag)
        bentoml.models.delete(bento["model_tag"])

    def total(runs: list[tuple[int, float]]) -> tuple[int, float]:
        return sum(t for t, _ in runs), sum(s for _, s in runs)

    one = side("1 client over HTTP", concurrent[1][0], "tokens", concurrent[1][1])
    scored = repeats * windows.shape[0] * (windows.shape[1] - 1)
    return {
        "score": figure(
            "serve: prompt scoring tokens/s (echo + logprobs, max_tokens 0)",
            side("POST /v1/completions, token-id prompts", scored, "tokens", sum(http_score)),
            side("teacher-forced forward + log-softmax, in-process", scored, "tokens", sum(direct_score)),
            ("ratio", ">=", 0.8),
            note=f"{repeats} requests of {windows.shape[0]} prompts x {windows.shape[1]} tokens; logprobs 1",
        ),
        "decode": figure(
            "serve: single-stream tokens/s",
            side("POST /generate, greedy", total(http)[0], "tokens", total(http)[1]),
            side("model.generate, KV cache, in-process", total(direct)[0], "tokens", total(direct)[1]),
            ("ratio", ">=", 0.9),
            note=f"{repeats} requests of up to {new} new tokens; prefill included on both sides",
        ),
        "first_token": figure(
            "serve: time to first token (median)",
            side("streamed /v1/completions", None, "", float(np.median(first))),
            side("model.generate, 1 new token, in-process", None, "", float(np.median(direct_first))),
            note="seconds; lower is better",
        ),
        "clients_4": figure(
            "serve: aggregate tokens/s, 4 vs 1 clients",
            side("4 clients over HTTP", concurrent[4][0], "tokens", concurrent[4][1]),
            one,
        ),
        "clients_16": figure(
            "serve: aggregate tokens/s, 16 vs 1 clients",
            side("16 clients over HTTP", concurrent[16][0], "tokens", concurrent[16][1]),
            one,
            ("ratio", ">=", 4.0),
            note="the clients run on the same cores as the server",
        ),
    }


# ---------------------------------------------------------------------------------------------
# pipeline


def _project_copy(dest: Path, source_root: Path) -> None:
    """A git workspace holding the project's files (the stages run the code in it), without its data."""
    from pipeline.versioning import copy_project

    copy_project(SOURCE_ROOT, dest)
    shutil.copy2(source_root / "params.yaml", dest / "params.yaml")


def _start_s3(state: Path):
    """The embedded S3 server on a free block of ports (another block if one was taken meanwhile)."""
    import random

    from pipeline.config import StorageConfig
    from pipeline.storage import PORT_OFFSETS, EmbeddedS3, StorageError, port_is_free

    for attempt in range(3):
        base = random.randrange(20000, 60000 - len(PORT_OFFSETS))
        while not all(port_is_free(base + i) for i in range(len(PORT_OFFSETS))):
            base = random.randrange(20000, 60000 - len(PORT_OFFSETS))
        server = EmbeddedS3(
            StorageConfig(endpoint_url=f"http://127.0.0.1:{base}", bucket="lmforge-bench"), state
        )
        try:
            server.start()
            return server
        except StorageError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _timed(cmd: list[str], cwd: Path, env: dict, log: Log) -> tuple[float, list[str]]:
    """(seconds, the last lines of output) of one command."""
    from pipeline.versioning import stream_command

    start = time.perf_counter()
    tail = stream_command(cmd, cwd, _quiet(log), env=env)
    return time.perf_counter() - start, tail


def bench_pipeline(b: Bench) -> dict:
    """A first `lmforge run` on a fresh workspace, then a no-change `dvc repro` and `lmforge run`."""
    from pipeline.versioning import venv_env

    root, state = b.tmp / "pipeline-ws", b.tmp / "pipeline-state"
    root.mkdir()
    _project_copy(root, b.source_root)
    b.log("pipeline: starting S3")
    server = _start_s3(state)
    try:
        write_overrides(
            root,
            [
                f"storage.endpoint_url={server.cfg.endpoint_url}",
                f"storage.bucket={server.cfg.bucket}",
                "storage.embedded=true",
            ]
            + (QUICK if b.quick else []),
            b.profile,
        )
        for args in (
            ["init", "-q"],
            ["add", "-A"],
            ["-c", "user.name=bench", "-c", "user.email=bench@lmforge", "commit", "-qm", "bench"],
        ):
            subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
        env = venv_env({"LMFORGE_STATE_DIR": str(state), "BENTOML_HOME": str(state / "bentoml")})
        for var in (
            "LMFORGE_ROOT",
            "PREFECT_API_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        ):
            env.pop(var, None)  # nothing of the caller's workspace, Prefect server or AWS account
        lmforge = str(Path(sys.executable).parent / "lmforge")
        dvc_bin = str(Path(sys.executable).parent / "dvc")

        b.log("pipeline: first run (lmforge up; lmforge run)")
        first = _timed([lmforge, "up"], root, env, b.log)[0]
        first += _timed([lmforge, "run", "--source", b.source], root, env, b.log)[0]
        b.log("pipeline: no-change dvc repro")
        repro = _timed([dvc_bin, "repro"], root, env, b.log)[0]
        b.log("pipeline: no-change lmforge run")
        rerun, tail = _timed([lmforge, "run", "--source", b.source], root, env, b.log)
    finally:
        server.stop()
    what = "first `lmforge up` + `lmforge run`"
    return {
        "first_run": figure(
            "pipeline: quick-params first run (not the demo)"
            if b.quick
            else "pipeline: full demo (`make demo`)",
            side(what, None, "", first),
            note="fresh workspace and S3; in full mode this is exactly `make demo` without the venv install",
        ),
        "dvc_repro": figure(
            "pipeline: no-change `dvc repro`",
            side("dvc repro", None, "", repro),
            target=("seconds", "<=", 5.0),
            note="the gate stage is always_changed, so it runs every time",
        ),
        "rerun": figure(
            "pipeline: no-change `lmforge run`",
            side("lmforge run", None, "", rerun),
            note="it ended in 'no change'"
            if any("no change" in line for line in tail)
            else "it did NOT end in 'no change'",
        ),
    }


# ---------------------------------------------------------------------------------------------
# the run


SECTION_FUNCS: dict[str, Callable[[Bench], dict]] = {
    "preprocess": bench_preprocess,
    "train": bench_train,
    "serve": bench_serve,
    "pipeline": bench_pipeline,
    "validate": bench_validate,
}


def run_bench(
    quick: bool,
    out_dir: Path,
    source_root: Path,
    corpus: Path | None = None,
    sections: list[str] | tuple[str, ...] = SECTIONS,
    skipped: dict[str, str] | None = None,
    demo_seconds: float | None = None,
    profile: str | None = None,
    log: Log = print,
) -> dict:
    """Run the sections in a temporary workspace; write results.json and results.md into out_dir."""
    from pipeline.ingest import fetch_source

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        tmp = Path(tmp)
        ws = Workspace(tmp / "ws")
        ws.root.mkdir()
        for name in ("params.yaml", "dvc.yaml", "bentofile.yaml"):
            src = source_root / name if (source_root / name).is_file() else SOURCE_ROOT / name
            shutil.copy(src, ws.root / name)
        write_overrides(ws.root, QUICK if quick else FULL, profile)
        source = str(corpus.resolve()) if corpus else "builtin"
        fetch_source(source, ws.data, load_params(ws.root).ingest)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the stages run it
        bench = Bench(ws, quick, tmp, source, source_root, profile, log)
        results: dict = {"mode": "quick" if quick else "full", "sections": {}}
        results["skipped"] = dict(skipped or {})
        for name in sections:
            section_start = time.perf_counter()
            results["sections"][name] = SECTION_FUNCS[name](bench)
            log(f"{name}: done in {time.perf_counter() - section_start:.0f} s")
        results["params"] = bench.params.model_dump(
            include={"profile", "preprocess", "model", "train", "serve"}
        )
    results["machine"] = machine()  # at the end: the load average then says how busy the run was
    if demo_seconds is not None:
        results["sections"].setdefault("pipeline", {})["demo_given"] = figure(
            "pipeline: full demo (`make demo`), timed outside the bench",
            side("make demo", None, "", demo_seconds),
            note="given with --demo-seconds",
        )
    results["bench_seconds"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out_dir / "results.md").write_text(table)
    log(table)
    return results


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),  # a busy machine shows here
    }


# ---------------------------------------------------------------------------------------------
# the table


def _cell(s: dict | None) -> str:
    if s is None:
        return "—"
    if s["unit"] == "tokens":
        return f"{s['rate']:,.0f} tok/s"
    if s["unit"] == "FLOP":
        return f"{s['rate'] / 1e9:.1f} GFLOP/s"
    if s["unit"] == "MB":
        return f"{s['rate']:,.1f} MB/s"
    if s["unit"] == "GB RSS":
        return f"{s['amount']:.2f} GB ({s['rate']:.2f} per GB)"
    return f"{s['seconds']:.3f} s" if s["seconds"] < 1 else f"{s['seconds']:.1f} s"


def _target(f: dict) -> str:
    t = f["target"]
    if not t:
        return "—"
    sign = "≥" if t["op"] == ">=" else "≤"
    unit = {
        "seconds": " s",
        "rate": f" {f['lmforge']['unit'].replace('MB', 'MB/s').replace('GB RSS', 'per GB')}",
    }
    return f"{sign} {t['value']:g}" + unit.get(t["of"], "")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"lmforge bench ({results['mode']} mode), {m['date']}: {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"load average {m['load_average'][0]:.2f} at the end",
        "",
        "| measurement | lmforge | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for section in results["sections"].values():
        for f in section.values():
            ratio = "—" if f["ratio"] is None else f"{f['ratio']:.2f}"
            met = {True: "yes", False: "**no**", None: "—"}[f["met"]]
            lines.append(
                f"| {f['measurement']} | {_cell(f['lmforge'])} | {_cell(f['baseline'])} | {ratio} | {_target(f)} | {met} |"
            )
            what = f"lmforge = {f['lmforge']['what']}" + (
                f"; baseline = {f['baseline']['what']}" if f["baseline"] else ""
            )
            notes.append(f"- {f['measurement']}: {what}" + (f". {f['note']}" if f["note"] else ""))
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"| {name}: skipped ({reason}) | — | — | — | — | — |")
    return "\n".join(lines + [""] + notes) + "\n"


def _quiet(log: Log) -> Log:
    """Subprocess output: only lines that look like problems reach the log (CommandError keeps the tail)."""
    return lambda line: log(f"    {line}") if ("error" in line.lower() or "Traceback" in line) else None


if __name__ == "__main__":
    if "LOCAL_RANK" not in os.environ:
        sys.exit("python -m pipeline.bench is the bare training loop run by torchrun; use `lmforge bench`")
    bare_loop_worker()
