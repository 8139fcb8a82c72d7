"""The bench's HTTP clients: one request of each kind the serve and vLLM sections time, and many clients
at once, each sending its requests one after another.

Every client keeps one connection open, as any HTTP client pool (the OpenAI SDK's included) does.
A new httpx.Client per request costs about 27 ms here (an SSL context is built even for http://),
which is the client's cost, not the server's.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PROMPTS = [
    "The ", "Return the ", "This module provides", "If the ", "A new ", "Raise ", "The default ",
    "When ", "Each ", "For example, ", "Note that ", "This function ", "An object ", "In ", "It is ", "Use ",
]  # fmt: skip


def http_generate(client, url: str, prompt: str, max_new_tokens: int) -> tuple[int, float, str]:
    """(completion tokens, seconds, text) of one greedy POST /generate."""
    start = time.perf_counter()
    response = client.post(
        f"{url}/generate",
        json={"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0},
        timeout=300,
    )
    seconds = time.perf_counter() - start
    response.raise_for_status()
    body = response.json()
    return body["completion_tokens"], seconds, body["text"]


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


def overload(url: str, clients: int, requests_each: int, max_new_tokens: int) -> tuple[list[float], int]:
    """(seconds of each accepted request, requests refused) of `clients` clients each sending requests one
    after another, all at once. A refused request (429) waits its Retry-After and is sent again, as a
    well-behaved client does; only the attempt that is answered counts as a latency."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    sessions = [httpx.Client() for _ in range(clients)]
    latencies: list[float] = []
    refusals: list[float] = []  # list.append is atomic across the client threads; += on an int is not

    def client(k: int) -> None:
        for i in range(requests_each):
            body = {"prompt": PROMPTS[(k + i) % len(PROMPTS)], "max_tokens": max_new_tokens, "temperature": 0}
            while True:
                start = time.perf_counter()
                response = sessions[k].post(f"{url}/v1/completions", json=body, timeout=300)
                if response.status_code != 429:
                    response.raise_for_status()
                    latencies.append(time.perf_counter() - start)
                    break
                refusals.append(start)
                time.sleep(float(response.headers["retry-after"]))

    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        return latencies, len(refusals)
    finally:
        for session in sessions:
            session.close()


def http_complete(client, url: str, prompt: str, max_new_tokens: int) -> tuple[int, float, str]:
    """(completion tokens, seconds, text) of one greedy POST /v1/completions of exactly max_new_tokens
    (ignore_eos): the route and the work every engine serves alike."""
    body = {"prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    response = client.post(f"{url}/v1/completions", json=body, timeout=300)
    seconds = time.perf_counter() - start
    response.raise_for_status()
    done = response.json()
    return done["usage"]["completion_tokens"], seconds, done["choices"][0]["text"]


def aggregate(
    url: str, clients: int, requests_each: int, max_new_tokens: int, send=http_generate
) -> tuple[int, float, dict[str, str]]:
    """(completion tokens, wall seconds, the text of each prompt) of `clients` clients each sending
    requests (`send`: /generate, or /v1/completions) one after another."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    sessions = [httpx.Client() for _ in range(clients)]  # made before the clock starts
    texts: dict[str, str] = {}

    def client(k: int) -> int:
        tokens = 0
        for i in range(requests_each):
            prompt = PROMPTS[(k + i) % len(PROMPTS)]
            count, _, texts[prompt] = send(sessions[k], url, prompt, max_new_tokens)
            tokens += count
        return tokens

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(client, range(clients)))
        return tokens, time.perf_counter() - start, texts
    finally:
        for session in sessions:
            session.close()
