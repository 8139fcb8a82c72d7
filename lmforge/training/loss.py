"""The training loss: the model's own next-token loss, or the same loss without the logits tensor.

A small model with a big vocabulary spends more time on its logits than on its layers: at d=128 and 8192
tokens, one batch's logits are 64 MB, written by the head, read and written again by log-softmax and its
backward, and zero-filled by the loss's backward. Chunks of rows that fit the CPU's cache do the head's
matmul, the loss and its gradient in one pass (LinearCrossEntropy), so the full logits never exist.
`training_loss` picks the fused loss only where it computes exactly what the model's own would.
"""

from __future__ import annotations

import torch


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
