"""The request bodies the service takes, as pydantic schemas, apart from the serving logic: /generate's,
and OpenAI's completions and chat bodies as vLLM takes them; and OpenAI's error shape. A field a client
may send but this server cannot honour is refused by name, never ignored. The limits are the Bento's."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from lmforge.serving.arguments import SERVE
from lmforge.serving.sampling import SamplingParams

# vLLM sets no number; harnesses send a task's stops plus EOS. Each is searched in the new text only.
MAX_STOP_STRINGS = 256

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int | None, Field(ge=0, lt=2**63)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


def check_unicode(text: str) -> str:
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
        check_unicode(s)
    return stops


def _check_max_tokens(value: int | None) -> int | None:
    if value is not None and value > SERVE.max_new_tokens_cap:
        raise ValueError(f"at most {SERVE.max_new_tokens_cap} new tokens per request (got {value})")
    return value


Text = Annotated[str, AfterValidator(check_unicode)]
MaxTokens = Annotated[int, Field(ge=1), AfterValidator(_check_max_tokens)]
Stop = Annotated[str | list[str] | None, AfterValidator(_check_stop)]
TokenIds = Annotated[list[int], Field(min_length=1, max_length=1 << 16)]


DEFAULT_TEMPERATURE = 0.8  # /generate's and /predict's: sampled, a little conservative


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1), AfterValidator(check_unicode)]
    max_new_tokens: MaxTokens = SERVE.default_max_new_tokens
    temperature: Temperature = DEFAULT_TEMPERATURE
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
        if self.n * prompts > SERVE.max_batch_size:
            return f"n x prompts must be at most {SERVE.max_batch_size}"
        return None


class CompletionRequest(SamplingFields):
    """OpenAI's /v1/completions body, as vLLM takes it: the prompt may be text or token ids."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=0), AfterValidator(_check_max_tokens)] = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=SERVE.max_logprobs)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts_not_empty(cls, value):
        prompts = _prompt_list(value)
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must not be empty")
        if len(prompts) > SERVE.max_batch_size:
            raise ValueError(f"at most {SERVE.max_batch_size} prompts per request")
        for p in prompts:
            if isinstance(p, str):
                check_unicode(p)
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
    content: Annotated[str, AfterValidator(check_unicode)] | list[TextPart] | None = None

    def render(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": text}


class ChatRequest(SamplingFields):
    """OpenAI's /v1/chat/completions body (text only)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=SERVE.max_logprobs)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or SERVE.max_new_tokens_cap

    def unsupported(self) -> str | None:
        if self.tools or self.functions:
            return "tools are not supported"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format is not supported (only text)"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs: true"
        return self.too_many(1)


def error_body(message: str, code: str = "invalid_request", param: str | None = None) -> dict:
    """OpenAI's error shape, also used by /generate's own errors."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
