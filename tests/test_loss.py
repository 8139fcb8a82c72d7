"""The fused training loss: the same numbers as the model's own loss and gradients, and a fallback
for architectures it does not reproduce."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.training.loss import (
    FusedNextTokenLoss,
    LinearCrossEntropy,
    NextTokenLoss,
    chunk_rows_for,
    compiled,
    training_loss,
)
from lmforge.training.model import build_model


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_linear_cross_entropy_matches_unfused(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(150, 32, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(500, 32, dtype=torch.float64) * 0.3).requires_grad_()
    targets = torch.randint(0, 500, (150,))
    targets[::9] = -100  # ignored rows count neither in the sum nor in the mean

    reference = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    ref_grads = torch.autograd.grad(reference * 3.0, (hidden, weight))
    fused = LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    grads = torch.autograd.grad(fused * 3.0, (hidden, weight))  # a non-unit upstream gradient

    assert 5.0 < reference.item() < 8.0  # about ln(500) = 6.2 for random logits
    assert fused.item() == pytest.approx(reference.item(), abs=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_chunk_rows_fit_the_cache():
    assert chunk_rows_for(8192, torch.device("cpu")) == 128  # 4 MB of fp32 logits
    assert chunk_rows_for(32768, torch.device("cuda")) == 2048
    assert chunk_rows_for(10**7, torch.device("cpu")) == 16


def _tiny_gpt2():
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), 300, 0)


def test_fused_training_step_equals_the_models_own():
    """One AdamW step through the fused loss and one through model(labels=...).loss give the same
    weights: the tied embedding's two gradients included."""
    model = _tiny_gpt2()
    batch = torch.randint(0, 300, (4, 32))
    chosen, kind = training_loss(model, batch)
    assert isinstance(chosen, FusedNextTokenLoss), kind

    twin = copy.deepcopy(model)
    initial_wte = model.transformer.wte.weight.detach().clone()
    results = []
    for module in (FusedNextTokenLoss(model), NextTokenLoss(twin)):
        module.train()
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
        loss = module(batch)
        loss.backward()
        optimizer.step()
        results.append((loss.item(), module.model.transformer.wte.weight.detach().clone()))
    (fused_loss, fused_wte), (own_loss, own_wte) = results
    assert fused_loss == pytest.approx(own_loss, rel=1e-5)
    assert 5.0 < own_loss < 6.5  # ln(300) = 5.7 at initialization
    torch.testing.assert_close(fused_wte, own_wte, rtol=1e-4, atol=1e-5)
    # AdamW's first step moves each weight by lr x g / (|g| + eps), which is lr for all but the tiniest
    # gradients: the fused path's gradient reached every row of the tied embedding (input and output side)
    moved = (fused_wte - initial_wte).abs()
    assert moved.median().item() == pytest.approx(1e-2, rel=1e-3)
    assert (moved > 1e-3).all()


@pytest.mark.slow
def test_a_compiled_fused_loss_gives_the_eager_loss_and_gradients():
    """train.compile: torch.compile of the loss module (inductor on this CPU), the fused chunk loop
    left eager inside it; the same loss and gradients as the eager module."""
    model = _tiny_gpt2()
    batch = torch.randint(0, 300, (4, 32))
    twin = copy.deepcopy(model)
    eager, compiled_loss = FusedNextTokenLoss(model), compiled(FusedNextTokenLoss(twin))
    assert compiled_loss is not eager and "fused_loss" in vars(compiled_loss._orig_mod)  # the eager override
    losses = []
    for module in (eager, compiled_loss):
        loss = module(batch)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(twin.transformer.wte.weight.grad, model.transformer.wte.weight.grad)


def test_fused_loss_under_bf16_autocast():
    """The GPU path runs under bf16 autocast; the CPU has the same autocast, so the path is exercised."""
    model = _tiny_gpt2()
    batch = torch.randint(0, 300, (4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = NextTokenLoss(model)(batch)
        fused = FusedNextTokenLoss(model)(batch)
    fused.backward()
    assert fused.item() == pytest.approx(own.item(), rel=2e-2)
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def _tiny_gemma2(**overrides):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config)


def test_a_model_that_soft_caps_its_logits_keeps_its_own_loss():
    sample = torch.randint(0, 300, (2, 17))
    chosen, kind = training_loss(_tiny_gemma2(final_logit_softcapping=30.0), sample)
    assert type(chosen) is NextTokenLoss
    assert "final_logit_softcapping" in kind
    chosen, kind = training_loss(_tiny_gemma2(final_logit_softcapping=None), sample)
    assert isinstance(chosen, FusedNextTokenLoss), kind  # the same model without the cap is exact


def test_logits_changed_after_the_head_are_caught_on_a_sample_batch():
    """A custom head (here: doubled logits) that no config field announces."""
    model = _tiny_gpt2()
    head = model.lm_head
    head.forward = lambda x: F.linear(x, head.weight) * 2.0
    chosen, kind = training_loss(model, torch.randint(0, 300, (2, 32)))
    assert type(chosen) is NextTokenLoss
    assert "not body x head" in kind
