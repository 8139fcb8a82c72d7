"""What an LLM dashboard reads from /metrics, per model, under vLLM's names and meanings (a vLLM Grafana
dashboard works as it is): requests running and waiting, time to first token, time per output token,
end-to-end latency, prompt and generated tokens, finished requests by reason; and lmforge's refusals by
reason. Made in the worker, after BentoML has set up Prometheus' multiprocess directory (/metrics only
sees metrics created after that)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the vLLM service counts refusals too, without this engine's torch
    from lmforge.serving.models import Served
    from lmforge.serving.sampling import Completion

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)  # fmt: skip


def refusals():
    """lmforge_requests_refused_total{model_name, reason}: requests the guards answered themselves."""
    from prometheus_client import Counter

    return Counter("lmforge_requests_refused", "Requests refused before the engine", ["model_name", "reason"])


class ServingMetrics:
    def __init__(self, worker: str):
        from prometheus_client import Counter, Gauge, Histogram

        model = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the batch", model,
                             multiprocess_mode="livesum")  # fmt: skip
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for the batch", model,
                             multiprocess_mode="livesum")  # fmt: skip
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", model)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", model)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to the first token", model,
                              buckets=LATENCY_BUCKETS)  # fmt: skip
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first",
                              model, buckets=LATENCY_BUCKETS)  # fmt: skip
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, queueing included", model,
                             buckets=LATENCY_BUCKETS)  # fmt: skip
        self.success = Counter("vllm:request_success", "Finished requests", [*model, "finished_reason"])
        self.refused = refusals()
        batch = Histogram("lmforge_batch_size", "Requests admitted together, in one prefill, by service worker",
                          ["worker"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))  # fmt: skip
        self.batch_size = batch.labels(worker=worker)
        self.in_flight: dict[str, int] = {}  # per model: requests between submit and their end

    def started(self, served: Served) -> None:
        self.in_flight[served.tag] = self.in_flight.get(served.tag, 0) + 1
        self.count(served)

    def finished(self, served: Served, request, done: Completion | None) -> None:
        self.in_flight[served.tag] -= 1
        self.count(served)
        if done is None:
            return
        now, tag = time.monotonic(), served.tag
        self.prompt_tokens.labels(tag).inc(done.prompt_tokens)
        self.generation_tokens.labels(tag).inc(done.completion_tokens)
        self.e2e.labels(tag).observe(now - request.arrived)
        if request.first_token_at is not None:
            self.ttft.labels(tag).observe(request.first_token_at - request.arrived)
            if done.completion_tokens > 1:
                self.tpot.labels(tag).observe((now - request.first_token_at) / (done.completion_tokens - 1))
        self.success.labels(tag, done.finish_reason).inc()

    def count(self, served: Served) -> None:
        in_flight = self.in_flight[served.tag]
        waiting = min(served.engine.waiting(), in_flight)
        self.waiting.labels(served.tag).set(waiting)
        self.running.labels(served.tag).set(in_flight - waiting)

    def refuse(self, model_name: str, reason: str) -> None:
        self.refused.labels(model_name, reason).inc()
