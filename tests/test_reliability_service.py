"""Reliability and security of the HTTP service (issue 6), against a real `bentoml serve` over HTTP:

- fuzz: over a thousand generated hostile requests get a 2xx or a 4xx, never a 5xx, and the service
  is still up afterwards;
- load: 32 clients for 60 s get only 200s, with a bounded RSS growth of the server's process tree;
- isolation: no request parameter makes the service read a file, write one or reach a URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from infra.bento_server import BentoServer
from tests.conftest import PROMPT

# every test here talks to a trained model in a real Bento (a session fixture of about a minute)
pytestmark = pytest.mark.slow

MAX_BODY_BYTES = 1 << 20  # ServeConfig.max_body_bytes, which the test Bento keeps
MAX_NEW_TOKENS_CAP = 48  # serve.max_new_tokens_cap in conftest's SERVING overrides


@dataclass
class Served:
    url: str
    pid: int  # the `bentoml serve` process; its workers are its descendants
    log: Path
    proc: subprocess.Popen = field(repr=False)


@pytest.fixture(scope="module")
def served(bento, tmp_path_factory) -> Iterator[Served]:
    """`bentoml serve` as in tests/test_serving.py, but logging to a file: the thousands of access-log
    lines these tests cause would fill an unread pipe and stall the server."""
    with BentoServer(bento["bento_tag"], tmp_path_factory.mktemp("served")) as server:
        yield Served(server.url, server.proc.pid, server.log, server.proc)


def assert_service_works(served: Served) -> None:
    """Still up and still generating."""
    assert served.proc.poll() is None, served.log.read_text()[-4000:]
    assert httpx.get(f"{served.url}/readyz", timeout=10).status_code == 200
    done = httpx.post(f"{served.url}/generate", json={"prompt": PROMPT, "max_new_tokens": 4}, timeout=60)
    assert done.status_code == 200, done.text
    assert done.json()["completion_tokens"] >= 1


def assert_sound(response: httpx.Response, path: str) -> None:
    """Never a 5xx; a 200 carries a whole answer, not an error in disguise."""
    assert 200 <= response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code != 200 or path not in (
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
    ):
        return
    if path == "/v1/models":
        assert response.json()["data"][0]["id"], response.text[:500]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-500:]
        assert "generation_error" not in response.text, response.text[-500:]
    elif path == "/generate":
        assert isinstance(response.json()["text"], str)
    else:
        assert response.json()["choices"], response.text[:500]


# ---------------------------------------------------------------------------------------------
# fuzz: hypothesis generates the requests


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


HOSTILE_STRINGS = [
    "", " ", "\x00", "\u202e", "\ufeff", "\U0001f600" * 20, "é" * 300, "a" * 5000, "{{7*7}}", "${jndi:ldap://x}",
    "'; DROP TABLE models; --", "../../../../etc/passwd", "file:///etc/passwd", "%s%n%x", "\r\n\r\nHTTP/1.1 200 OK",
    "<|endoftext|>", "lmforge-lm:latest",
]  # fmt: skip
HOSTILE_NUMBERS = [
    0, -1, 1, 2, 16, 17, MAX_NEW_TOKENS_CAP, MAX_NEW_TOKENS_CAP + 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63),
    10**30, 1e-45, 5e-324, 1e308, -0.0, 0.5, 1.0, 2.0, 2.0000001, float("nan"), float("inf"), float("-inf"),
]  # fmt: skip

# unicode junk, lone surrogates included (json.dumps writes them as \udXXX escapes)
characters = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr))
texts = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(characters, max_size=30))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HOSTILE_NUMBERS), st.floats(), texts
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)


# plausible values: each one alone is a request the service may serve
plain_texts = st.text(st.characters(), min_size=1, max_size=12)
short_prompts = st.one_of(st.sampled_from(["the", PROMPT, "a model"]), plain_texts)
stops = st.one_of(plain_texts, st.lists(plain_texts, max_size=4))
GENERATE_FIELDS = {
    "prompt": short_prompts,
    "max_new_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(0, 400),
    "seed": st.integers(0, 2**63 - 1),
    "stop": stops,
}
# what OpenAI's completions and chat bodies share
OPENAI_FIELDS = {
    "model": texts,
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "n": st.integers(1, 4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "stop": stops,
    "seed": st.integers(0, 2**63 - 1),
}
COMPLETION_FIELDS = OPENAI_FIELDS | {
    "prompt": st.one_of(short_prompts, st.lists(short_prompts, min_size=1, max_size=4)),
    "max_tokens": st.integers(1, 4),
    "echo": st.booleans(),
    "logprobs": st.one_of(st.none(), st.integers(0, 5)),
    "suffix": st.sampled_from([None, ""]),
    "best_of": st.none(),
    "user": texts,
}
# token ids near and past the vocabulary's ends (the test model's is a few hundred)
token_ids = st.lists(
    st.one_of(st.integers(0, 300), st.sampled_from([-1, 10**6, 2**63])), min_size=1, max_size=8
)
SAMPLING_FIELDS = {
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 3),
    "min_p": st.floats(0, 1),
    "top_k": st.integers(-1, 400),
    "logit_bias": st.dictionaries(st.integers(-5, 400).map(str), st.floats(-100, 100), max_size=4),
    "stop_token_ids": token_ids,
    "ignore_eos": st.booleans(),
}
COMPLETION_FIELDS |= SAMPLING_FIELDS | {
    "prompt": st.one_of(
        short_prompts,
        st.lists(short_prompts, min_size=1, max_size=4),
        token_ids,
        st.lists(token_ids, max_size=3),
    ),
    "max_tokens": st.integers(0, 4),
}


def chat_messages(roles: list[str], contents: st.SearchStrategy) -> st.SearchStrategy:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(roles), "content": contents}, optional={"name": plain_texts}
    )
    return st.lists(message, min_size=1, max_size=4)


text_parts = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": plain_texts}), min_size=1, max_size=3
)
messages = chat_messages(["system", "developer", "user", "assistant"], st.one_of(plain_texts, text_parts))
# wrong roles, content that is not text, huge content, nested junk: each must be a 4xx
hostile_messages = st.one_of(
    chat_messages(["tool", "function", "", "USER", "ipython"], plain_texts),
    chat_messages(["user"], st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["image_url", "input_audio", "file"]), "image_url": texts}), min_size=1)),
    chat_messages(["user"], st.one_of(st.just("hi " * 5000), st.just("\ud800"), values)),
    st.lists(values, max_size=3),
)  # fmt: skip
CHAT_FIELDS = (
    OPENAI_FIELDS
    | {
        "messages": messages,
        "max_tokens": st.integers(1, 4),
        "max_completion_tokens": st.integers(1, 4),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
        "tools": st.sampled_from([None, []]),
        "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}]),
    }
    | SAMPLING_FIELDS
)


@st.composite
def bodies(draw, fields: dict[str, st.SearchStrategy]) -> dict:
    """A plausible body (prompt and a small token budget always, other fields sometimes), then up to two
    of its fields replaced by anything at all, and sometimes unknown keys: each hostile value meets its
    validator."""
    always = ("prompt", "messages", "max_new_tokens", "max_tokens")
    body = {k: draw(v) for k, v in fields.items() if k in always or draw(st.booleans())}
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        body[key] = draw(values)
    if draw(st.integers(0, 3)) == 0:
        body |= draw(st.dictionaries(texts, values, min_size=1, max_size=2))
    return body


@st.composite
def encoded(draw, objects: st.SearchStrategy) -> bytes:
    """JSON text of the object: NaN and Infinity literals allowed, lone surrogates as \\u escapes or, with
    ensure_ascii off, as invalid UTF-8 bytes."""
    obj = draw(objects)
    ascii_only = draw(st.booleans())
    return json.dumps(obj, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


JSON = {"content-type": "application/json"}
CONTENT_TYPES = [
    "application/json", "application/json; charset=utf-16", "text/plain", "", "multipart/form-data",
    "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "application/vnd.bentoml+pickle",
    "application/octet-stream", "application/xml", "APPLICATION/JSON", "application/json, text/plain",
]  # fmt: skip
METHODS = ["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "FOO"]
PATHS = ["/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
         "/predict", "/health"]  # fmt: skip
content_types = st.sampled_from(CONTENT_TYPES).map(lambda ct: {"content-type": ct} if ct else {})


def with_query(paths: list[str]) -> st.SearchStrategy[str]:
    """One of the paths with a query string of junk."""
    queries = st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=3)
    return st.builds(
        lambda path, query: f"{path}?{httpx.QueryParams(query)}", st.sampled_from(paths), queries
    )


json_requests = st.one_of(
    st.builds(Req, st.just("POST"), st.just("/generate"), encoded(bodies(GENERATE_FIELDS)), st.just(JSON)),
    st.builds(
        Req, st.just("POST"), st.just("/v1/completions"), encoded(bodies(COMPLETION_FIELDS)), st.just(JSON)
    ),
    st.builds(
        Req, st.just("POST"), st.just("/v1/chat/completions"), encoded(bodies(CHAT_FIELDS)), st.just(JSON)
    ),
    st.builds(
        Req,
        st.just("POST"),
        st.just("/v1/chat/completions"),
        encoded(bodies(CHAT_FIELDS | {"messages": hostile_messages})),
        st.just(JSON),
    ),  # fmt: skip
)


@st.composite
def malformed_json(draw) -> bytes:
    good = draw(encoded(bodies(COMPLETION_FIELDS | GENERATE_FIELDS | CHAT_FIELDS)))
    return draw(
        st.one_of(
            st.binary(max_size=200),
            st.just(good[: draw(st.integers(0, max(len(good) - 1, 0)))]),  # truncated
            st.builds(lambda tail: good + tail, st.binary(min_size=1, max_size=20)),  # trailing junk
            st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1, 100_000)),  # deep nesting
            st.builds(lambda n: b'{"prompt": ' * n, st.integers(1, 10_000)),
            encoded(values),  # valid JSON, but not an object of the right shape
        )
    )


odd_requests = st.one_of(
    st.builds(
        Req,
        st.just("POST"),
        st.sampled_from(PATHS),
        malformed_json(),
        st.just(JSON),
    ),
    st.builds(  # wrong or odd content types over any body
        Req,
        st.just("POST"),
        st.sampled_from(PATHS),
        st.one_of(encoded(bodies(GENERATE_FIELDS)), encoded(bodies(COMPLETION_FIELDS)), malformed_json()),
        content_types,
    ),
    st.builds(  # odd methods
        Req, st.sampled_from(METHODS), with_query(PATHS), st.one_of(st.none(), st.binary(max_size=100))
    ),
    st.builds(  # the model list, with junk query strings, bodies and content types
        Req, st.just("GET"), with_query(["/v1/models"]), st.one_of(st.none(), encoded(values)), content_types
    ),
)


@st.composite
def huge_bodies(draw) -> Req:
    """A prompt of one repeated character (or escape) sized to land just below or above the body limit."""
    unit = draw(st.sampled_from(["a", "é", "\\u0000", "\\ud800", "the ", "\U0001f600"]))
    size = draw(st.integers(MAX_BODY_BYTES - 2000, MAX_BODY_BYTES + 2000))
    path = draw(st.sampled_from(PATHS[:3]))
    if path == "/v1/chat/completions":
        head, tail = b'{"max_tokens": 2, "messages": [{"role": "user", "content": "', b'"}]}'
    else:
        head, tail = b'{"max_tokens": 2, "max_new_tokens": 2, "prompt": "', b'"}'
    filler = unit.encode() * ((size - len(head) - len(tail)) // len(unit.encode()))
    return Req("POST", path, head + filler + tail, JSON)


FUZZ_SETTINGS = dict(
    deadline=None,
    derandomize=True,  # the same requests on every run, so CI is reproducible
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)


def test_fuzzed_hostile_requests_never_get_a_5xx(served):
    statuses: Counter[tuple[str, int]] = Counter()
    client = httpx.Client(base_url=served.url, timeout=120, limits=httpx.Limits(max_keepalive_connections=0))

    def send(req: Req) -> None:
        response = client.request(req.method, req.path, content=req.content, headers=req.headers)
        route = req.path.split("?")[0]
        statuses[(route, response.status_code)] += 1
        assert_sound(response, route)

    @settings(max_examples=1000, **FUZZ_SETTINGS)
    @given(json_requests)
    def fuzz_fields(req: Req) -> None:
        send(req)

    @settings(max_examples=400, **FUZZ_SETTINGS)
    @given(odd_requests)
    def fuzz_shapes(req: Req) -> None:
        send(req)

    @settings(max_examples=9, **FUZZ_SETTINGS)
    @given(huge_bodies())
    def fuzz_huge(req: Req) -> None:
        send(req)

    started = time.monotonic()
    with client:
        fuzz_fields()
        fuzz_shapes()
        fuzz_huge()
    sent = sum(statuses.values())
    by_status: Counter[int] = Counter()
    for (_, status), n in statuses.items():
        by_status[status] += n
    print(
        f"\nfuzz: {sent} requests in {time.monotonic() - started:.0f} s; by status {dict(sorted(by_status.items()))}"
    )
    print(f"fuzz: by route and status {dict(sorted(statuses.items()))}")
    assert sent >= 1000
    # the fuzz reached the model, and the validation, on every generating route
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        assert statuses[(path, 200)] >= 20 and statuses[(path, 400)] >= 20, statuses
    assert statuses[("/v1/models", 200)] >= 20 and by_status[413] >= 1 and by_status[415] >= 1
    assert_service_works(served)


def test_a_hostile_request_cannot_fail_its_batchmates(served):
    """Sampling settings at the edge of what validation allows once got a 500 and failed every request
    batched with them."""
    edge = [
        {"temperature": 1e-45},
        {"temperature": 5e-324},
        {"top_p": 5e-324},
        {"temperature": 2, "top_p": 1e-300},
    ]
    bodies_ = [{"prompt": PROMPT, "max_tokens": 24, "temperature": 0.8, "seed": i} for i in range(12)]
    bodies_ += [{"prompt": PROMPT, "max_tokens": 24} | e for e in edge]

    def ask(body: dict) -> httpx.Response:
        return httpx.post(f"{served.url}/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(len(bodies_)) as pool:
        responses = list(pool.map(ask, bodies_))
    assert [r.status_code for r in responses] == [200] * len(bodies_), [r.text[:200] for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)


# ---------------------------------------------------------------------------------------------
# load


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except OSError:
            continue
        total += pages * os.sysconf("SC_PAGE_SIZE")
    return total


async def hammer(url: str, clients: int, seconds: float) -> list[tuple[int, float, int]]:
    """`clients` clients sending completions back to back for `seconds`: (status, latency s, tokens) each."""
    results: list[tuple[int, float, int]] = []
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one_client(k: int) -> None:
            i = 0
            while time.monotonic() < stop_at:
                body = {"prompt": f"the {k} {i}", "max_tokens": 16, "temperature": 0.8, "seed": i}
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/completions", json=body)
                    tokens = (
                        response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
                    )
                    results.append((response.status_code, time.perf_counter() - started, tokens))
                except httpx.HTTPError as exc:
                    results.append((-1, time.perf_counter() - started, 0))
                    print(f"load: client {k}: {exc!r}")
                i += 1

        await asyncio.gather(*(one_client(k) for k in range(clients)))
    return results


@pytest.mark.slow
def test_32_clients_for_60_seconds(served, tmp_path):
    clients, seconds = 32, 60
    # warm-up, not measured: the first batches grow the allocator's arenas and the KV caches once
    warm = asyncio.run(hammer(served.url, clients, 5))
    assert {status for status, _, _ in warm} == {200}

    samples: list[tuple[float, int]] = []  # (seconds since start, RSS bytes)
    done = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not done.is_set():
            samples.append((time.monotonic() - start, tree_rss(served.pid)))
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    results = asyncio.run(hammer(served.url, clients, seconds))
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()

    statuses = Counter(status for status, _, _ in results)
    latencies = [latency for _, latency, _ in results]
    cuts = statistics.quantiles(latencies, n=100)
    first = [rss for t, rss in samples if t < 10]
    last = [rss for t, rss in samples if t >= samples[-1][0] - 10]
    growth = statistics.mean(last) / statistics.mean(first) - 1
    report = {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(results),
        "statuses": {str(k): v for k, v in statuses.items()},
        "p50_ms": round(cuts[49] * 1000, 1),
        "p99_ms": round(cuts[98] * 1000, 1),
        "completions_per_s": round(len(results) / elapsed, 1),
        "tokens_per_s": round(sum(tokens for _, _, tokens in results) / elapsed, 1),
        "rss_first_10s_mib": round(statistics.mean(first) / 2**20, 1),
        "rss_last_10s_mib": round(statistics.mean(last) / 2**20, 1),
        "rss_growth": round(growth, 4),
        "rss_samples": len(samples),
    }
    out = tmp_path / "load_report.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nload: {json.dumps(report)}\nload: written to {out}")

    assert statuses == {200: len(results)}, statuses
    assert len(results) >= clients  # every client got through at least once
    assert len(samples) >= 50 and len(first) >= 5 and len(last) >= 5, samples
    assert growth < 0.10, report
    assert_service_works(served)


# ---------------------------------------------------------------------------------------------
# isolation: prompts, stop strings and model names are data, never paths, URLs or code


def canary_connections(listener: socket.socket) -> int:
    """Connections that reached the listening socket (a completed handshake waits in its backlog)."""
    listener.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def test_requests_cannot_read_files_write_files_or_reach_urls(served, bento):  # noqa: F811
    # short paths, so prompts naming them still fit the test model's 64-token context
    workdir = Path(tempfile.mkdtemp(prefix="lmf", dir="/tmp"))
    try:
        marker = f"SECRET{uuid.uuid4().hex[:12]}"
        secret = workdir / "s"
        secret.write_text(marker + "\n")
        pwned = workdir / "p"
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            port = listener.getsockname()[1]
            responses = send_isolation_probes(served.url, bento["model_tag"], secret, pwned, port)
            reached = canary_connections(listener)
        assert reached == 0, f"{reached} connection(s) to the canary socket on port {port}"
        assert not pwned.exists(), "a request ran a command"
        for what, response in responses:
            assert_sound(response, what.split()[0])
            assert marker not in response.text, (what, response.text[:500])
        statuses = Counter(response.status_code for _, response in responses)
        print(f"\nisolation: {len(responses)} requests; by status {dict(statuses)}")
        # most probes were served, so the payloads really went through the model
        assert statuses[200] >= len(responses) // 2, statuses
        assert_service_works(served)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def send_isolation_probes(
    url: str, served_tag: str, secret: Path, pwned: Path, port: int
) -> list[tuple[str, httpx.Response]]:
    canary = f"http://127.0.0.1:{port}/"
    payloads = [
        str(secret), f"file://{secret}", f"@{secret}", f"../../../../..{secret}", "/etc/passwd",
        "file:///etc/passwd", "../../../../etc/passwd", canary, f"http://localhost:{port}/x", f"//127.0.0.1:{port}",
        f"${{jndi:ldap://127.0.0.1:{port}/a}}", "{{7*7}}", f"{{% include '{secret}' %}}", f"$(touch {pwned})",
        f"`touch {pwned}`", f"; touch {pwned}", f"| touch {pwned}", f"__import__('os').system('touch {pwned}')",
        "%(prompt)s {0.__class__}",
    ]  # fmt: skip
    model_names = [
        str(secret),
        f"file://{secret}",
        canary,
        "../../../../etc/passwd",
        "lmforge-lm:latest",
        "gpt2",
    ]
    out: list[tuple[str, httpx.Response]] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for payload in payloads:
            r = client.post("/generate", json={"prompt": payload, "max_new_tokens": 4, "temperature": 0})
            out.append((f"/generate prompt={payload}", r))
            r = client.post("/generate", json={"prompt": "the", "max_new_tokens": 4, "stop": [payload]})
            out.append((f"/generate stop={payload}", r))
            body = {
                "model": payload, "prompt": payload, "max_tokens": 4, "temperature": 0, "echo": True,
                "stop": payload, "user": payload,
            }  # fmt: skip
            r = client.post("/v1/completions", json=body)
            out.append((f"/v1/completions all={payload}", r))
            if r.status_code == 200:  # echoed verbatim: not expanded, templated or fetched
                assert r.json()["choices"][0]["text"].startswith(payload), r.text
                assert r.json()["model"] == served_tag
            r = client.post("/v1/completions", json=body | {"stream": True, "prompt": [payload, "the"]})
            out.append((f"/v1/completions stream={payload}", r))
            r = client.get("/v1/models", params={"model": payload, "url": payload})
            out.append((f"/v1/models query={payload}", r))
        for name in model_names:  # the served model answers, whatever the request names
            r = client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 4})
            out.append((f"/v1/completions model={name}", r))
            assert r.status_code == 200 and r.json()["model"] == served_tag, r.text
        # a form body would make BentoML fetch URLs given for file fields: forms are refused outright
        for path in ("/generate", "/v1/completions"):
            r = client.post(path, data={"prompt": canary, "max_new_tokens": "4"})
            out.append((f"{path} urlencoded", r))
            r = client.post(path, files={"prompt": ("s", str(secret).encode())}, data={"model": canary})
            out.append((f"{path} multipart", r))
            assert r.status_code == 415, r.text
    return out


def test_a_megabyte_prompt_does_not_stall_other_clients(served, trained):
    """Clients sending 1 MB prompts back to back: each is refused before it is tokenized, so a small
    request in the meantime is served about as fast as alone. The stall it would cause is measured here:
    tokenizing that prompt with the served tokenizer, which a blocked event loop would add to every request."""
    from transformers import AutoTokenizer

    huge = ("the quick brown fox " * 50_000)[:1_000_000]  # a body just under serve.max_body_bytes
    assert len(json.dumps({"prompt": huge})) < MAX_BODY_BYTES
    started = time.perf_counter()
    AutoTokenizer.from_pretrained(trained[0].model_dir)(huge, add_special_tokens=False)
    stall = time.perf_counter() - started

    def small(client: httpx.Client) -> float:
        started = time.perf_counter()
        response = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        return time.perf_counter() - started

    with httpx.Client(base_url=served.url, timeout=120) as client:
        small(client)  # warm
        baseline = statistics.median(small(client) for _ in range(7))
        stop, refused = threading.Event(), []

        def flood() -> None:
            with httpx.Client(base_url=served.url, timeout=120) as big:
                while not stop.is_set():
                    started = time.perf_counter()
                    response = big.post("/v1/completions", json={"prompt": huge, "max_tokens": 4})
                    refused.append((response.status_code, time.perf_counter() - started, response.text[:300]))

        flooders = [threading.Thread(target=flood) for _ in range(2)]
        for thread in flooders:
            thread.start()
        try:
            while len(refused) < 2:  # both are sending
                time.sleep(0.01)
            during = statistics.median(small(client) for _ in range(7))
        finally:
            stop.set()
            for thread in flooders:
                thread.join(120)
    print(f"\n1 MB prompts: small request {baseline * 1000:.0f} ms alone, {during * 1000:.0f} ms meanwhile; "
          f"{len(refused)} refused; tokenizing one takes {stall * 1000:.0f} ms")  # fmt: skip
    assert during < baseline + stall / 4, (baseline, during, stall)
    assert statistics.median(seconds for _, seconds, _ in refused) < stall / 4
    assert {status for status, _, _ in refused} == {400}, refused[:3]
    assert all("cannot fit the model's context" in text for _, _, text in refused), refused[:3]
    assert_service_works(served)
