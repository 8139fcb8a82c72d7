"""The Bento service on vLLM (`serve.engine: vllm`): vLLM's OpenAI server runs the model, and BentoML's
proxy forwards to it every route this service does not answer itself (`/v1/...`, `/tokenize`,
`/detokenize`, `/health`). This service adds lmforge's `/generate` and `/predict`, and puts the same
guards in front of everything: API keys, the queue bound, the body's size, JSON only.

BentoML starts the command below in the first worker, waits until its /health answers, and stops it
with the server. vLLM's Prometheus metrics are appended to BentoML's on /metrics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import httpx
from pydantic import AfterValidator, Field

from lmforge.serving.arguments import API_KEYS, MODEL_TAG, SERVE
from lmforge.serving.auth import refuse_exposure
from lmforge.serving.metrics import refusals
from lmforge.serving.middleware import ApiKeys, Backpressure, BodyLimit, CountInFlight, InFlight, JsonOnly
from lmforge.serving.protocol import DEFAULT_TEMPERATURE, GenerateRequest, check_unicode
from lmforge.serving.vllm_server import api_server_command, api_server_env

VLLM_PORT = int(os.environ.get("LMFORGE_VLLM_PORT", "8000"))  # where vLLM listens, on loopback only
TRAFFIC = {"timeout": 300} | ({"concurrency": SERVE.concurrency} if SERVE.concurrency else {})
# requests beyond vLLM's batch wait in it: serve.max_queue bounds them
IN_FLIGHT = InFlight(running=SERVE.vllm.max_num_seqs)
REFUSED = None  # the refusals counter, made in the worker (after BentoML set up Prometheus)


def refused(reason: str) -> None:
    if REFUSED is not None:
        REFUSED.labels(MODEL_TAG, reason).inc()


@bentoml.service(
    name="lmforge",
    traffic=TRAFFIC,
    endpoints={"livez": "/health", "readyz": "/health"},
    http={"proxy_port": VLLM_PORT},
    envs=[{"name": name, "value": value} for name, value in api_server_env(SERVE).items()],
)
class LMForgeVLLM:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        global REFUSED
        refuse_exposure(API_KEYS)
        REFUSED = refusals()

    def __command__(self) -> list[str]:
        return api_server_command(Path(self.model_ref.path), str(self.model_ref.tag), VLLM_PORT, SERVE)

    @property
    def vllm(self) -> httpx.AsyncClient:
        return LMForgeVLLM.context.state["client"]

    async def _complete(self, prompt: str, max_tokens: int, **sampling: Any) -> dict:
        response = await self.vllm.post("/v1/completions", json={
            "model": str(self.model_ref.tag), "prompt": prompt, "max_tokens": max_tokens, **sampling,
        })  # fmt: skip
        body = response.json()
        if response.status_code != 200:
            raise bentoml.exceptions.InvalidArgument(body.get("error", {}).get("message", response.text))
        return body

    @bentoml.api(route="/generate")
    async def generate(self, request: GenerateRequest, /) -> dict:
        """Generate a continuation of the prompt (the builtin engine's shape)."""
        sampling = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k or -1,
                    "seed": request.seed, "stop": request.stop}  # fmt: skip
        body = await self._complete(request.prompt, request.max_new_tokens, **sampling)
        choice = body["choices"][0]
        return {
            "text": choice["text"],
            "finish_reason": choice["finish_reason"],
            "prompt_tokens": body["usage"]["prompt_tokens"],
            "completion_tokens": body["usage"]["completion_tokens"],
            "model": body["model"],
        }

    @bentoml.api(route="/predict")
    async def predict(self, text: Annotated[str, Field(min_length=1), AfterValidator(check_unicode)]) -> dict:
        """The minimal form: {"text": ...} -> {"result": ...}, with /generate's defaults."""
        body = await self._complete(text, SERVE.default_max_new_tokens, temperature=DEFAULT_TEMPERATURE)
        return {"result": body["choices"][0]["text"]}

    async def __metrics__(self, content: str) -> str:
        response = await self.vllm.get("/metrics")
        return content + "\n" + response.text


# the last added runs first: keys, the queue bound, then the body's type and size
LMForgeVLLM.add_asgi_middleware(BodyLimit, max_bytes=SERVE.max_body_bytes, refuse=refused)
LMForgeVLLM.add_asgi_middleware(JsonOnly, refuse=refused)
LMForgeVLLM.add_asgi_middleware(CountInFlight, in_flight=IN_FLIGHT)
LMForgeVLLM.add_asgi_middleware(Backpressure, queue=IN_FLIGHT, max_queue=SERVE.max_queue, refuse=refused)
LMForgeVLLM.add_asgi_middleware(ApiKeys, keys=API_KEYS, refuse=refused)
