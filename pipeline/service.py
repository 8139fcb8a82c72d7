"""The Bento service: `POST /generate`, OpenAI-compatible `POST /v1/completions` and `GET /v1/models`,
plus vLLM's `POST /tokenize` and `/detokenize`, and the minimal `POST /predict`.

BentoML 1.4 provides /readyz, /livez and Prometheus /metrics. Each worker loads the model once (from
the BentoML model store, safetensors only) into a batching Engine (pipeline/generation.py), so
concurrent requests share forward passes. Bad input gets a 4xx with a message; never a 5xx.

The serving limits come from the Bento's build arguments (see pipeline/package.py), so a Bento carries
its own settings: `bentoml serve lmforge:<version>` needs nothing else from the workspace.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from pipeline.generation import Completion, Engine, GenerationError, SamplingParams, load_engine

ARGS = bentoml.use_arguments()
MODEL_TAG = str(getattr(ARGS, "model_tag", None) or os.environ.get("LMFORGE_MODEL_TAG", "lmforge-lm:latest"))
MAX_NEW_TOKENS_CAP = int(getattr(ARGS, "max_new_tokens_cap", 256))
DEFAULT_MAX_NEW_TOKENS = int(getattr(ARGS, "default_max_new_tokens", 64))
MAX_BATCH_SIZE = int(getattr(ARGS, "max_batch_size", 16))
MAX_BODY_BYTES = int(getattr(ARGS, "max_body_bytes", 1 << 20))
MAX_STOP_STRINGS = 4
INLINE_ENCODE_CHARS = 4096

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


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


def _check_max_tokens(value: int) -> int:
    if value > MAX_NEW_TOKENS_CAP:
        raise ValueError(f"at most {MAX_NEW_TOKENS_CAP} new tokens per request (got {value})")
    return value


MaxTokens = Annotated[int, Field(ge=1), AfterValidator(_check_max_tokens)]
Stop = Annotated[str | list[str] | None, AfterValidator(_check_stop)]

# ---------------------------------------------------------------------------------------------
# request bodies


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1), AfterValidator(_check_unicode)]
    max_new_tokens: MaxTokens = DEFAULT_MAX_NEW_TOKENS
    temperature: Temperature = 0.8
    top_p: TopP = 1.0
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Stop = None


class CompletionRequest(BaseModel):
    """OpenAI's /v1/completions body. Fields a client may send but this server cannot honour are
    rejected by name rather than silently ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: MaxTokens = 16
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Stop = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    user: str | None = None
    # vLLM's sampling extras: top_k works; the others are refused by name until the engine has them
    top_k: int = Field(-1, ge=-1)  # vLLM's "no cut" is -1 (0 is accepted too)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts_not_empty(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must not be empty")
        if len(prompts) > 16:
            raise ValueError("at most 16 prompts per request")
        for p in prompts:
            _check_unicode(p)
        return value

    def unsupported(self) -> str | None:
        if self.logprobs:
            return "logprobs is not supported"
        if self.suffix:
            return "suffix is not supported"
        if self.best_of not in (None, self.n):
            return "best_of is not supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported"
        for name, off in (("min_p", 0.0), ("repetition_penalty", 1.0), ("logit_bias", None),
                          ("stop_token_ids", None), ("ignore_eos", False)):  # fmt: skip
            if getattr(self, name) not in (off, {}, []):
                return f"{name} is not supported"
        if self.n * (1 if isinstance(self.prompt, str) else len(self.prompt)) > MAX_BATCH_SIZE:
            return f"n x prompts must be at most {MAX_BATCH_SIZE}"
        return None


# ---------------------------------------------------------------------------------------------
# pure ASGI middlewares, so they guard every route, mounted apps included

FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


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
                await send(
                    {"type": "http.response.start", "status": 415,
                     "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]}
                )  # fmt: skip
                await send({"type": "http.response.body", "body": json.dumps(payload).encode()})
                return
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
        payload = _error_body(f"request body larger than {self.max_bytes} bytes", "request_too_large")
        await send(
            {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]}
        )  # fmt: skip
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


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
    try:
        while True:
            event = await events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Completion):
                return
    finally:
        request.cancelled.set()


@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.service(name="lmforge", traffic={"timeout": 300}, workers=1)
class LMForge:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        stored = self.model_ref
        self.tag = str(stored.tag)
        self.labels = dict(stored.info.labels)
        self.metadata = dict(stored.info.metadata)
        # prometheus_client is imported here, not at module level: BentoML sets up its multiprocess
        # directory after importing this module, and /metrics only sees metrics created after that.
        from prometheus_client import Histogram

        batch_sizes = Histogram(
            "lmforge_batch_size",
            "Requests admitted together, in one prefill",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.engine = load_engine(
            stored.path, max_batch_size=MAX_BATCH_SIZE, threads=os.cpu_count(), on_batch=batch_sizes.observe
        )
        self.created = int(time.time())

    async def _prepare(self, prompt: str, params: SamplingParams) -> list[int]:
        # Tokenizing a long prompt takes a while: off the event loop, so other requests keep flowing.
        # A short one takes microseconds, less than the hop to a thread.
        if len(prompt) <= INLINE_ENCODE_CHARS:
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
        done = await self._complete(ids, params)
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
        return {"result": (await self._complete(ids, params)).text}

    @bentoml.api(route="/tokenize")
    async def tokenize(
        self,
        prompt: Annotated[str, AfterValidator(_check_unicode)],
        model: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict:
        """vLLM's shape: {"count", "max_model_len", "tokens"}."""
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
    async def completions(self, body: CompletionRequest):
        if problem := body.unsupported():
            return JSONResponse(_error_body(problem), status_code=400)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        jobs = []  # (choice index, prompt, prompt ids, params)
        for p, prompt in enumerate(prompts):
            ids = None  # one prompt, tokenized once for its n choices (they differ only in the seed)
            for k in range(body.n):
                params = SamplingParams(
                    max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                    top_k=max(body.top_k, 0), seed=None if body.seed is None else body.seed + k,
                    stop=body.stop,
                )  # fmt: skip
                ids = ids or await self._prepare(prompt, params)
                jobs.append((p * body.n + k, prompt, ids, params))
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        head = {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.tag,
        }
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(jobs, head, body.echo, include_usage, body.n),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        results = await asyncio.gather(*(self._complete(ids, params) for _, _, ids, params in jobs))
        choices = [
            {"index": index, "text": (prompt if body.echo else "") + done.text, "logprobs": None,
             "finish_reason": done.finish_reason}
            for (index, prompt, _, _), done in zip(jobs, results, strict=True)
        ]  # fmt: skip
        return head | {"choices": choices, "usage": _usage(results, body.n)}

    async def _stream(self, jobs, head: dict, echo: bool, include_usage: bool, n: int) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, every choice interleaved, then [DONE]."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, prompt: str, ids: list[int], params: SamplingParams) -> None:
            try:
                if echo:
                    await merged.put((index, prompt))
                async for event in _events(self.engine, ids, params):
                    await merged.put((index, event))
            except Exception as exc:  # noqa: BLE001 - reported in the stream, not as a dropped socket
                await merged.put((index, exc))

        tasks = [asyncio.create_task(pump(*job)) for job in jobs]
        finished: list[Completion] = []
        try:
            while len(finished) < len(jobs):
                index, event = await merged.get()
                if isinstance(event, BaseException):
                    yield _sse(_error_body(f"generation failed: {event}", "generation_error"))
                    finished.append(Completion("", 0, 0, "error"))
                    continue
                if isinstance(event, Completion):
                    finished.append(event)
                    choice = {
                        "index": index,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": event.finish_reason,
                    }
                else:
                    choice = {"index": index, "text": event, "logprobs": None, "finish_reason": None}
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


LMForge.add_asgi_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
LMForge.add_asgi_middleware(JsonOnly)
