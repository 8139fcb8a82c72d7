"""The serve section: the real Bento over HTTP against `model.generate` (KV cache) and a teacher-forced
forward pass in this process, with the same weights, prompts, token budget and thread count.

Every client keeps one connection open, as any HTTP client pool (the OpenAI SDK's included) does.
A new httpx.Client per request costs about 27 ms here (an SSL context is built even for http://),
which is the client's cost, not the server's.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from benchmarks.harness import Bench, figure, side
from benchmarks.train import ensure_shards, run_train_stage

PROMPTS = [
    "The ", "Return the ", "This module provides", "If the ", "A new ", "Raise ", "The default ",
    "When ", "Each ", "For example, ", "Note that ", "This function ", "An object ", "In ", "It is ", "Use ",
]  # fmt: skip


def run(b: Bench) -> dict:
    import httpx
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from infra.bento_server import BentoServer
    from pipeline.data import fixed_windows, load_shard
    from pipeline.generation import context_length
    from pipeline.model import load_model
    from pipeline.package import use_bentoml_home

    ws, params = b.ws, b.params
    use_bentoml_home(ws.state)  # unless the caller chose a store, the bench's own
    hf_logging.disable_progress_bar()
    bento = package_for_bench(b)
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
    try:
        with BentoServer(tag, b.tmp / "bento-serve") as server:
            url = server.url
            with httpx.Client() as session:
                http_generate(session, url, PROMPTS[0], new)  # warm-up
                http = [http_generate(session, url, PROMPTS[i], new) for i in range(repeats)]
                first = [http_first_token(session, url, PROMPTS[i], new) for i in range(repeats)]
                http_score(session, url, windows)  # warm-up
                scores = [http_score(session, url, windows) for _ in range(repeats)]
            concurrent = {c: aggregate(url, c, 1 if b.quick else 3, new) for c in (1, 4, 16)}
    finally:
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
            side("POST /v1/completions, token-id prompts", scored, "tokens", sum(scores)),
            side("teacher-forced forward + log-softmax, in-process", scored, "tokens", sum(direct_score)),
            note=f"{repeats} requests of {windows.shape[0]} prompts x {windows.shape[1]} tokens; logprobs 1",
        ),
        "decode": figure(
            "serve: single-stream tokens/s",
            side("POST /generate, greedy", total(http)[0], "tokens", total(http)[1]),
            side("model.generate, KV cache, in-process", total(direct)[0], "tokens", total(direct)[1]),
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
            note="the clients run on the same cores as the server",
        ),
    }


def package_for_bench(b: Bench) -> dict:
    """The trained model through the real evaluate and package steps; returns package()'s result.

    The gate's verdict is recorded but not obeyed: a bench model trains for throughput, not quality,
    and this Bento lives only in the bench's own BentoML store.
    """
    from pipeline.evaluate import evaluate
    from pipeline.gate import decide
    from pipeline.package import package

    ws, params = b.ws, b.params
    if not (ws.model_dir / "model.safetensors").is_file():
        ensure_shards(b)
        b.log("train: the stage (for serving)")
        run_train_stage(b)
    threads = torch.get_num_threads()
    decision = decide(evaluate(params, ws), None, params.gate)
    torch.set_num_threads(threads)  # evaluate takes every core for this process
    decision.model_copy(update={"promote": True}).save(ws.gate_file)
    return package(ws, params, data_md5=None)


# ---------------------------------------------------------------------------------------------
# the HTTP clients


def http_generate(client, url: str, prompt: str, max_new_tokens: int) -> tuple[int, float]:
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


def http_first_token(client, url: str, prompt: str, max_new_tokens: int) -> float:
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


def http_score(client, url: str, windows: torch.Tensor) -> float:
    """Seconds of one echo + logprobs request that scores every window (max_tokens 0: no generation)."""
    body = {"prompt": windows.tolist(), "max_tokens": 0, "echo": True, "logprobs": 1}
    start = time.perf_counter()
    response = client.post(f"{url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    assert len(response.json()["choices"]) == windows.shape[0]
    return time.perf_counter() - start


def aggregate(url: str, clients: int, requests_each: int, max_new_tokens: int) -> tuple[int, float]:
    """(completion tokens, wall seconds) of `clients` clients each sending requests one after another."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    sessions = [httpx.Client() for _ in range(clients)]  # made before the clock starts

    def client(k: int) -> int:
        return sum(
            http_generate(sessions[k], url, PROMPTS[(k + i) % len(PROMPTS)], max_new_tokens)[0]
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
