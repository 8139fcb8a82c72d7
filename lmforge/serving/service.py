"""The Bento service: `POST /generate`; OpenAI-compatible `POST /v1/completions` (logprobs, echo scoring,
token-id prompts), `POST /v1/chat/completions` and `GET /v1/models`, answered in vLLM's shapes; vLLM's
`POST /tokenize`, `/detokenize` and `GET /health`; and the minimal `POST /predict`.

BentoML 1.4 provides /readyz, /livez and Prometheus /metrics. Each worker loads the model once (from
the BentoML model store, safetensors only) into a batching Engine (engine.py), so concurrent requests
share forward passes. Bad input gets a 4xx with a message; never a 5xx. With `lmforge serve --follow`,
a worker switches to each new champion without a restart (models.py).

The serving limits come from the Bento's build arguments (arguments.py), so a Bento carries its own
settings: `bentoml serve lmforge:<version>` needs nothing else from the workspace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import bentoml
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, Field

from lmforge.serving.arguments import API_KEYS, CHAT_TEMPLATE, FOLLOW_FILE, MODEL_TAG, SERVE
from lmforge.serving.auth import refuse_exposure
from lmforge.serving.chat_template import ChatError, end_of_turn_ids, render_text, resolve_template
from lmforge.serving.engine import EngineStopped, GenerationError, load_engine
from lmforge.serving.metrics import ServingMetrics
from lmforge.serving.middleware import (
    RETRY_HEADERS,
    ApiKeys,
    Backpressure,
    BodyLimit,
    Health,
    JsonOnly,
    overloaded_body,
)
from lmforge.serving.models import Lease, Served, ServedModels
from lmforge.serving.openai_app import openai_api
from lmforge.serving.protocol import (
    DEFAULT_TEMPERATURE,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    SamplingFields,
    check_unicode,
    error_body,
)
from lmforge.serving.responses import ChatShape, CompletionShape, Job, sse, usage
from lmforge.serving.sampling import Completion, SamplingParams
from lmforge.serving.streaming import engine_events, unless_abandoned

logger = logging.getLogger("bentoml.lmforge")  # BentoML shows its own loggers at INFO
INLINE_ENCODE_CHARS = 4096

MODELS = ServedModels()  # what this worker serves; the middlewares read it too
METRICS: ServingMetrics | None = None  # this worker's, once its model is loaded


def refused(reason: str) -> None:
    if METRICS is not None:
        METRICS.refuse(MODELS.current.tag if MODELS.current else "", reason)


openai_app = openai_api()  # mounted at /v1


def load_served(stored, chat_template: str | None) -> Served:
    """A model from the BentoML store, loaded into an engine of its own."""
    threads = max(1, (os.cpu_count() or 1) // SERVE.workers)  # the workers share the machine's cores
    engine = load_engine(stored.path, max_batch_size=SERVE.max_batch_size, threads=threads,
                         on_batch=METRICS.batch_size.observe if METRICS else None)  # fmt: skip
    # the template the model was trained with (preprocess stores it in the tokenizer), and the tokens that
    # end its assistant turns: a reply stops there, as it learnt to
    template = resolve_template(engine.tokenizer, chat_template)
    return Served(str(stored.tag), dict(stored.info.labels), engine, template,
                  end_of_turn_ids(engine.tokenizer, template))  # fmt: skip


def load_followed(wanted: dict) -> Served:
    """The model the follow file names (written by `lmforge serve --follow`), with its Bento's template."""
    return load_served(bentoml.models.get(wanted["model_tag"]), wanted.get("chat_template"))


class Overloaded(Exception):
    """The queue is full (serve.max_queue): the request is refused with a 429."""


def overloaded() -> dict:
    """The 429 with Retry-After of BentoML's own routes, which the Backpressure middleware would have
    sent had the queue been full a moment earlier."""
    ctx = bentoml.Context()
    ctx.response.status_code = 429
    ctx.response.metadata.update(RETRY_HEADERS)
    return overloaded_body(SERVE.max_queue)


TRAFFIC = {"timeout": 300} | ({"concurrency": SERVE.concurrency} if SERVE.concurrency else {})


@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.service(name="lmforge", traffic=TRAFFIC, workers=SERVE.workers)
class LMForge:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        global METRICS
        refuse_exposure(API_KEYS)
        METRICS = ServingMetrics(worker=str(bentoml.server_context.worker_index))
        MODELS.switch(load_served(self.model_ref, CHAT_TEMPLATE))
        if FOLLOW_FILE:
            MODELS.follow(Path(FOLLOW_FILE), load_followed)

    @staticmethod
    async def _prepare(served: Served, prompt: str | list[int], params: SamplingParams) -> list[int]:
        # Tokenizing a long prompt takes a while: off the event loop, so other requests keep flowing.
        # A short one takes microseconds, less than the hop to a thread.
        if not isinstance(prompt, str):
            ids = list(prompt)
        elif len(prompt) <= INLINE_ENCODE_CHARS:
            ids = served.engine.encode(prompt)
        else:
            ids = await asyncio.to_thread(served.engine.encode, prompt)
        served.engine.check(ids, params)
        return ids

    @staticmethod
    async def _complete(lease: Lease, prompt_ids: list[int], params: SamplingParams) -> Completion:
        async for event in engine_events(lease, prompt_ids, params, METRICS, deltas=False):
            if isinstance(event, Completion):
                return event
        raise RuntimeError("the engine ended a request without a result")

    async def _answer(self, prompt: str, params: SamplingParams) -> tuple[Completion, str]:
        """A completion for BentoML's own routes, and the model that made it: a bad prompt is a 400, a
        stopped engine a 503, a full queue Overloaded, and a client that hangs up has its request dropped
        from the batch."""
        with MODELS.lease() as lease:
            served = lease.served
            if not MODELS.admit(lease, 1, SERVE.max_queue):
                refused("overloaded")
                raise Overloaded
            try:
                ids = await self._prepare(served, prompt, params)
                done = await unless_abandoned(
                    bentoml.Context().request, lambda: self._complete(lease, ids, params)
                )
            except GenerationError as exc:
                raise bentoml.exceptions.InvalidArgument(str(exc)) from None
            except EngineStopped as exc:
                raise bentoml.exceptions.ServiceUnavailable(str(exc)) from None
            return (Completion("", len(ids), 0, "abort") if done is None else done), served.tag

    @bentoml.api(route="/generate")
    async def generate(self, request: GenerateRequest, /) -> dict:
        """Generate a continuation of the prompt."""
        params = SamplingParams(
            max_new_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p,
            top_k=request.top_k, seed=request.seed, stop=request.stop,
        )  # fmt: skip
        try:
            done, model = await self._answer(request.prompt, params)
        except Overloaded:
            return overloaded()
        return {
            "text": done.text,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "model": model,
        }

    @bentoml.api(route="/predict")
    async def predict(self, text: Annotated[str, Field(min_length=1), AfterValidator(check_unicode)]) -> dict:
        """The minimal form: {"text": ...} -> {"result": ...}, with /generate's defaults."""
        params = SamplingParams(max_new_tokens=SERVE.default_max_new_tokens, temperature=DEFAULT_TEMPERATURE)
        try:
            done, _ = await self._answer(text, params)
        except Overloaded:
            return overloaded()
        return {"result": done.text}

    @bentoml.api(route="/tokenize")
    async def tokenize(
        self,
        prompt: Annotated[str, AfterValidator(check_unicode)] | None = None,
        model: str | None = None,
        add_special_tokens: bool | None = None,
        messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)] | None = None,
        add_generation_prompt: bool = True,
    ) -> dict:
        """vLLM's shape: {"count", "max_model_len", "tokens"}, of a prompt, or as vLLM does, of chat
        messages rendered the way /v1/chat/completions renders them."""
        if (prompt is None) == (messages is None):
            raise bentoml.exceptions.InvalidArgument("give either prompt or messages")
        with MODELS.lease() as lease:
            served = lease.served
            if messages is not None:
                try:
                    prompt = render_chat(served, messages, add_generation_prompt)
                except GenerationError as exc:
                    raise bentoml.exceptions.InvalidArgument(str(exc)) from None
            if add_special_tokens is None:  # vLLM's defaults: a chat template writes its own special tokens
                add_special_tokens = messages is None
            engine = served.engine
            try:
                tokens = engine.encode(prompt, add_special_tokens)
            except GenerationError as exc:
                raise bentoml.exceptions.InvalidArgument(str(exc)) from None
            return {"count": len(tokens), "max_model_len": engine.context, "tokens": tokens}

    @bentoml.api(route="/detokenize")
    async def detokenize(
        self, tokens: Annotated[list[int], Field(max_length=1 << 16)], model: str | None = None
    ) -> dict:
        """vLLM's shape: {"prompt"}; an id outside the vocabulary is a 400 that names it."""
        with MODELS.lease() as lease:
            engine = lease.served.engine
            try:
                engine.check_ids("tokens", tokens)
            except GenerationError as exc:
                raise bentoml.exceptions.InvalidArgument(str(exc)) from None
            return {"prompt": engine.tokenizer.decode(tokens)}

    @openai_app.get("/models")
    async def models(self) -> dict:
        """The model that answers new requests (after a switch, the new champion)."""
        served = MODELS.current
        card = {
            "id": served.tag, "object": "model", "created": served.created, "owned_by": "lmforge",
            "max_model_len": served.engine.context,
        }  # fmt: skip
        return {"object": "list", "data": [card | {"lineage": served.labels}]}

    @openai_app.post("/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        if problem := body.unsupported():
            return JSONResponse(error_body(problem), status_code=400)
        # echo with logprobs scores the prompt, in the same prefill as the generation; echo with
        # max_tokens 0 and no logprobs is a scoring request too (it only shows the prompt back)
        prompt_logprobs = None
        if body.echo and (body.logprobs is not None or body.max_tokens == 0):
            prompt_logprobs = body.logprobs or 0
        with MODELS.lease() as lease:
            served, jobs = lease.served, []
            for p, prompt in enumerate(body.prompts):
                ids = None  # one prompt, tokenized once for its n choices
                for k in range(body.n):
                    params = body.sampling(body.max_tokens, k, body.logprobs, prompt_logprobs)
                    ids = ids or await self._prepare(served, prompt, params)
                    text = (
                        prompt
                        if isinstance(prompt, str)
                        else served.engine.tokenizer.decode(ids)
                        if body.echo
                        else ""
                    )
                    jobs.append(Job(p * body.n + k, ids, params, text))
            shape = CompletionShape(served.engine, body.echo, body.logprobs)
            return await self._respond(lease, jobs, shape, body, request)

    @openai_app.post("/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request):
        if problem := body.unsupported():
            return JSONResponse(error_body(problem), status_code=400)
        with MODELS.lease() as lease:
            served, jobs = lease.served, []
            prompt = render_chat(served, body.messages)
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            for k in range(body.n):
                params = body.sampling(body.budget, k, logprobs)
                if not body.ignore_eos:
                    params.stop_token_ids = list(dict.fromkeys([*params.stop_token_ids, *served.end_of_turn]))
                ids = jobs[0].prompt_ids if jobs else await self._prepare(served, prompt, params)
                jobs.append(Job(k, ids, params))
            shape = ChatShape(served.engine, body.logprobs, body.top_logprobs or 0)
            return await self._respond(lease, jobs, shape, body, request)

    async def _respond(self, lease: Lease, jobs: list[Job], shape, body: SamplingFields, request: Request):
        """The answer to a /v1 request. A stream holds a lease of its own, which it returns when it ends."""
        served, lease = lease.served, lease.another() if body.stream else lease
        if not MODELS.admit(lease, len(jobs), SERVE.max_queue):
            lease.release()
            refused("overloaded")
            return JSONResponse(overloaded_body(SERVE.max_queue), status_code=429, headers=RETRY_HEADERS)
        head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "object": shape.object,
                "created": int(time.time()), "model": served.tag}  # fmt: skip
        if body.stream:
            return StreamingResponse(
                self._stream(
                    lease.another(),
                    jobs,
                    shape,
                    head | {"object": shape.chunk_object},
                    body.include_usage,
                    body.n,
                ),  # fmt: skip
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )

        def decode_all():
            return asyncio.gather(*(self._complete(lease, job.prompt_ids, job.params) for job in jobs))

        if (results := await unless_abandoned(request, decode_all)) is None:
            return JSONResponse(error_body("the client closed the request", "client_closed"), status_code=499)
        choices = [shape.choice(job, done) for job, done in zip(jobs, results, strict=True)]
        # a JSONResponse, not a dict: FastAPI's jsonable_encoder walks every logprob entry of a dict
        return JSONResponse(head | {"choices": choices, "usage": usage(results, body.n)})

    async def _stream(
        self, lease: Lease, jobs: list[Job], shape, head: dict, include_usage: bool, n: int
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, every choice interleaved, then [DONE]."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(job: Job) -> None:
            try:
                async for event in engine_events(lease, job.prompt_ids, job.params, METRICS):
                    await merged.put((job, event))
            except Exception as exc:  # noqa: BLE001 - reported in the stream, not as a dropped socket
                await merged.put((job, exc))

        tasks = []
        try:
            for job in jobs:
                for choice in shape.opening(job):
                    yield sse(head | {"choices": [choice]})
            tasks = [asyncio.create_task(pump(job)) for job in jobs]
            finished: list[Completion] = []
            while len(finished) < len(jobs):
                job, event = await merged.get()
                if isinstance(event, BaseException):
                    yield sse(error_body(f"generation failed: {event}", "generation_error"))
                    finished.append(Completion("", 0, 0, "error"))
                elif isinstance(event, Completion):
                    finished.append(event)
                    yield sse(head | {"choices": [shape.ending(job, event)]})
                else:
                    for choice in shape.delta(job, event):
                        yield sse(head | {"choices": [choice]})
            if include_usage:
                yield sse(head | {"choices": [], "usage": usage(finished, n)})
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            lease.release()


def render_chat(served: Served, messages: list[ChatMessage], generation_prompt: bool = True) -> str:
    """The messages through the model's chat template, as preprocess rendered its training data."""
    try:
        return render_text(served.engine.tokenizer, served.chat_template, [m.render() for m in messages],
                           generation_prompt)  # fmt: skip
    except ChatError as exc:
        raise GenerationError(f"messages: {exc}") from None


# the last added runs first: health probes, then keys, then the queue, then the body's type and size
LMForge.add_asgi_middleware(BodyLimit, max_bytes=SERVE.max_body_bytes, refuse=refused)
LMForge.add_asgi_middleware(JsonOnly, refuse=refused)
LMForge.add_asgi_middleware(Backpressure, queue=MODELS, max_queue=SERVE.max_queue, refuse=refused)
LMForge.add_asgi_middleware(ApiKeys, keys=API_KEYS, refuse=refused)
LMForge.add_asgi_middleware(Health, models=MODELS)
