"""Model: build a causal LM from config, or resolve a base model (local dir or s3://) to fine-tune from."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.config import ConfigError, ModelConfig, Params, Workspace
from pipeline.generation import context_length


def resolve_base(base: str, ws: Workspace, params: Params) -> Path:
    """A local directory for model.base; an s3:// base is downloaded once into the state dir."""
    if base.startswith("s3://"):
        from pipeline.storage import download_prefix

        dest = ws.state / "base-models" / hashlib.sha256(base.encode()).hexdigest()[:16]
        if not (dest / "config.json").is_file() and not (dest / "tokenizer_config.json").is_file():
            download_prefix(base, dest, params.storage, ws.state)
        return dest
    path = Path(base).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"model.base: {base} is not a directory (give a local Hugging Face model dir or s3://bucket/prefix)"
        )
    return path.resolve()


def build_model(cfg: ModelConfig, vocab_size: int, eos_token_id: int, base_dir: Path | None = None):
    """A GPT-2 style causal LM from config, or the base model to fine-tune (its own architecture)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if base_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, attn_implementation="sdpa", use_safetensors=True
        )
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ConfigError(f"model.base: its vocabulary is smaller than the tokenizer's ({vocab_size})")
        if context_length(model) < cfg.block_size:
            raise ConfigError(
                f"model.block_size {cfg.block_size} exceeds the base model's context {context_length(model)}"
            )
        return model
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config)  # transformers 5 picks SDPA attention by default


def load_model(model_dir: Path):
    """A trained model from its Hugging Face directory (safetensors only, never a pickle)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
