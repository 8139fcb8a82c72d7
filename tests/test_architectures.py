"""Any causal-LM architecture, end to end: a tiny random-weight base of each of five real architectures is
adapted (train), evaluated, gated, packaged as a real Bento and served over HTTP. What the server says is
what the model computes in this process: the prompt's logprobs, and its greedy continuation."""

from __future__ import annotations

import pytest
import torch

from infra.bento_server import BentoServer
from lmforge.params_file import load_params, write_overrides
from tests.conftest import TINY_BASES, tiny_base

pytestmark = pytest.mark.slow

TEXT = "the quick brown fox jumps over the lazy dog. a river of stone"


@pytest.mark.parametrize("kind", list(TINY_BASES))
def test_an_architecture_trains_evaluates_packages_and_serves(kind, tiny_workspace, tmp_path):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.evaluate import evaluate
    from pipeline.gate import decide
    from pipeline.package import package
    from pipeline.preprocess import preprocess
    from pipeline.train import train

    ws, _ = tiny_workspace
    base = tiny_base(kind, tmp_path / kind, ws.tokenizer_dir)
    # block_size: the bases' whole context, which evaluate scores with (lm-eval's rolling windows): random
    # weights learn no position they never trained on
    write_overrides(ws.root, [
        f"model.base={base}", "model.block_size=64", "train.lr=0.01", "train.min_lr=0.001", "train.max_steps=300",
        "train.eval_every=300", "train.checkpoint_every=300", "gate.min_gain_over_bigram=0",
    ])  # fmt: skip
    params = load_params(ws.root)
    preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, base_dir=base)
    threads = torch.get_num_threads()
    try:
        summary = train(params, ws, base)
        metrics = evaluate(params, ws)
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 300
    decision = decide(metrics, None, params.gate)
    assert decision.promote, decision.reasons  # beats its base and the bigram on held-out bytes
    decision.save(ws.gate_file)
    bento = package(ws, params, data_md5=None)

    model = AutoModelForCausalLM.from_pretrained(ws.model_dir, use_safetensors=True).eval()
    assert type(model).__name__ == type(AutoModelForCausalLM.from_pretrained(base)).__name__
    tokenizer = AutoTokenizer.from_pretrained(ws.model_dir)
    ids = tokenizer(TEXT)["input_ids"]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    expected = [logp[j - 1, ids[j]].item() for j in range(1, len(ids))]

    with BentoServer(bento["bento_tag"], tmp_path / "serve") as served:
        client = OpenAI(base_url=f"{served.url}/v1", api_key="unused")
        scored = client.completions.create(model="lmforge", prompt=ids, max_tokens=0, echo=True, logprobs=0)
        continued = client.completions.create(model="lmforge", prompt=ids, max_tokens=8, temperature=0)
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    eos = tokenizer.eos_token_id
    assert continued.choices[0].text and continued.choices[0].text == tokenizer.decode([t for t in greedy if t != eos])
