"""The Bento service: `POST /generate`; OpenAI-compatible `POST /v1/completions` (logprobs, echo scoring,
token-id prompts), `POST /v1/chat/completions` and `GET /v1/models`, answered in vLLM's shapes; vLLM's
`POST /tokenize`, `/detokenize` and `GET /health`; and the minimal `POST /predict`.

BentoML 1.4 provides /readyz, /livez and Prometheus /metrics. Each worker loads the model once (from
the BentoML model store, safetensors only) into a batching Engine (pipeline/generation.py), so
concurrent requests share forward passes. Bad input gets a 4xx with a message; never a 5xx.

The serving limits come from the Bento's build arguments (see pipeline/package.py), so a Bento carries
its own settings: `bentoml serve lmforge:<version>` needs nothing else from the workspace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from pipeline.auth import OPEN_PATHS, api_keys, authorized, exposure_problem, unauthenticated_warning
from pipeline.chat import ChatError, end_of_turn_ids, render_text, resolve_template
from pipeline.config import ServeConfig
from pipeline.generation import (
    Completion,
    Delta,
    Engine,
    EngineStopped,
    GenerationError,
    SamplingParams,
    load_engine,
)

logger = logging.getLogger("lmforge.service")
ARGS = bentoml.use_arguments()
MODEL_TAG = str(getattr(ARGS, "model_tag", None) or os.environ.get("LMFORGE_MODEL_TAG", "lmforge-lm:latest"))
# The serving limits: the Bento arguments package.py pins from params (serve.*), validated by the same
# ServeConfig, whose defaults fill in whatever a bare `bentoml serve` was not given.
SERVE = ServeConfig.model_validate(
    {name: getattr(ARGS, name) for name in ServeConfig.model_fields if getattr(ARGS, name, None) is not None}
)
MAX_NEW_TOKENS_CAP = SERVE.max_new_tokens_cap
DEFAULT_MAX_NEW_TOKENS = SERVE.default_max_new_tokens
MAX_BATCH_SIZE = SERVE.max_batch_size
MAX_QUEUE = SERVE.max_queue
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.05  # how soon a request whose client hung up leaves the batch
GENERATING_PATHS = ("/generate", "/predict", "/v1/completions", "/v1/chat/completions")
MAX_BODY_BYTES = SERVE.max_body_bytes
MAX_LOGPROBS = SERVE.max_logprobs  # vLLM's default cap on logprobs / top_logprobs
API_KEYS = api_keys()  # from the environment of the serving process, never from the Bento
CHAT_TEMPLATE: str | None = SERVE.chat_template or None  # the template text itself; overrides the tokenizer's
# vLLM sets no number; harnesses send a task's stops plus EOS. Each is searched in the new text only.
MAX_STOP_STRINGS = 256
INLINE_ENCODE_CHARS = 4096

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int | None, Field(ge=0, lt=2**63)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


def _check_unicode(text: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"); the tokenizer and a UTF-8 response cannot carry one
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate escape is not)") from None
    return text


def _check_stop(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    for s in stops:
        _check_unicode(s)
    return stops


def _check_max_tokens(value: int | None) -> int | None:
    if value is not None and value > MAX_NEW_TOKENS_CAP:
        raise ValueError(f"at most {MAX_NEW_TOKENS_CAP} new tokens per request (got {value})")
    return value


Text = Annotated[str, AfterValidator(_check_unicode)]
MaxTokens = Annotated[int, Field(ge=1), AfterValidator(_check_max_tokens)]
Stop = Annotated[str | list[str] | None, AfterValidator(_check_stop)]
TokenIds = Annotated[list[int], Field(min_length=1, max_length=1 << 16)]

# ---------------------------------------------------------------------------------------------
# request bodies


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1), AfterValidator(_check_unicode)]
    max_new_tokens: MaxTokens = DEFAULT_MAX_NEW_TOKENS
    temperature: Temperature = 0.8
    top_p: TopP = 1.0
    top_k: int = Field(0, ge=0)
    seed: Seed = None
    stop: Stop = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What OpenAI's completions and chat bodies share, with vLLM's sampling extras. A field a client
    may send but this server cannot honour is refused by name (`unsupported`), never ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    user: str | None = None
    top_k: int = Field(-1, ge=-1)  # vLLM's "no cut" is -1 (0 is accepted too)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, le=100, allow_inf_nan=False)
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_STRINGS)] | None = None
    ignore_eos: bool = False

    def sampling(
        self, max_tokens: int, choice: int, logprobs: int | None, prompt_logprobs: int | None = None
    ):
        """The engine's settings for choice k of a prompt: the n choices differ only in their seed."""
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            min_p=self.min_p, seed=None if self.seed is None else self.seed + choice, stop=self.stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias or {}),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )  # fmt: skip

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def too_many(self, prompts: int) -> str | None:
        if self.n * prompts > MAX_BATCH_SIZE:
            return f"n x prompts must be at most {MAX_BATCH_SIZE}"
        return None


class CompletionRequest(SamplingFields):
    """OpenAI's /v1/completions body, as vLLM takes it: the prompt may be text or token ids."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=0), AfterValidator(_check_max_tokens)] = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts_not_empty(cls, value):
        prompts = _prompt_list(value)
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must not be empty")
        if len(prompts) > MAX_BATCH_SIZE:
            raise ValueError(f"at most {MAX_BATCH_SIZE} prompts per request")
        for p in prompts:
            if isinstance(p, str):
                _check_unicode(p)
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        return _prompt_list(self.prompt)

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix is not supported"
        if self.best_of not in (None, self.n):
            return "best_of is not supported"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens: 0 generates nothing; it is only for scoring the prompt, with echo"
        return self.too_many(len(self.prompts))


def _prompt_list(value) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists: one list of prompts."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # "name" and the like ride along unused

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, AfterValidator(_check_unicode)] | list[TextPart] | None = None

    def render(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": text}


class ChatRequest(SamplingFields):
    """OpenAI's /v1/chat/completions body (text only)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or MAX_NEW_TOKENS_CAP

    def unsupported(self) -> str | None:
        if self.tools or self.functions:
            return "tools are not supported"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format is not supported (only text)"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs: true"
        return self.too_many(1)


# ---------------------------------------------------------------------------------------------
# pure ASGI middlewares, so they guard every route, mounted apps included

FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


async def _send_error(
    send, status: int, payload: dict, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A JSON error response from a middleware, before any route runs."""
    await send(
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"connection", b"close"), *headers]}
    )  # fmt: skip
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


class ApiKeys:
    """With API keys set, every route but the health probes answers 401 in OpenAI's shape unless the
    request carries `Authorization: Bearer <key>` (pipeline/auth.py). Checked before the body is read."""

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if self.keys and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), None)
            if not authorized(header, self.keys):
                refused("unauthorized")
                why = "a missing API key" if header is None else "an invalid API key"
                payload = _error_body(f"{why}: send Authorization: Bearer <key>", "invalid_api_key")
                return await _send_error(send, 401, payload, ((b"www-authenticate", b"Bearer"),))
        await self.app(scope, receive, send)


def overloaded_body() -> dict:
    return _error_body(
        f"the server is at capacity ({MAX_QUEUE} requests waiting): retry after {RETRY_AFTER_SECONDS} s",
        "server_overloaded",
    )


OVERLOADED_HEADERS = ((b"retry-after", str(RETRY_AFTER_SECONDS).encode()),)


class Backpressure:
    """A generating request that finds serve.max_queue rows already waiting for the engine gets a 429
    with Retry-After at once (the /v1 routes also count a request's n choices before queueing any)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        full = ENGINE is not None and ENGINE.waiting() >= MAX_QUEUE
        if (
            full
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in GENERATING_PATHS
        ):
            return await _send_error(send, 429, overloaded_body(), OVERLOADED_HEADERS)
        await self.app(scope, receive, send)


class JsonOnly:
    """Refuse form bodies with a 415. Every route here takes JSON, but BentoML would parse a form into
    fields for /generate (and answer a malformed one with a 500)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            # every content-type header: BentoML reads the first, a dict() of them keeps the last
            types = [
                v.split(b";")[0].strip().lower()
                for k, v in scope.get("headers") or []
                if k == b"content-type"
            ]
            if any(t in FORM_TYPES for t in types):
                payload = _error_body(
                    "the request body must be JSON (application/json)", "unsupported_media_type"
                )
                refused("unsupported_media_type")
                return await _send_error(send, 415, payload)
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send)
        # Read the body now (at most max_bytes, so a chunked body cannot grow without bound), then
        # replay it; later receive() calls still report a client disconnect.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._reject(send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send) -> None:
        refused("too_large")
        payload = _error_body(f"request body larger than {self.max_bytes} bytes", "request_too_large")
        await _send_error(send, 413, payload)


def _error_body(message: str, code: str = "invalid_request", param: str | None = None) -> dict:
    """OpenAI's error shape, also used by /generate's own errors."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# the OpenAI-compatible app, mounted at /v1

openai_app = FastAPI(title="lmforge OpenAI-compatible API")


@openai_app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(_error_body("the request body is not valid JSON"), status_code=400)
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errors
    )
    return JSONResponse(_error_body(message or "invalid request", param=param), status_code=400)


@openai_app.exception_handler(EngineStopped)
async def _engine_stopped(request: Request, exc: EngineStopped) -> JSONResponse:
    return JSONResponse(_error_body(str(exc), "engine_stopped"), status_code=503)


@openai_app.exception_handler(GenerationError)
async def _cannot_generate(request: Request, exc: GenerationError) -> JSONResponse:
    return JSONResponse(_error_body(str(exc)), status_code=400)


async def _events(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, deltas: bool = True
) -> AsyncIterator[Any]:
    """The engine's events for one request, on this event loop; cancels the request if abandoned."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    request = engine.submit(
        prompt_ids, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), deltas
    )
    if METRICS is not None:
        METRICS.started(engine)
    done = None
    try:
        while True:
            event = await events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Completion):
                done = event
            yield event
            if done is not None:
                return
    finally:
        request.cancelled.set()
        if METRICS is not None:
            METRICS.finished(engine, request, done)


async def _unless_abandoned(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """The result of work(), or None if the client disconnects first: the work is then cancelled, which
    marks its requests cancelled, and the engine drops their rows before its next decode step. A client
    already gone is never queued."""
    if await request.is_disconnected():
        return None
    task = asyncio.ensure_future(work())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        task.cancel()  # a no-op once done; cancels the work if this handler is cancelled itself


@dataclass
class Job:
    """One choice of one prompt: what the engine decodes."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str = ""  # what echo shows


def _logprob(value: float) -> float:
    return max(value, -9999.0)  # vLLM's floor: JSON has no -inf


class CompletionShape:
    """Choices and stream chunks of /v1/completions; logprobs in OpenAI's legacy form (tokens,
    token_logprobs, top_logprobs, text_offset), the top including the chosen token, as vLLM does."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, engine: Engine, echo: bool, logprobs: int | None):
        self.engine, self.echo, self.logprobs = engine, echo, logprobs
        self.offsets: dict[int, int] = {}  # per streamed choice: characters sent so far

    def _logprobs(self, index: int, pairs) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self.offsets.get(index, 0)
        for token_id, scored in pairs:
            text = self.engine.token_text(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if scored is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_logprob(scored.logprob))
            top = {self.engine.token_text(t): _logprob(lp) for t, lp in scored.top[: self.logprobs]}
            top.setdefault(text, _logprob(scored.logprob))
            out["top_logprobs"].append(top)
        self.offsets[index] = offset
        return out

    def choice(self, job: Job, done: Completion) -> dict:
        text, pairs = done.text, list(zip(done.token_ids, done.logprobs or [], strict=False))
        if self.echo:
            text = job.prompt_text + text
            pairs = (
                list(zip(job.prompt_ids, done.prompt_logprobs or [None] * len(job.prompt_ids), strict=True))
                + pairs
            )
        logprobs = self._logprobs(job.index, pairs) if self.logprobs is not None else None
        return {"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": done.finish_reason}

    def opening(self, job: Job) -> list[dict]:
        if self.echo and self.logprobs is None:  # with logprobs, the prompt goes out once it is scored
            return [self._chunk(job, job.prompt_text)]
        return []

    def delta(self, job: Job, delta: Delta) -> list[dict]:
        if delta.prompt_logprobs is not None:
            if not self.echo:
                return []
            pairs = zip(job.prompt_ids, delta.prompt_logprobs, strict=True)
            return [self._chunk(job, job.prompt_text, self._logprobs(job.index, pairs))]
        logprobs = None
        if self.logprobs is not None:
            logprobs = self._logprobs(job.index, ((lp.token_id, lp) for lp in delta.logprobs))
        return [self._chunk(job, delta.text, logprobs)]

    def ending(self, job: Job, done: Completion) -> dict:
        return self._chunk(job, "", None, done.finish_reason)

    @staticmethod
    def _chunk(job: Job, text: str, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return {"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": finish}


class ChatShape:
    """Choices and stream chunks of /v1/chat/completions; logprobs in OpenAI's chat form."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, engine: Engine, logprobs: bool, top_logprobs: int):
        self.engine, self.logprobs, self.top = engine, logprobs, top_logprobs

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.engine.token_text(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode())}

    def _logprobs(self, scored) -> dict | None:
        if not self.logprobs:
            return None
        content = [
            self._entry(lp.token_id, lp.logprob)
            | {"top_logprobs": [self._entry(t, v) for t, v in lp.top[: self.top]]}
            for lp in scored
        ]
        return {"content": content}

    def choice(self, job: Job, done: Completion) -> dict:
        message = {"role": "assistant", "content": done.text}
        return {"index": job.index, "message": message, "logprobs": self._logprobs(done.logprobs or []),
                "finish_reason": done.finish_reason}  # fmt: skip

    def opening(self, job: Job) -> list[dict]:
        return [{"index": job.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]  # fmt: skip

    def delta(self, job: Job, delta: Delta) -> list[dict]:
        if not delta.text and not (self.logprobs and delta.logprobs):
            return []
        return [{"index": job.index, "delta": {"content": delta.text}, "logprobs": self._logprobs(delta.logprobs),
                 "finish_reason": None}]  # fmt: skip

    def ending(self, job: Job, done: Completion) -> dict:
        return {"index": job.index, "delta": {}, "logprobs": None, "finish_reason": done.finish_reason}


def bound_host() -> str | None:
    """The address this worker listens on: BentoML hands each worker its socket as `--fd N`."""
    if "--fd" not in sys.argv:
        return None
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockname()[0]


def refuse_exposure() -> None:
    """A worker whose socket other machines can reach starts only with API keys (or the explicit opt-out):
    this covers `bentoml serve` and the container, which bind 0.0.0.0 unless told otherwise."""
    host = bound_host()
    if host is None:
        return
    if problem := exposure_problem(host, API_KEYS):
        logger.error(problem)
        os.kill(os.getppid(), signal.SIGTERM)  # stop the whole server, not one worker circus would restart
        raise SystemExit(problem)
    if warning := unauthenticated_warning(host, API_KEYS):
        logger.warning(warning)


class ServingMetrics:
    """What an LLM dashboard reads, under vLLM's names and meanings (a vLLM Grafana dashboard works as it
    is): requests running and waiting, time to first token, time per output token, end-to-end latency,
    prompt and generated tokens, finished requests by reason; and lmforge's refusals by reason. Made in
    the worker, after BentoML has set up Prometheus' multiprocess directory."""

    LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                       7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip

    def __init__(self, model_name: str):
        from prometheus_client import Counter, Gauge, Histogram

        def one(kind, name: str, doc: str, **kwargs):
            return kind(name, doc, ["model_name"], **kwargs).labels(model_name=model_name)

        self.running = one(
            Gauge, "vllm:num_requests_running", "Requests in the batch", multiprocess_mode="livesum"
        )
        self.waiting = one(Gauge, "vllm:num_requests_waiting", "Requests waiting for the batch",
                           multiprocess_mode="livesum")  # fmt: skip
        self.prompt_tokens = one(Counter, "vllm:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = one(Counter, "vllm:generation_tokens", "Tokens generated")
        self.ttft = one(Histogram, "vllm:time_to_first_token_seconds", "Time to the first token",
                        buckets=self.LATENCY_BUCKETS)  # fmt: skip
        self.tpot = one(Histogram, "vllm:time_per_output_token_seconds", "Time per output token after the first",
                        buckets=self.LATENCY_BUCKETS)  # fmt: skip
        self.e2e = one(Histogram, "vllm:e2e_request_latency_seconds", "Request latency, queueing included",
                       buckets=self.LATENCY_BUCKETS)  # fmt: skip
        self.success = Counter("vllm:request_success", "Finished requests", ["model_name", "finished_reason"])
        self.refused = Counter(
            "lmforge_requests_refused", "Requests refused before the engine", ["model_name", "reason"]
        )
        self.model_name, self.in_flight = model_name, 0

    def started(self, engine: Engine) -> None:
        self.in_flight += 1
        self.count(engine)

    def finished(self, engine: Engine, request, done: Completion | None) -> None:
        self.in_flight -= 1
        self.count(engine)
        if done is None:
            return
        now = time.monotonic()
        self.prompt_tokens.inc(done.prompt_tokens)
        self.generation_tokens.inc(done.completion_tokens)
        self.e2e.observe(now - request.arrived)
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.arrived)
            if done.completion_tokens > 1:
                self.tpot.observe((now - request.first_token_at) / (done.completion_tokens - 1))
        self.success.labels(model_name=self.model_name, finished_reason=done.finish_reason).inc()

    def count(self, engine: Engine) -> None:
        waiting = min(engine.waiting(), self.in_flight)
        self.waiting.set(waiting)
        self.running.set(self.in_flight - waiting)

    def refuse(self, reason: str) -> None:
        self.refused.labels(model_name=self.model_name, reason=reason).inc()


METRICS: ServingMetrics | None = None  # this worker's, once its model is loaded


def refused(reason: str) -> None:
    if METRICS is not None:
        METRICS.refuse(reason)


ENGINE: Engine | None = None  # this worker's engine, once loaded: the back-pressure middleware reads it
READY = False  # set once this worker's model is loaded: GET /health answers 200 from then on


TRAFFIC = {"timeout": 300} | ({"concurrency": SERVE.concurrency} if SERVE.concurrency else {})


@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.service(name="lmforge", traffic=TRAFFIC, workers=SERVE.workers)
class LMForge:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        global ENGINE, METRICS, READY
        refuse_exposure()
        stored = self.model_ref
        self.tag = str(stored.tag)
        self.labels = dict(stored.info.labels)
        self.metadata = dict(stored.info.metadata)
        # prometheus_client is imported here, not at module level: BentoML sets up its multiprocess
        # directory after importing this module, and /metrics only sees metrics created after that.
        from prometheus_client import Histogram

        batch_sizes = Histogram(
            "lmforge_batch_size",
            "Requests admitted together, in one prefill, by service worker",
            ["worker"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        ).labels(worker=str(bentoml.server_context.worker_index))
        # the workers share the machine's cores rather than each taking all of them
        threads = max(1, (os.cpu_count() or 1) // SERVE.workers)
        self.engine = load_engine(
            stored.path, max_batch_size=MAX_BATCH_SIZE, threads=threads, on_batch=batch_sizes.observe
        )
        # the template the model was trained with (preprocess stores it in the tokenizer), and the tokens
        # that end its assistant turns: a reply stops there, as it learnt to
        self.chat_template = resolve_template(self.engine.tokenizer, CHAT_TEMPLATE)
        self.end_of_turn = end_of_turn_ids(self.engine.tokenizer, self.chat_template)
        self.created = int(time.time())
        METRICS = ServingMetrics(self.tag)
        ENGINE, READY = self.engine, True

    async def _prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        # Tokenizing a long prompt takes a while: off the event loop, so other requests keep flowing.
        # A short one takes microseconds, less than the hop to a thread.
        if not isinstance(prompt, str):
            ids = list(prompt)
        elif len(prompt) <= INLINE_ENCODE_CHARS:
            ids = self.engine.encode(prompt)
        else:
            ids = await asyncio.to_thread(self.engine.encode, prompt)
        self.engine.check(ids, params)
        return ids

    async def _complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        async for event in _events(self.engine, prompt_ids, params, deltas=False):
            if isinstance(event, Completion):
                return event
        raise RuntimeError("the engine ended a request without a result")

    async def _answer(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """_complete for BentoML's own routes: a stopped engine is a 503 there too, and a client that
        hangs up has its request dropped from the batch."""
        try:
            done = await _unless_abandoned(
                bentoml.Context().request, lambda: self._complete(prompt_ids, params)
            )
        except EngineStopped as exc:
            raise bentoml.exceptions.ServiceUnavailable(str(exc)) from None
        return Completion("", len(prompt_ids), 0, "abort") if done is None else done

    @bentoml.api(route="/generate")
    async def generate(self, request: GenerateRequest, /) -> dict:
        """Generate a continuation of the prompt."""
        params = SamplingParams(
            max_new_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p,
            top_k=request.top_k, seed=request.seed, stop=request.stop,
        )  # fmt: skip
        try:
            ids = await self._prepare(request.prompt, params)
        except GenerationError as exc:
            raise bentoml.exceptions.InvalidArgument(str(exc)) from None
        done = await self._answer(ids, params)
        return {
            "text": done.text,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "model": self.tag,
        }

    @bentoml.api(route="/predict")
    async def predict(
        self, text: Annotated[str, Field(min_length=1), AfterValidator(_check_unicode)]
    ) -> dict:
        """The minimal form: {"text": ...} -> {"result": ...}, with /generate's defaults."""
        params = SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.8)
        try:
            ids = await self._prepare(text, params)
        except GenerationError as exc:
            raise bentoml.exceptions.InvalidArgument(str(exc)) from None
        return {"result": (await self._answer(ids, params)).text}

    @bentoml.api(route="/tokenize")
    async def tokenize(
        self,
        prompt: Annotated[str, AfterValidator(_check_unicode)] | None = None,
        model: str | None = None,
        add_special_tokens: bool | None = None,
        messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)] | None = None,
        add_generation_prompt: bool = True,
    ) -> dict:
        """vLLM's shape: {"count", "max_model_len", "tokens"}, of a prompt, or as vLLM does, of chat
        messages rendered the way /v1/chat/completions renders them."""
        if (prompt is None) == (messages is None):
            raise bentoml.exceptions.InvalidArgument("give either prompt or messages")
        if messages is not None:
            try:
                prompt = self._render_chat(messages, add_generation_prompt)
            except GenerationError as exc:
                raise bentoml.exceptions.InvalidArgument(str(exc)) from None
        if add_special_tokens is None:  # vLLM's defaults: a chat template writes its own special tokens
            add_special_tokens = messages is None
        if len(prompt) > self.engine.max_prompt_chars:
            raise bentoml.exceptions.InvalidArgument(
                f"prompt: {len(prompt):,} characters cannot fit the model's context of {self.engine.context} tokens"
            )
        tokens = self.engine.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        return {"count": len(tokens), "max_model_len": self.engine.context, "tokens": tokens}

    @bentoml.api(route="/detokenize")
    async def detokenize(
        self, tokens: Annotated[list[int], Field(max_length=1 << 16)], model: str | None = None
    ) -> dict:
        """vLLM's shape: {"prompt"}; an id outside the vocabulary is a 400 that names it."""
        vocab = len(self.engine.tokenizer)
        if bad := [t for t in tokens if not 0 <= t < vocab]:
            raise bentoml.exceptions.InvalidArgument(
                f"tokens: {bad[0]} is not in the vocabulary (0..{vocab - 1})"
            )
        return {"prompt": self.engine.tokenizer.decode(tokens)}

    @openai_app.get("/models")
    async def models(self) -> dict:
        card = {
            "id": self.tag, "object": "model", "created": self.created, "owned_by": "lmforge",
            "max_model_len": self.engine.context,
        }  # fmt: skip
        return {"object": "list", "data": [card | {"lineage": self.labels}]}

    @openai_app.post("/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        if problem := body.unsupported():
            return JSONResponse(_error_body(problem), status_code=400)
        # echo with logprobs scores the prompt, in the same prefill as the generation; echo with
        # max_tokens 0 and no logprobs is a scoring request too (it only shows the prompt back)
        prompt_logprobs = None
        if body.echo and (body.logprobs is not None or body.max_tokens == 0):
            prompt_logprobs = body.logprobs or 0
        jobs = []
        for p, prompt in enumerate(body.prompts):
            ids = None  # one prompt, tokenized once for its n choices
            for k in range(body.n):
                params = body.sampling(body.max_tokens, k, body.logprobs, prompt_logprobs)
                ids = ids or await self._prepare(prompt, params)
                text = (
                    prompt
                    if isinstance(prompt, str)
                    else self.engine.tokenizer.decode(ids)
                    if body.echo
                    else ""
                )
                jobs.append(Job(p * body.n + k, ids, params, text))
        return await self._respond(
            jobs, CompletionShape(self.engine, body.echo, body.logprobs), body, request
        )

    @openai_app.post("/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request):
        if problem := body.unsupported():
            return JSONResponse(_error_body(problem), status_code=400)
        prompt = self._render_chat(body.messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        jobs = []
        for k in range(body.n):
            params = body.sampling(body.budget, k, logprobs)
            if not body.ignore_eos:
                params.stop_token_ids = list(dict.fromkeys([*params.stop_token_ids, *self.end_of_turn]))
            ids = jobs[0].prompt_ids if jobs else await self._prepare(prompt, params)
            jobs.append(Job(k, ids, params))
        shape = ChatShape(self.engine, body.logprobs, body.top_logprobs or 0)
        return await self._respond(jobs, shape, body, request)

    def _render_chat(self, messages: list[ChatMessage], generation_prompt: bool = True) -> str:
        """The messages through the chat template, as preprocess rendered the model's training data."""
        try:
            return render_text(self.engine.tokenizer, self.chat_template, [m.render() for m in messages],
                               generation_prompt)  # fmt: skip
        except ChatError as exc:
            raise GenerationError(f"messages: {exc}") from None

    async def _respond(self, jobs: list[Job], shape, body: SamplingFields, request: Request):
        if self.engine.waiting() + len(jobs) > MAX_QUEUE:
            refused("overloaded")
            return JSONResponse(overloaded_body(), status_code=429,
                                headers={k.decode(): v.decode() for k, v in OVERLOADED_HEADERS})  # fmt: skip
        head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "object": shape.object,
                "created": int(time.time()), "model": self.tag}  # fmt: skip
        if body.stream:
            return StreamingResponse(
                self._stream(jobs, shape, head | {"object": shape.chunk_object}, body.include_usage, body.n),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )

        def decode_all():
            return asyncio.gather(*(self._complete(job.prompt_ids, job.params) for job in jobs))

        if (results := await _unless_abandoned(request, decode_all)) is None:
            return JSONResponse(
                _error_body("the client closed the request", "client_closed"), status_code=499
            )
        choices = [shape.choice(job, done) for job, done in zip(jobs, results, strict=True)]
        # a JSONResponse, not a dict: FastAPI's jsonable_encoder walks every logprob entry of a dict
        return JSONResponse(head | {"choices": choices, "usage": _usage(results, body.n)})

    async def _stream(
        self, jobs: list[Job], shape, head: dict, include_usage: bool, n: int
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, every choice interleaved, then [DONE]."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(job: Job) -> None:
            try:
                async for event in _events(self.engine, job.prompt_ids, job.params):
                    await merged.put((job, event))
            except Exception as exc:  # noqa: BLE001 - reported in the stream, not as a dropped socket
                await merged.put((job, exc))

        for job in jobs:
            for choice in shape.opening(job):
                yield _sse(head | {"choices": [choice]})
        tasks = [asyncio.create_task(pump(job)) for job in jobs]
        finished: list[Completion] = []
        try:
            while len(finished) < len(jobs):
                job, event = await merged.get()
                if isinstance(event, BaseException):
                    yield _sse(_error_body(f"generation failed: {event}", "generation_error"))
                    finished.append(Completion("", 0, 0, "error"))
                elif isinstance(event, Completion):
                    finished.append(event)
                    yield _sse(head | {"choices": [shape.ending(job, event)]})
                else:
                    for choice in shape.delta(job, event):
                        yield _sse(head | {"choices": [choice]})
            if include_usage:
                yield _sse(head | {"choices": [], "usage": _usage(finished, n)})
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()


def _usage(results: list[Completion], n: int) -> dict:
    """Token counts as OpenAI reports them: each prompt once, however many of its n choices there are."""
    prompt = sum(r.prompt_tokens for r in results) // n
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, allow_nan=False)}\n\n"


class Health:
    """vLLM's GET /health: 200 with an empty body once the model is loaded, 503 before. If the engine's
    decoding thread has died, /health, /livez and /readyz all answer 503, so that an orchestrator takes
    the worker out of service and replaces it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        probe = scope["type"] == "http" and scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD")
        stopped = ENGINE is not None and not ENGINE.alive
        if probe and (scope["path"] == "/health" or stopped):
            await send({"type": "http.response.start", "status": 200 if READY and not stopped else 503,
                        "headers": [(b"content-length", b"0")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


# the last added runs first: health probes, then keys, then the queue, then the body's type and size
LMForge.add_asgi_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
LMForge.add_asgi_middleware(JsonOnly)
LMForge.add_asgi_middleware(Backpressure)
LMForge.add_asgi_middleware(ApiKeys, keys=API_KEYS)
LMForge.add_asgi_middleware(Health)
