"""Model: build a causal LM from config, or resolve a base model (local dir or s3://) to fine-tune from."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from lmforge.config import ConfigError, LoraConfig, ModelConfig
from lmforge.serving.engine import context_length


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
        if context_length(model) < cfg.block_size:
            raise ConfigError(
                f"model.block_size {cfg.block_size} exceeds the base model's context {context_length(model)}"
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


# ---------------------------------------------------------------------------------------------
# the training loss without the logits tensor
#
# A small model with a big vocabulary spends more time on its logits than on its layers: at d=128 and
# 8192 tokens, one batch's logits are 64 MB, written by the head, read and written again by log-softmax
# and its backward, and zero-filled by the loss's backward. Chunks of rows that fit the CPU's cache do
# the head's matmul, the loss and its gradient in one pass, so the full logits never exist.


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight.T) against targets (-100 = ignored), in row chunks.

    The gradients are computed in the forward pass, while each chunk is still in cache; backward only
    scales them. Same FLOPs as the unfused head and loss."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int):
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        safe = targets.clamp(min=0)
        exact = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits go up to fp32
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # none in validation
        # summed over every chunk: in fp32, or bf16 weights (FSDP's mixed precision) would lose the small ones
        grad_weight = torch.zeros_like(weight, dtype=exact) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=exact)
        scale = valid.to(exact) / n_valid  # each row's share of the mean; 0 for ignored rows
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows]
            logits = (h @ weight.t()).to(exact)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[rows, None]).squeeze(1)
            total += ((lse - picked) * valid[rows]).sum()
            # d(mean loss)/d(logits) = (softmax - one_hot) x share, built in place over the logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(h), device=h.device), safe[rows]] -= 1.0
            grad = grad.mul_(scale[rows, None])
            if grad_hidden is not None:
                grad_hidden[rows] = grad.to(h.dtype) @ weight.to(h.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h.to(exact))
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss,
            None if grad_weight is None else grad_weight * grad_loss,
            None,
            None,
        )


def chunk_rows_for(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk: about 4 MB of fp32 logits on a CPU (its L2/L3), 256 MB on a GPU."""
    elements = (1 << 26) if device.type == "cuda" else (1 << 20)
    return max(16, elements // vocab_size)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the next token (targets: the input ids, or
    labels with -100 where nothing is learnt), in fp32 (what transformers' ForCausalLM loss computes;
    called directly, it needs no `loss_type` from the model)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1)
    )


def no_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed windows: EOS separates documents inside them and is no padding."""
    return torch.ones_like(input_ids)


def body_inputs(input_ids, position_ids=None, attention_mask=None) -> dict:
    """A model's keyword arguments for a batch. Packed conversations come with position_ids that restart
    at each one and no attention mask: transformers then lets no token attend across into another."""
    if position_ids is None and attention_mask is None:
        attention_mask = no_padding(input_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": False,
    }


class NextTokenLoss(torch.nn.Module):
    """`module(input_ids, labels=None, ...)` -> the mean next-token loss, the model's own way (head, then
    loss). Without labels every next token is learnt; with them, those that are not -100."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None) -> torch.Tensor:
        logits = self.model(**body_inputs(input_ids, position_ids, attention_mask)).logits
        return next_token_loss(logits, input_ids if labels is None else labels)


class FusedNextTokenLoss(NextTokenLoss):
    """The same loss through the model's body and LinearCrossEntropy over its output embedding."""

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None) -> torch.Tensor:
        hidden = self.model.base_model(
            **body_inputs(input_ids, position_ids, attention_mask)
        ).last_hidden_state
        weight = self.model.get_output_embeddings().weight
        return self.fused_loss(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]),
            weight,
            (input_ids if labels is None else labels)[:, 1:].reshape(-1),
            chunk_rows_for(weight.shape[0], weight.device),
        )

    fused_loss = staticmethod(LinearCrossEntropy.apply)


def compiled(loss: torch.nn.Module) -> torch.nn.Module:
    """torch.compile of a loss module or its DDP wrapper. The fused loss's chunk loop is no graph, so the
    compiled body calls it eagerly. torch._dynamo is imported here, not with this module: it takes
    seconds, and an eager run never needs it."""
    inner = getattr(loss, "module", loss)  # DDP keeps the module it wraps in .module
    if isinstance(inner, FusedNextTokenLoss):
        inner.fused_loss = torch.compiler.disable(LinearCrossEntropy.apply)
    return torch.compile(loss)


# config fields by which transformers models change the logits after the head
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


@torch.no_grad()
def training_loss(model, sample: torch.Tensor) -> tuple[NextTokenLoss, str]:
    """The fused loss if the model's logits are exactly body @ output_embedding.T, else its own loss.

    A base model may do more after its body (soft-capping, scaling, a head bias). Known config fields
    say so; a sample batch, whose logits both ways must agree, catches the rest."""
    plain = NextTokenLoss(model)
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        return plain, "the model's own (its output layer has a bias)"
    transforms = [f for f in LOGIT_TRANSFORMS if getattr(model.config, f, None) not in (None, 1, 1.0)]
    if transforms:
        return plain, f"the model's own (its config sets {', '.join(transforms)})"
    was_training = model.training
    model.eval()  # no dropout, so both passes see the same network
    try:
        mask = no_padding(sample)
        own = model(input_ids=sample, attention_mask=mask).logits.float()
        hidden = model.base_model(input_ids=sample, attention_mask=mask, use_cache=False).last_hidden_state
        mine = (hidden @ model.get_output_embeddings().weight.t()).float()
        gap = float((own - mine).abs().max() / own.abs().max().clamp(min=1e-6))
    except Exception as exc:  # noqa: BLE001 - an architecture the fused path cannot drive
        return plain, f"the model's own (its body and head cannot be called apart: {type(exc).__name__})"
    finally:
        model.train(was_training)
    if gap > 1e-4:
        return plain, f"the model's own (its logits are not body x head: relative gap {gap:.1e})"
    return FusedNextTokenLoss(model), "fused linear + cross-entropy, chunked"


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
