"""The config's schema: params.yaml's sections as validated pydantic models, with their defaults
(params_file.py reads the file, applies the profile and the overrides, and validates through these).

Every error names the key path (for example `preprocess.vocab_size`), so a typo in params.yaml or in
`-p key=value` fails at load, before any stage starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from infra.errors import UsageError
from lmforge.serving.settings import ServeConfig

PARAMS_FILE = "params.yaml"


class ConfigError(UsageError, ValueError):
    """A bad params.yaml, profile or override; the message names the key path."""


class Section(BaseModel):
    # No number anywhere may be inf or NaN: `-p gate.champion_tolerance=inf` would switch a check off
    # without a word, and one-sided bounds (gt=0) let inf through.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StorageConfig(Section):
    bucket: str = Field("lmforge", pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
    dvc_prefix: str = Field("dvc", min_length=1)
    registry_prefix: str = Field("registry", min_length=1)
    bentos_prefix: str = Field("bentos", min_length=1)
    endpoint_url: str | None = "http://127.0.0.1:8333"
    region: str = "us-east-1"
    embedded: bool = True

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+(:\d+)?/?$", value):
            raise ValueError(f"must be an http(s)://host:port URL or null for AWS, got {value!r}")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _embedded_needs_endpoint(self) -> StorageConfig:
        if self.embedded and not self.endpoint_url:
            raise ValueError(
                "embedded: true needs an endpoint_url on 127.0.0.1 (set embedded: false for AWS)"
            )
        return self

    @property
    def dvc_remote_url(self) -> str:
        return f"s3://{self.bucket}/{self.dvc_prefix.strip('/')}"


class IngestConfig(Section):
    source: str = Field("builtin", min_length=1)
    doc_chars: int = Field(4000, ge=100)
    txt_layout: Literal["auto", "paragraphs", "lines"] = "auto"
    text_field: str = Field("text", min_length=1)  # JSONL field / Parquet column holding the text
    format: Literal["text", "chat"] = "text"  # chat: conversations, trained on the assistant's turns
    messages_field: str = Field("messages", min_length=1)  # chat: OpenAI's [{"role", "content"}, ...]
    prompt_field: str = Field("prompt", min_length=1)  # chat: or a prompt/completion pair per record
    completion_field: str = Field("completion", min_length=1)
    # Files are streamed, so no size is too large to read; this is only a safety limit you may set.
    max_file_bytes: int | None = Field(None, ge=1)


class ValidationConfig(Section):
    min_documents: int = Field(20, ge=1)
    min_total_chars: int = Field(100_000, ge=1)
    min_doc_chars: int = Field(1, ge=1)
    max_doc_chars: int = Field(1_000_000, ge=1)
    max_nonprintable_ratio: float = Field(0.01, ge=0, le=1)
    max_duplicate_ratio: float = Field(0.3, ge=0, le=1)
    # Documents failing a per-document check are dropped; past this share the corpus itself fails.
    max_dropped_fraction: float = Field(0.05, ge=0, le=1)
    near_duplicates: bool = False  # also drop documents a MinHash LSH finds near-identical to a kept one
    near_duplicate_threshold: float = Field(0.8, gt=0, lt=1)  # estimated Jaccard similarity
    minhash_permutations: int = Field(128, ge=16, le=1024)
    # A new corpus must keep this fraction of the champion's characters (0 turns the guard off).
    min_fraction_of_champion: float = Field(0.5, ge=0, le=1)
    secret_patterns: dict[str, str] = Field(
        default_factory=lambda: {
            "aws_access_key_id": "(?:AKIA|ASIA)[0-9A-Z]{16}",
            "private_key_block": "-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE KEY-----",
            "github_token": "gh[pousr]_[A-Za-z0-9]{36}",
        }
    )

    @field_validator("secret_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: dict[str, str]) -> dict[str, str]:
        for name, pattern in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{name}: not a valid regex ({exc})") from None
        return patterns

    @model_validator(mode="after")
    def _length_bounds(self) -> ValidationConfig:
        if self.min_doc_chars > self.max_doc_chars:
            raise ValueError(
                f"min_doc_chars ({self.min_doc_chars}) exceeds max_doc_chars ({self.max_doc_chars})"
            )
        return self


class PreprocessConfig(Section):
    vocab_size: int = Field(8192, ge=300, le=2**31)
    min_frequency: int = Field(2, ge=1)
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    test_fraction: float = Field(0.05, gt=0, lt=0.5)
    shard_tokens: int = Field(2**24, ge=1024)
    encode_batch_docs: int = Field(256, ge=1)
    # The tokenizer learns from a uniform sample of the train split of at most this many characters,
    # so its memory stays bounded however large the corpus is.
    tokenizer_train_chars: int = Field(200_000_000, ge=10_000)
    # val/test n-grams of words (characters in scripts written without spaces) looked up in train
    contamination_ngram: int = Field(13, ge=2)


class DataConfig(Section):
    """Where validate and preprocess do their per-document work; the output is the same on either."""

    engine: Literal["local", "ray"] = "local"
    # ray: the cluster to use ("auto", or ray://host:10001, ...); null takes RAY_ADDRESS, and without
    # it lmforge starts a cluster of this machine on 127.0.0.1 for the stage and stops it after.
    ray_address: str | None = None
    ray_cpus: int | None = Field(None, ge=1)  # the local cluster's CPUs (null: all of this machine's)
    ray_batch_docs: int = Field(256, ge=1)  # documents per Ray task batch (measure, tokenize)


class ModelConfig(Section):
    base: str | None = None
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    block_size: int = Field(128, ge=8)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class LoraConfig(Section):
    """train.method: lora: low-rank adapters (peft) on the base's linear layers, the base frozen."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # module names as peft matches them (q_proj, c_attn, ...); null: every linear layer of the blocks
    target_modules: list[str] | None = Field(None, min_length=1)


class TrainConfig(Section):
    nproc_per_node: int = Field(2, ge=1)
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str = Field("localhost:0", pattern=r"^[\w.\-\[\]:]+:\d+$")
    rdzv_id: str = Field("lmforge", min_length=1)
    max_restarts: int = Field(2, ge=0)
    threads_per_rank: int = Field(1, ge=1)
    seed: int = 1337
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    compile: bool = False
    method: Literal["full", "lora"] = "full"  # lora: train adapters only (train.lora), the base frozen
    # ddp: every rank holds the whole model; fsdp: parameters, gradients and optimizer state sharded across
    # the ranks (FSDP2), checkpoints sharded too
    strategy: Literal["ddp", "fsdp"] = "ddp"
    lora: LoraConfig = LoraConfig()
    # recompute each block's activations in backward instead of keeping them (non-reentrant, which
    # DDP with LoRA needs): memory for compute
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) exceeds lr ({self.lr})")
        if self.nnodes > 1 and self.rdzv_endpoint.endswith(":0"):
            raise ValueError("multi-node needs a fixed rdzv_endpoint host:port that every node can reach")
        if self.strategy == "fsdp" and self.nproc_per_node * self.nnodes < 2:
            raise ValueError("strategy fsdp shards the model across ranks: it needs nproc_per_node x nnodes >= 2 "
                             "(one rank holds the whole model anyway: use ddp)")  # fmt: skip
        return self


class EvaluateConfig(Section):
    batch_size: int = Field(16, ge=1)
    # The held-out text scored per split, in UTF-8 bytes (null: all of it). Documents are taken in the
    # order of their text's hash until the budget is spent, so every model is scored on the same ones.
    max_bytes: int | None = Field(2_000_000, ge=1)
    smoothing_k: float = Field(0.1, gt=0)
    prompts: list[str] = Field(
        default_factory=lambda: ["The ", "Return the ", "This module provides"], min_length=1
    )
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(0.8, gt=0)
    top_k: int = Field(50, ge=0)
    seed: int = 0

    @field_validator("prompts")
    @classmethod
    def _prompts_not_empty(cls, prompts: list[str]) -> list[str]:
        if any(not p for p in prompts):
            raise ValueError("a prompt must not be empty (generation needs at least one token to continue)")
        return prompts


class TaskRule(Section):
    """One lm-evaluation-harness task file and the rule its metric must hold (see tasks.py)."""

    file: str = Field(min_length=1)  # a task YAML, relative to the workspace
    metric: str = Field(min_length=1)  # as lm-eval names it: acc, acc_norm, exact_match, bits_per_byte, ...
    # the challenger may be worse than the champion by at most this much, in the metric's own unit
    # (lm-eval says whether higher is better)
    max_drop: float | None = Field(None, ge=0)
    threshold: float | None = None  # an absolute bound: at least this (higher is better) or at most

    @model_validator(mode="after")
    def _has_a_rule(self) -> TaskRule:
        if self.max_drop is None and self.threshold is None:
            raise ValueError(f"task {self.file}: give max_drop (against the champion), threshold, or both")
        return self


class GateConfig(Section):
    # per token: holds for this run's tokenizer only (null: no threshold)
    max_val_perplexity: float | None = Field(400.0, gt=1)
    min_gain_over_bigram: float = Field(0.10, ge=0, lt=1)
    # Against the champion, on this run's held-out bytes: the challenger's val bits per byte may be at
    # most this much (relative) worse, at the upper end of the bootstrap interval of the difference.
    champion_tolerance: float = Field(0.02, ge=0)
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of that interval
    bootstrap_samples: int = Field(1000, ge=100)  # resamples of the held-out documents
    # Share of val/test word n-grams seen in train above which a held-out figure is not evidence.
    max_contamination: float = Field(0.05, ge=0, le=1)
    tasks: list[TaskRule] = []  # the user's own lm-evaluation-harness tasks, run on both models


class PrefectConfig(Section):
    host: str = "127.0.0.1"  # the local Prefect server (`lmforge up --prefect`): API and UI
    port: int = Field(4200, ge=1, le=65535)
    deployment: str = Field("nightly", min_length=1)  # `lmforge schedule` names its deployment so


class Params(Section):
    profile: str = "demo"
    storage: StorageConfig = StorageConfig()
    ingest: IngestConfig = IngestConfig()
    validation: ValidationConfig = ValidationConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    serve: ServeConfig = ServeConfig()
    prefect: PrefectConfig = PrefectConfig()

    @field_validator("evaluate")
    @classmethod
    def _samples_fit_the_context(cls, evaluate: EvaluateConfig, info: ValidationInfo) -> EvaluateConfig:
        # A model built here has block_size positions; generating past them is an IndexError at the end of
        # evaluate. A base model's context (and exact prompt lengths) are checked before training starts.
        model = info.data.get("model")  # absent when the model section itself failed
        if model and model.base is None and evaluate.max_new_tokens >= model.block_size:
            raise ValueError(
                f"evaluate.max_new_tokens ({evaluate.max_new_tokens}) leaves no room for a prompt in "
                f"model.block_size ({model.block_size})"
            )
        return evaluate


# The params that shape the model: what was trained and how, not where things are stored or served.
# A run's identity (the params hash in its lineage, tags and champion record) is made of these.
MODEL_SHAPING_SECTIONS = frozenset({"profile", "preprocess", "model", "train", "evaluate", "gate"})


def model_shaping_params(params: Params) -> dict:
    return params.model_dump(include=set(MODEL_SHAPING_SECTIONS))


def params_hash(params: Params) -> str:
    """12 hex digits that tell two runs' model-shaping params apart."""
    payload = json.dumps(model_shaping_params(params), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]
