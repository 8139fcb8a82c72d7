"""Shared fixtures: an offline, quiet environment and one real SeaweedFS server per test session."""

from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.embedded_s3 import EmbeddedS3, start_on_free_ports
from infra.processes import free_port  # outside the ephemeral range: no client socket takes it first
from infra.s3 import Credentials, ensure_embedded_credentials
from lmforge.config import StorageConfig

# Set before anything imports prefect, transformers or bentoml.
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    BENTOML_DO_NOT_TRACK="true",
    DO_NOT_TRACK="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    GX_ANALYTICS_ENABLED="false",
    TOKENIZERS_PARALLELISM="false",
)
# One BentoML store per test process, never the developer's ~/bentoml. Each xdist worker sets its own:
# the controller's would be inherited, and tests that count the store's Bentos would see the other's.
_BENTOML_HOME = tempfile.mkdtemp(
    prefix=f"lmforge-test-bentoml-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-"
)
os.environ["BENTOML_HOME"] = _BENTOML_HOME
atexit.register(shutil.rmtree, _BENTOML_HOME, ignore_errors=True)
# The developer's own AWS keys would win over the test server's (see resolve_credentials).
for _var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_var, None)


@dataclass
class S3Server:
    cfg: StorageConfig  # endpoint_url on its own free ports, bucket already created
    state: Path  # pass as `state` to the infra.s3 helpers, or as LMFORGE_STATE_DIR
    creds: Credentials
    server: EmbeddedS3


def start_embedded_s3(state: Path, bucket: str = "lmforge-test") -> EmbeddedS3:
    """A started server on a fresh port block, as the bench starts its own."""
    return start_on_free_ports(state, lambda url: StorageConfig(endpoint_url=url, bucket=bucket))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One real SeaweedFS for the session, on loopback; stopped (no process left) at the end."""
    state = tmp_path_factory.mktemp("lmforge-state")
    server = start_embedded_s3(state)
    try:
        yield S3Server(server.cfg, state, ensure_embedded_credentials(state), server)
    finally:
        server.stop()


POOL = "lmforge"  # the work pool of the README's commands


@pytest.fixture(scope="session")
def operated(tmp_path_factory) -> Iterator[dict]:
    """A workspace with its own S3 and Prefect server (started by `lmforge up --prefect`) and one promoted
    run, which a Prefect worker ran from a work pool: the README's commands, one after the other. The
    operations tests and the bad-corpus tests use its champion (one group, one worker: see below). Its
    own state dir, so no other workspace's CLI finds its Prefect server."""
    from infra.prefect_server import PrefectServer
    from infra.processes import port_is_free
    from lmforge.config import PrefectConfig
    from lmforge.params_file import load_params, write_overrides

    from .test_e2e_data import BIN, PASSING_TRAINING, make_workspace, run

    root = tmp_path_factory.mktemp("operated")
    s3 = start_embedded_s3(root / "state", bucket="operated")
    worker = server = None
    try:
        own = S3Server(s3.cfg, root / "state", ensure_embedded_credentials(root / "state"), s3)
        ws, env, bucket = make_workspace(root / "ws", own, "operated", None, processes=2)  # DDP
        env = dict(env, PREFECT_HOME=str(own.state / "prefect"))  # the prefect CLI's too, not ~/.prefect
        port = free_port()
        write_overrides(ws, [f"prefect.port={port}", *PASSING_TRAINING])
        up = run([BIN / "lmforge", "up", "--prefect"], ws, env)
        assert f"Prefect started at http://127.0.0.1:{port}" in up.stdout
        server = PrefectServer(PrefectConfig(port=port), own.state)
        listening = listening_in_tree(server.pid())
        assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening  # loopback default
        corpus = lag2_corpus(root / "corpus")
        api_env = dict(env, PREFECT_API_URL=server.api_url)  # for the prefect CLI and the worker
        deployment = f"lmforge-retrain/{load_params(ws).prefect.deployment}"
        run([BIN / "prefect", "work-pool", "create", POOL, "--type", "process"], ws, api_env)
        scheduled = run([BIN / "lmforge", "schedule", "--cron", "0 3 * * *", "--pool", POOL, "--source", corpus],
                        ws, env)  # fmt: skip
        worker_log = root / "worker.log"
        worker = subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", POOL], cwd=ws, env=api_env,
                                  stdout=worker_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        first = run([BIN / "prefect", "deployment", "run", deployment, "--watch", "--watch-timeout", "1200"],
                    ws, api_env, timeout=1300)  # fmt: skip
        os.killpg(worker.pid, signal.SIGINT)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine can stall its graceful shutdown; the run is done
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
        # the later tests schedule their own deployment of the same name, served from their process
        run([BIN / "prefect", "deployment", "delete", deployment], ws, api_env)
        yield {"ws": ws, "env": env, "bucket": bucket, "api": server.api_url, "corpus": corpus, "first": first,
               "scheduled": scheduled, "worker_log": worker_log.read_text(),
               "cfg": own.cfg.model_copy(update={"bucket": bucket}), "state": own.state, "s3": own}  # fmt: skip
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        if server is not None:
            server.stop()
        s3.stop()
    assert server.pid() is None and port_is_free(port)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """One real Prefect server for the session's flow runs, as `lmforge up --prefect` gives a user: an
    ephemeral server per `lmforge run` costs about 25 s to start. Its own state dir, so no workspace's
    CLI mistakes it for the one `lmforge up --prefect` would have started there."""
    from infra.prefect_server import PrefectServer
    from lmforge.config import PrefectConfig

    server = PrefectServer(PrefectConfig(port=free_port()), tmp_path_factory.mktemp("prefect-state"))
    server.start()
    try:
        yield server.api_url
    finally:
        server.stop()


REPO = Path(__file__).resolve().parents[1]
# Real Chinese text for the corpus tests: lines of Tang poems (no spaces; the reader cuts between characters).
POEM_LINES = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "慈母手中线，游子身上衣。临行密密缝，意恐迟迟归。",
    "松下问童子，言师采药去。只在此山中，云深不知处。",
]
TINY = [
    "preprocess.vocab_size=300",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.nproc_per_node=1",
    "train.max_steps=10",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.eval_every=5",
    "train.eval_batches=2",
    "train.checkpoint_every=5",
    "evaluate.max_bytes=20000",
    "evaluate.max_new_tokens=5",
    "evaluate.prompts=['the ', 'a model']",
    "gate.max_val_perplexity=1000",
    # The synthetic corpora below are a small vocabulary in a near-deterministic order: their 13-grams repeat
    # by construction (about 30% of val's occur in train), which is not leakage. Natural text scores under
    # 1% (test_preprocess, test_e2e_corpora keep the 5% default and check the gate refuses leaked data).
    "gate.max_contamination=1.0",
]


def synthetic_corpus(path: Path, docs: int = 200, seed: int = 0) -> Path:
    """Pseudo-English with a small vocabulary and some structure, enough for a tiny model to learn."""
    import json

    rng = random.Random(seed)
    words = "the a model data shard token train loss step value river stone light quick brown fox jumps over lazy dog".split()
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(docs):
        sentence = []
        for _ in range(rng.randint(8, 16)):
            sentence += ["the", rng.choice(words), rng.choice(words), "."]
        lines.append(json.dumps({"text": " ".join(sentence)}))
    (path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return path


def lag2_corpus(path: Path, docs: int = 600, seed: int = 0) -> Path:
    """Each word is (mostly) a fixed function of the word two back: a bigram cannot see that, a model can."""
    import json

    rng = random.Random(seed)
    words = [w * 3 for w in "abcdefghijklmnopqrstuvwxyz"]  # distinct, one BPE token each after training
    follow = {w: words[(i * 7 + 3) % len(words)] for i, w in enumerate(words)}
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(docs):
        seq = [rng.choice(words), rng.choice(words)]
        while len(seq) < 60:
            seq.append(follow[seq[-2]] if rng.random() < 0.9 else rng.choice(words))
        lines.append(json.dumps({"text": " ".join(seq)}))
    (path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory) -> Path:
    """A workspace with tiny params and preprocessed shards, built once per session (the BPE tokenizer
    training is the slow part); tiny_workspace hands each test its own copy."""
    from lmforge.params_file import load_params, write_overrides
    from lmforge.workspace import Workspace
    from pipeline.preprocess import preprocess

    root = tmp_path_factory.mktemp("tiny-template") / "ws"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_overrides(root, TINY)
    ws = Workspace(root)
    synthetic_corpus(ws.data)
    preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, load_params(root))
    return root


@pytest.fixture
def tiny_workspace(tiny_template, tmp_path, monkeypatch):
    """A workspace of its own with tiny params and preprocessed shards: what train/evaluate/gate start from."""
    from lmforge.params_file import load_params
    from lmforge.workspace import Workspace

    root = tmp_path / "ws"
    shutil.copytree(tiny_template, root)
    monkeypatch.setenv("LMFORGE_ROOT", str(root))
    return Workspace(root), load_params(root)


# A ChatML template (Qwen's and many others' format): every turn ends in <|im_end|>, a special token of
# its own, not the tokenizer's EOS.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_WORDS = {
    "en": "river stone light model data answer question window garden letter music paper table field "
    "morning winter voice number reason story".split(),
    "zh": "今天 天气 很好 我们 学习 语言 模型 数据 训练 中文 问题 回答 朋友 城市 春天 山水 明月 故乡 时间 世界".split(),
}
ASK = {  # the system prompt, the request, the follow-up
    "en": ("You repeat words.", "Repeat these words: ", "Now say them backwards."),
    "zh": ("你重复词语。", "重复：", "倒过来说。"),
}


def chat_records(n: int, language: str = "en", seed: int = 0, bad_every: int | None = None) -> list[dict]:
    """Conversations a small model can learn (repeat the user's words, then, in some, say them backwards),
    as messages or prompt/completion records, some with a system prompt. With bad_every, every that-many-th
    record is one of the bad kinds validation drops."""
    rng = random.Random(seed)
    words, (system, ask, backwards) = CHAT_WORDS[language], ASK[language]
    sep = " " if language == "en" else "，"
    bad = [
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "a question nobody answers"}]},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and then?"},
            ]
        },  # fmt: skip
        {
            "messages": [
                {"role": "user", "content": {"text": "hi"}},
                {"role": "assistant", "content": "hello"},
            ]
        },
    ]
    records = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            records.append(bad[(i // bad_every) % len(bad)])
            continue
        said = [rng.choice(words) for _ in range(rng.randint(3, 5))]
        answer = sep.join(said)
        if i % 4 == 1:
            records.append({"prompt": ask + answer, "completion": answer})
            continue
        messages = [{"role": "system", "content": system}] if i % 3 == 0 and i % 5 != 2 else []
        messages += [{"role": "user", "content": ask + answer}, {"role": "assistant", "content": answer}]
        if i % 5 == 2:
            messages += [
                {"role": "user", "content": backwards},
                {"role": "assistant", "content": sep.join(said[::-1])},
            ]
        records.append({"messages": messages})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chatml_tokenizer(path: Path, texts: list[str], vocab_size: int = 400):
    """A byte-level BPE trained on texts, with <|im_start|> and <|im_end|> and the ChatML template: a
    tokenizer shaped like a chat model's."""
    from lmforge.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(texts), vocab_size, 1)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    return tokenizer


# Tiny random-weight models of real architectures, as bases to adapt. Between them: tied and untied
# embeddings, grouped-query attention, attention biases, a sliding window, parallel residuals, partial
# rotary embeddings, and vocabularies larger than the tokenizer (as real checkpoints pad theirs).
TINY_BASES = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral": (
        "MistralConfig",
        {"num_key_value_heads": 1, "sliding_window": 16, "tie_word_embeddings": False},
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        {"rotary_pct": 0.5, "use_parallel_residual": True, "tie_word_embeddings": False},
    ),
    "gpt2": ("GPT2Config", {"n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4}),
}


def tiny_base(kind: str, path: Path, tokenizer_dir: Path, extra_vocab: int = 13) -> Path:
    """A TINY_BASES model of random weights saved (safetensors) with the tokenizer: a base to adapt."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    config_class, own = TINY_BASES[kind]
    common = {} if kind == "gpt2" else {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 64,
    }  # fmt: skip
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer) + extra_vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        **common, **own,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROMPT = "the quick brown"
# long enough for the tiny model to pass the real gate (beat the bigram), still seconds on a CPU
SERVING = [
    "model.block_size=64",
    "model.n_embd=64",
    "train.max_steps=400",
    "train.lr=0.01",
    "train.min_lr=0.001",
    "train.checkpoint_every=400",
    "train.eval_every=400",
    "serve.max_new_tokens_cap=48",
    "serve.default_max_new_tokens=32",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A workspace whose model went through the real train, evaluate and gate stages: built once per
    session, shared by the serving, reliability and client tests (copy it before changing it)."""
    from lmforge.params_file import load_params, write_overrides
    from lmforge.workspace import Workspace
    from pipeline.evaluate import evaluate
    from pipeline.gate import decide
    from pipeline.preprocess import preprocess
    from pipeline.train import train

    root = tmp_path_factory.mktemp("serving") / "ws"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml", "bentofile.yaml"):
        shutil.copy(REPO / name, root / name)
    write_overrides(root, [*TINY, *SERVING])
    ws, params = Workspace(root), load_params(root)
    synthetic_corpus(ws.data)
    preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params)
    import torch

    threads = torch.get_num_threads()
    train(params, ws)
    decision = decide(evaluate(params, ws), None, params.gate)
    torch.set_num_threads(threads)  # train and evaluate set this process's thread count for themselves
    assert decision.promote, decision.reasons
    decision.save(ws.gate_file)
    return ws, params


@pytest.fixture(scope="session")
def bento(trained):
    """The trained model packaged as a real Bento, once per session."""
    from pipeline.package import package

    ws, params = trained
    return package(ws, params, data_md5="0123456789abcdef0123456789abcdef.dir")


def stop_group(proc: subprocess.Popen, sig: int, grace: float) -> None:
    """Signal a process started with start_new_session, and its group; SIGKILL the group after grace s.
    A group already gone is fine: stopping must never fail (it runs in finally, before other stops)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        proc.wait(timeout=30)


def listening_in_tree(pid: int) -> set[str]:
    """host:port of every TCP socket that pid or any process below it listens on (torchrun puts its
    ranks in sessions of their own, so a process group would miss them)."""
    from infra.processes import descendants

    tree = {pid, *descendants(pid)}
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return {line.split()[3] for line in lines if tree & {int(p) for p in re.findall(r"pid=(\d+)", line)}}


# ---------------------------------------------------------------------------------------------
# `pytest -m "not slow"` is the loop a developer runs: a test that takes longer than this (its setup,
# call and teardown together) must be marked slow. The summary names every unmarked one.
# `make test` runs the suite on pytest-xdist workers. Each module runs whole on one worker, so its
# fixtures are built once; modules that share a session fixture's model and server share a worker.
SHARED_GROUPS = {"test_serving": "trained-model", "test_reliability_service": "trained-model",
                 "test_vllm": "trained-model", "test_e2e_operations": "operated",
                 "test_reliability_data": "operated"}  # fmt: skip
# The longest groups first (minutes measured on a clean clone): one started last would run alone.
LONGEST_FIRST = ["operated", "test_bench", "test_e2e_experiments", "trained-model", "test_e2e_corpora",
                 "test_e2e_data", "test_reliability_train", "test_reliability_storage", "test_ray_engine"]  # fmt: skip


def test_group(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return SHARED_GROUPS.get(module, module)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        group = test_group(item.nodeid)
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order, and stay together


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole groups to a worker, in collection order. (xdist's own loadgroup reads the groups from node
    ids that pytest 9 no longer lets a plugin rename.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return test_group(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


SLOW_SECONDS = 30.0
_durations: dict[str, float] = {}
_unmarked: dict[str, bool] = {}


def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    if report.when == "call":
        _unmarked[report.nodeid] = "slow" not in report.keywords


def pytest_terminal_summary(terminalreporter):
    late = {node: s for node, s in _durations.items() if s > SLOW_SECONDS and _unmarked.get(node)}
    if late:
        terminalreporter.section(f"tests over {SLOW_SECONDS:.0f} s not marked slow")
        for node, seconds in sorted(late.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:7.1f} s  {node}")
