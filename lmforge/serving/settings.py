"""How the service serves: params.yaml's `serve` section, which package.py pins into the Bento as its
arguments, so that a Bento serves the same way anywhere."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# `lmforge serve --follow` names the champion's model in the file this variable names; each worker
# switches to it when it changes (models.py)
FOLLOW_VAR = "LMFORGE_FOLLOW_FILE"
# A LoRA run's adapter alone, in peft's format, inside the model directory (artifacts/model, and a
# stored model that vLLM serves as the adapter on the base's weights beside it)
ADAPTER_DIR = "adapter"


# The architectures vLLM (0.32) serves LoRA adapters for (its models implementing SupportsLoRA); a LoRA
# fine-tune of any other base is served merged.
VLLM_LORA_ARCHITECTURES = frozenset("""
    ApertusForCausalLM BailingMoeForCausalLM Cohere2ForCausalLM CohereForCausalLM DeciLMForCausalLM
    DeepseekForCausalLM DeepseekV2ForCausalLM DeepseekV3ForCausalLM Ernie4_5ForCausalLM ExaoneForCausalLM
    Exaone4ForCausalLM FalconH1ForCausalLM GemmaForCausalLM Gemma2ForCausalLM Gemma3ForCausalLM
    Gemma4ForCausalLM Glm4ForCausalLM Glm4MoeForCausalLM GptOssForCausalLM GraniteForCausalLM
    GraniteMoeForCausalLM InternLM2ForCausalLM InternLM3ForCausalLM JambaForCausalLM LlamaForCausalLM
    Llama4ForCausalLM MiniCPMForCausalLM MiniCPM3ForCausalLM MistralForCausalLM MixtralForCausalLM
    NemotronForCausalLM OPTForCausalLM OlmoeForCausalLM Phi3ForCausalLM PhiMoEForCausalLM Qwen2ForCausalLM
    Qwen2MoeForCausalLM Qwen3ForCausalLM Qwen3MoeForCausalLM Qwen3NextForCausalLM SolarForCausalLM
""".split())


class VllmSettings(BaseModel):
    """serve.vllm: vLLM's own engine settings, passed through to `vllm serve` as its flags."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_num_seqs: int = Field(256, ge=1)  # sequences decoded together
    max_model_len: int | None = Field(None, ge=16)  # null: the model's own context
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enable_prefix_caching: bool = True
    cpu_kvcache_space_gb: int = Field(4, ge=1)  # VLLM_CPU_KVCACHE_SPACE, where there is no GPU
    enforce_eager: bool = False  # no CUDA graphs (and on a CPU, no torch.compile)
    enable_lora: bool = False  # a LoRA fine-tune served as an adapter on its base, where vLLM supports it
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16  # the ranks vLLM takes

    def flags(self) -> list[str]:
        """The settings as `vllm serve` flags (the CPU KV cache is an environment variable instead)."""
        flags = ["--dtype", self.dtype, "--max-num-seqs", str(self.max_num_seqs),
                 "--gpu-memory-utilization", str(self.gpu_memory_utilization),
                 "--tensor-parallel-size", str(self.tensor_parallel_size)]  # fmt: skip
        if self.max_model_len:
            flags += ["--max-model-len", str(self.max_model_len)]
        flags.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        if self.enforce_eager:
            flags.append("--enforce-eager")
        if self.enable_lora:
            flags += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank)]
        return flags


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
    # which engine the Bento serves with: lmforge's own (small models, CPUs) or vLLM; auto: vLLM where
    # the build machine has a GPU or the profile is a GPU one
    engine: Literal["auto", "builtin", "vllm"] = "auto"
    vllm: VllmSettings = VllmSettings()

    @model_validator(mode="after")
    def _default_within_cap(self) -> ServeConfig:
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds max_new_tokens_cap "
                f"({self.max_new_tokens_cap})"
            )
        return self
