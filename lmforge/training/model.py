"""Model: build a causal LM from config, or load the base model to fine-tune; LoRA adapters on it; the
blocks FSDP shards."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from lmforge.architecture import context_length
from lmforge.config import ConfigError, LoraConfig, ModelConfig


def build_model(cfg: ModelConfig, vocab_size: int, eos_token_id: int, base_dir: Path | None = None):
    """A GPT-2 style causal LM from config, or the base model to fine-tune (its own architecture)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if base_dir is not None:
        # fp32 weights whatever the checkpoint's dtype: AdamW's updates and moments need them (bf16 runs
        # under autocast or FSDP's mixed precision)
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, attn_implementation="sdpa", use_safetensors=True, dtype=torch.float32
        )
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ConfigError(f"model.base: its vocabulary is smaller than the tokenizer's ({vocab_size})")
        if context_length(model.config) < cfg.block_size:
            raise ConfigError(
                f"model.block_size {cfg.block_size} exceeds the base model's context {context_length(model.config)}"
            )
        return model
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        # the same tanh GELU as GPT-2's "gelu_new", in one native kernel instead of eight tensor ops
        activation_function="gelu_pytorch_tanh",
    )  # fmt: skip
    return GPT2LMHeadModel(config)  # transformers 5 picks SDPA attention by default


def with_lora(model, cfg: LoraConfig):
    """peft's LoRA adapters on the model's linear layers (cfg.target_modules, or every linear layer of
    its blocks), every other weight frozen. Training runs on the returned peft model's get_base_model():
    the same modules, with the adapters inside them."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    transposed = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2 keeps its linears as Conv1D
    return get_peft_model(
        model,
        PeftLoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
            target_modules=cfg.target_modules or "all-linear", fan_in_fan_out=transposed,
        ),
    )  # fmt: skip


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The model's repeated blocks, one FSDP unit each: the classes transformers never splits across
    devices (`_no_split_modules`), else the entries of its longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ConfigError(f"train.strategy=fsdp: no transformer blocks found in {type(model).__name__}")
    return list(max(lists, key=len))


def autocast_for(device: torch.device):
    """bf16 autocast where the GPU supports it; full fp32 elsewhere (CPU bf16 is slower here)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def load_model(model_dir: Path):
    """A trained model from its Hugging Face directory (safetensors only, never a pickle)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)


def count_parameters(model, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
