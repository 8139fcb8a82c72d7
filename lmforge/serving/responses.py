"""Answers in OpenAI's shapes, as vLLM writes them: the choices of a whole response and the chunks of a
stream, for completions and for chat; usage; server-sent events."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lmforge.serving.engine import Engine
from lmforge.serving.sampling import Completion, Delta, SamplingParams


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


def usage(results: list[Completion], n: int) -> dict:
    """Token counts as OpenAI reports them: each prompt once, however many of its n choices there are."""
    prompt = sum(r.prompt_tokens for r in results) // n
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, allow_nan=False)}\n\n"
