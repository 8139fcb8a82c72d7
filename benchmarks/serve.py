"""The serve section: the real Bento over HTTP against a bare KV-cache greedy loop, `model.generate` and a
teacher-forced forward pass in this process, with the same weights, prompts, token budget and thread count.

The bare loop is what the engine must not fall far behind: forward with past_key_values, argmax,
append, on 1 row (against one HTTP client) and on 16 left-padded rows at once (against 16 clients: the
most batching can give). Every side runs REPEATS times, interleaved with its baselines, while the
server sits idle between its own runs.

The HTTP clients are benchmarks/http_clients.py's.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import numpy as np
import torch

from benchmarks.harness import REPEATS, Bench, figure, interleaved, side
from benchmarks.http_clients import PROMPTS, aggregate, http_first_token, http_generate, http_score, overload
from benchmarks.train import ensure_shards, run_train_stage


def run(b: Bench) -> dict:
    import httpx
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from infra.bento_server import BentoServer
    from lmforge.architecture import context_length
    from lmforge.data.shards import load_shard
    from lmforge.training.model import load_model
    from lmforge.training.windows import fixed_windows
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
        context_length(model.config) - longest - 1,
    )
    if b.quick:
        new = min(new, 24)
    rounds = REPEATS
    requests = 2 if b.quick else 5  # single-stream requests per run, one prompt each
    requests_each = 1 if b.quick else 3  # per client in the concurrent runs
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]  # as the engine does

    @contextmanager
    def service_threads():
        """In-process baselines use every core, as the service's engine does."""
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    texts: dict[str, dict[str, str]] = {}  # each side's greedy completion of each prompt (first round)

    def keep(side_name: str, prompt: str, text: str) -> None:
        texts.setdefault(side_name, {}).setdefault(prompt, text)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)  # as the engine decodes a completion

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
        if eos in produced:  # the service does not count the EOS ending a completion
            produced = produced[: produced.index(eos)]
        if max_new_tokens == new:
            keep("generate", prompt, decode(produced))
        return len(produced), seconds

    # prompt scoring, as evaluation harnesses do it: full-context windows of val tokens, one batch
    windows = fixed_windows(
        load_shard(ws.shards_dir, "val"), context_length(model.config), params.serve.max_batch_size
    )
    scored = windows.shape[0] * (windows.shape[1] - 1)

    def score_in_process() -> tuple[int, float]:
        with service_threads():
            start = time.perf_counter()
            with torch.inference_mode():
                batch = windows.to(device)
                logp = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), -1)
                logp.gather(2, batch[:, 1:].unsqueeze(2)).tolist(), logp.topk(1, dim=-1).values.tolist()
            return scored, time.perf_counter() - start

    # the in-process sides, one run each
    def bare_single() -> tuple[int, float]:
        with service_threads():
            runs = [kv_greedy(model, [prompt_ids[i]], new, eos, pad, device) for i in range(requests)]
        for i, (rows, _) in enumerate(runs):
            keep("bare", PROMPTS[i], decode(rows[0]))
        return sum(len(rows[0]) for rows, _ in runs), sum(s for _, s in runs)

    def bare_batch() -> tuple[int, float]:
        with service_threads():
            runs = [kv_greedy(model, prompt_ids, new, eos, pad, device) for _ in range(requests_each)]
        for prompt, ids in zip(PROMPTS, runs[0][0], strict=True):
            keep("bare_batch", prompt, decode(ids))
        return sum(len(ids) for rows, _ in runs for ids in rows), sum(s for _, s in runs)

    def generate_single() -> tuple[int, float]:
        with service_threads():
            runs = [generate(PROMPTS[i], new) for i in range(requests)]
        return sum(t for t, _ in runs), sum(s for _, s in runs)

    def prefill() -> tuple[None, float]:
        with service_threads():
            return None, float(np.median([generate(PROMPTS[i], 1)[1] for i in range(requests)]))

    with service_threads():  # warm-ups
        generate(PROMPTS[0], new), kv_greedy(model, prompt_ids, new, eos, pad, device), score_in_process()

    b.log(f"serve: bentoml serve {tag}")
    try:
        with BentoServer(tag, b.tmp / "bento-serve") as server, httpx.Client() as session:
            url = server.url

            def http_single() -> tuple[int, float]:
                runs = [http_generate(session, url, PROMPTS[i], new) for i in range(requests)]
                for i, (_, _, text) in enumerate(runs):
                    keep("http", PROMPTS[i], text)
                return sum(t for t, _, _ in runs), sum(s for _, s, _ in runs)

            def http_first() -> tuple[None, float]:
                return None, float(
                    np.median([http_first_token(session, url, PROMPTS[i], new) for i in range(requests)])
                )

            def http_scoring() -> tuple[int, float]:
                return scored, http_score(session, url, windows)

            capacity = params.serve.max_batch_size + params.serve.max_queue  # rows the batch and queue hold
            refused: dict[int, list[float]] = {}  # per client count: the share of requests refused, a run

            def under_load(n: int):
                def run_load() -> tuple[None, float]:
                    latencies, refusals = overload(url, n, requests_each, new)
                    refused.setdefault(n, []).append(refusals / (refusals + len(latencies)))
                    return None, float(np.percentile(latencies, 99))

                return run_load

            def clients(n: int):
                def run_clients() -> tuple[int, float]:
                    tokens, seconds, completions = aggregate(url, n, requests_each, new)
                    for prompt, text in completions.items():
                        keep(f"http_{n}_clients", prompt, text)
                    return tokens, seconds

                return run_clients

            http_generate(session, url, PROMPTS[0], new), http_score(session, url, windows)  # warm-ups
            b.log(f"serve: single stream, {rounds} rounds of HTTP, the bare loop, model.generate")
            http, bare, direct = interleaved(rounds, http_single, bare_single, generate_single)
            b.log(f"serve: time to first token, {rounds} rounds")
            first, direct_first = interleaved(rounds, http_first, prefill)
            b.log(f"serve: prompt scoring, {rounds} rounds")
            scores, direct_score = interleaved(rounds, http_scoring, score_in_process)
            b.log(f"serve: 1, 4 and 16 clients and the bare loop on 16 rows, {rounds} rounds")
            one, four, sixteen, batch = interleaved(rounds, clients(1), clients(4), clients(16), bare_batch)
            b.log(
                f"serve: p99 latency at {capacity} clients and at {2 * capacity} (2x overload), {rounds} rounds"
            )
            at_capacity, overloaded = interleaved(rounds, under_load(capacity), under_load(2 * capacity))
    finally:
        import bentoml

        # a store the caller chose (BENTOML_HOME) keeps none of the bench's entries
        bentoml.bentos.delete(tag)
        bentoml.models.delete(bento["model_tag"])

    single = side("POST /generate, greedy, 1 client", "tokens", http)
    one_client = side("1 client over HTTP", "tokens", one)
    sixteen_clients = side("16 clients over HTTP", "tokens", sixteen)

    def single_stream(against: str, baseline: dict, baseline_texts: dict[str, str]) -> dict:
        return figure(
            f"serve: single-stream tokens/s, HTTP vs {against}",
            single,
            baseline,
            note=f"{requests} requests of up to {new} new tokens a run; prefill included on both sides",
            texts={"lmforge": texts["http"], "baseline": baseline_texts},
        )

    return {
        "score": figure(
            "serve: prompt scoring tokens/s (echo + logprobs, max_tokens 0)",
            side("POST /v1/completions, token-id prompts", "tokens", scores),
            side("teacher-forced forward + log-softmax, in-process", "tokens", direct_score),
            note=f"a request of {windows.shape[0]} prompts x {windows.shape[1]} tokens a run; logprobs 1",
        ),
        "overhead": single_stream(
            "the bare KV-cache loop",
            side("bare greedy loop (forward with past_key_values, argmax), in-process", "tokens", bare),
            texts["bare"],
        ),
        "decode": single_stream(
            "`model.generate`",
            side("model.generate, KV cache, greedy, in-process", "tokens", direct),
            texts["generate"],
        ),
        "first_token": figure(
            "serve: time to first token (median)",
            side("streamed /v1/completions", "", first),
            side("model.generate, 1 new token, in-process", "", direct_first),
            note=f"seconds, the median of {requests} requests a run; lower is better",
        ),
        "clients_4": figure(
            "serve: aggregate tokens/s, 4 vs 1 clients",
            side("4 clients over HTTP", "tokens", four),
            one_client,
        ),
        "clients_16": figure(
            "serve: aggregate tokens/s, 16 vs 1 clients",
            sixteen_clients,
            one_client,
            note="the clients run on the same cores as the server",
        ),
        "overload": figure(
            "serve: p99 latency of accepted requests, 2x overload vs at capacity",
            side(f"{2 * capacity} clients: twice what the batch and serve.max_queue hold", "", overloaded),
            side(f"{capacity} clients: serve.max_batch_size + serve.max_queue", "", at_capacity),
            note=f"seconds; {requests_each} request(s) of {new} tokens per client, each retried after Retry-After "
            f"when refused with a 429; refused at 2x: {np.median(refused[2 * capacity]):.0%} of attempts "
            f"(at capacity: {np.median(refused[capacity]):.0%})",
            refused_share={str(n): shares for n, shares in refused.items()},
        ),
        "batch_limit": figure(
            "serve: aggregate tokens/s, 16 clients vs the bare loop on 16 rows",
            sixteen_clients,
            side("bare greedy loop on the 16 prompts at once, in-process", "tokens", batch),
            note=f"{requests_each} request(s) per client, and as many 16-row batches, of up to {new} new "
            "tokens; a row's tokens count up to its EOS, and the batch runs until every row is done",
            texts={"lmforge": texts["http_16_clients"], "baseline": texts["bare_batch"]},
        ),
    }


@torch.inference_mode()
def kv_greedy(model, rows: list[list[int]], new: int, eos: int, pad: int, device) -> tuple[list, float]:
    """(each row's new tokens, seconds) of the bare greedy loop: prefill the rows (left-padded), then
    forward one token per row with past_key_values, argmax, append. A row's tokens end before its EOS
    (as the service counts them); the loop runs until every row is done or has `new` tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    ids, mask = ids.to(device), mask.to(device)
    start = time.perf_counter()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    produced: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for step in range(new):
        tokens = out.logits[:, -1].argmax(-1)
        for i, token in enumerate(tokens.tolist()):
            done[i] = done[i] or token == eos
            if not done[i]:
                produced[i].append(token)
        if all(done) or step == new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=positions,
            past_key_values=out.past_key_values, use_cache=True,
        )  # fmt: skip
    return produced, time.perf_counter() - start


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
