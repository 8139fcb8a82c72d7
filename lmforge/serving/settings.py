"""How the service serves: params.yaml's `serve` section, which package.py pins into the Bento as its
arguments, so that a Bento serves the same way anywhere."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# `lmforge serve --follow` names the champion's model in the file this variable names; each worker
# switches to it when it changes (models.py)
FOLLOW_VAR = "LMFORGE_FOLLOW_FILE"


class ServeConfig(BaseModel):
    """params.yaml's serve section, and the Bento's arguments: the same settings, validated once."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # as every params section

    model_name: str = Field("lmforge-lm", pattern=r"^[a-z0-9][a-z0-9_.\-]{0,62}$")
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    max_new_tokens_cap: int = Field(256, ge=1)
    default_max_new_tokens: int = Field(64, ge=1)
    max_batch_size: int = Field(16, ge=1, le=256)
    # rows (one per choice) waiting for the engine beyond the batch; past it a request gets a 429 with
    # Retry-After at once, instead of a long wait and a timeout
    max_queue: int = Field(64, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_logprobs: int = Field(20, ge=0, le=1000)
    chat_template: str | None = None  # a Jinja template, or a file holding one; overrides the tokenizer's
    # BentoML's scaling settings. workers: processes behind the one port, each with its own copy of the
    # model and its own batching engine. concurrency: traffic.concurrency, the requests the whole
    # service takes at once, which BentoCloud's autoscaler scales replicas on (unset: no limit).
    workers: int = Field(1, ge=1, le=64)
    concurrency: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _default_within_cap(self) -> ServeConfig:
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds max_new_tokens_cap "
                f"({self.max_new_tokens_cap})"
            )
        return self
