"""The Ray engine (`data.engine=ray`) on a real local Ray cluster: the same report and the same bytes as the
local engine, errors that name the file, S3 read by the tasks themselves, a cluster of its own on loopback
only, and an external cluster from RAY_ADDRESS.

One cluster serves the module's in-process tests (the engine uses a cluster that is already up, and
leaves it up); the lifecycle and RAY_ADDRESS tests run in processes of their own.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.s3 import s3_client
from lmforge.data.corpus import open_corpus
from lmforge.data.formats import CorpusError
from lmforge.data.ray_engine import SINGLE_MACHINE, RayEngine
from lmforge.data.validation_report import write_report
from lmforge.params_file import resolve_params
from pipeline.preprocess import preprocess
from pipeline.validate import validate_corpus

from .conftest import POEM_LINES, chat_records, free_port, stop_group, write_jsonl

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
LOW = [
    "validation.min_documents=3",
    "validation.min_total_chars=100",
    "validation.max_dropped_fraction=0.2",
    "preprocess.vocab_size=600",
    "preprocess.shard_tokens=4096",  # several shards per split: their boundaries must agree too
    "data.ray_batch_docs=16",  # many batches per file: their order must hold
]


def mixed_corpus(root: Path) -> Path:
    """Every format and layout, in two languages, with what the filter must catch: duplicate documents
    and paragraphs across files, a lone surrogate, control characters, an empty record, a file to skip."""
    rng = random.Random(0)
    docs = [t.strip() for t in topics.values() if len(t.strip()) > 200]
    paras = [p.strip() for t in docs for p in t.split("\n\n") if len(p.strip()) > 40]
    rng.shuffle(paras)
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("\n\n".join(paras[:300]) + "\n")
    (root / "docs" / "b.md").write_text("\n\n".join(paras[250:450]) + "\n")  # 50 paragraphs seen in a.txt
    with gzip.open(root / "lines.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(p.replace("\n", " ") for p in paras[450:700]) + "\n")
    records = [{"text": t} for t in docs[:150]]
    records += [{"text": "lone \ud800 surrogate " + paras[0]}, {"text": "\x01\x02\x03" * 40}, {"text": ""}]
    records += [{"text": docs[3]}, {"text": POEM_LINES[:6]}]  # an exact duplicate; a poem's lines as a list
    (root / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    poems = ["\n".join(POEM_LINES[i : i + 4]) for i in range(0, len(POEM_LINES) - 4, 2)]
    pq.write_table(pa.table({"text": poems + docs[150:250]}), root / "mixed.parquet")
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    return root


def tree_digest(*dirs: Path) -> dict[str, str]:
    return {
        f"{d.name}/{p.relative_to(d)}": hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirs
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module (what the engine starts, entered here so it stays up)."""
    engine = RayEngine(resolve_params({}, ["data.engine=ray", "data.ray_cpus=2"]).data)
    with engine:
        yield engine


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return mixed_corpus(tmp_path_factory.mktemp("ray-corpus") / "corpus")


def run_stages(corpus: Path | object, out: Path, params) -> dict[str, str]:
    report = validate_corpus(corpus, params, name="corpus")
    write_report(report, out / "validation")
    preprocess(corpus, out / "tokenizer", out / "shards", params)
    return tree_digest(out / "validation", out / "tokenizer", out / "shards")


@pytest.mark.parametrize("near", [False, True], ids=["exact-dedup", "near-dedup"])
def test_both_engines_write_the_same_report_tokenizer_and_shards(ray_cluster, corpus, tmp_path, near):
    overrides = [*LOW, f"validation.near_duplicates={str(near).lower()}"]
    local = run_stages(corpus, tmp_path / "local", resolve_params({}, [*overrides, "data.engine=local"]))
    ray = run_stages(corpus, tmp_path / "ray", resolve_params({}, [*overrides, "data.engine=ray"]))
    assert ray == local
    # the corpus exercised what it is meant to: every format, drops of every kind, removed paragraphs
    report = json.loads((tmp_path / "ray" / "validation" / "report.json").read_text())
    stats = report["stats"]
    assert stats["files"] == 5 and stats["skipped_files"] == 1 and stats["empty_documents"] == 1
    assert stats["dropped_by_reason"]["nonprintable"] == 1 and stats["dropped_by_reason"]["duplicate"] >= 1
    assert stats["duplicate_paragraphs_removed"] >= 50
    layouts = {f["file"]: f["layout"] for f in report["files"]}
    assert layouts == {"docs/a.txt": "paragraphs", "docs/b.md": "paragraphs", "lines.txt.gz": "lines",
                       "mixed.parquet": None, "records.jsonl": None}  # fmt: skip
    manifest = json.loads((tmp_path / "ray" / "shards" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 3
    assert "encode_seconds" not in manifest  # a timing would differ run to run


def test_both_engines_write_the_same_conversation_shards(ray_cluster, tmp_path):
    """ingest.format=chat: conversations (JSONL with bad records, Parquet of message structs) validated,
    rendered and masked to the same bytes on both engines."""
    records = chat_records(300, bad_every=30) + chat_records(200, "zh", seed=4)
    corpus = tmp_path / "chats"
    write_jsonl(corpus / "a.jsonl", records[:300])
    pq.write_table(
        pa.table({"messages": [r["messages"] for r in records[300:] if "messages" in r]}),
        corpus / "b.parquet",
    )
    overrides = [*LOW, "ingest.format=chat", "preprocess.vocab_size=1000"]
    local = run_stages(corpus, tmp_path / "local", resolve_params({}, [*overrides, "data.engine=local"]))
    ray = run_stages(corpus, tmp_path / "ray", resolve_params({}, [*overrides, "data.engine=ray"]))
    assert ray == local
    report = json.loads((tmp_path / "ray" / "validation" / "report.json").read_text())
    assert report["stats"]["dropped_documents"] == 10
    assert any(name.endswith(".mask.bin") for name in ray)


def test_each_file_is_read_and_measured_in_a_task_of_its_own(ray_cluster, corpus):
    """The parallelism: one task per file, its read fused with the measure (not all files in one task,
    which is what Ray's bundling does when the measure asks for batches larger than one file)."""
    params = resolve_params({}, [*LOW, "data.engine=ray"])
    source = open_corpus(corpus)
    with RayEngine(params.data) as engine:
        facts = list(engine.facts(source, params))
    assert len(facts) == sum(cf.documents for cf in source.files) > 300
    assert "MapBatches(_read_files)->MapBatches(_measure): 5 tasks executed" in engine.stats[-1], engine.stats


def test_a_truncated_file_fails_naming_it_as_on_the_local_engine(ray_cluster, corpus, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(50)))
    whole = gzip.compress(
        b"".join(json.dumps({"text": f"more {i} " * 30}).encode() + b"\n" for i in range(200))
    )
    (bad / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    messages = {}
    for engine in ("local", "ray"):
        with pytest.raises(CorpusError) as failed:
            validate_corpus(bad, resolve_params({}, [*LOW, f"data.engine={engine}"]))
        messages[engine] = str(failed.value)
    assert messages["ray"] == messages["local"]
    assert messages["ray"].startswith("b.jsonl.gz: truncated or corrupt .jsonl.gz file")


def test_validate_reads_an_s3_prefix_from_the_tasks(ray_cluster, corpus, s3_server, tmp_path):
    client = s3_client(s3_server.cfg, s3_server.state)
    bucket = s3_server.cfg.bucket
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"ray-corpus/v1/{path.relative_to(corpus).as_posix()}")
    client.put_object(Bucket=bucket, Key="ray-corpus/v10/other.txt", Body=b"a sibling prefix, not read")
    env = dict(os.environ, LMFORGE_ROOT=str(tmp_path), LMFORGE_STATE_DIR=str(s3_server.state))
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    overrides = [f"storage.endpoint_url={s3_server.cfg.endpoint_url}", f"storage.bucket={bucket}", *LOW]
    reports = {}
    for engine in ("local", "ray"):
        args = [a for o in [*overrides, f"data.engine={engine}"] for a in ("-p", o)]
        done = subprocess.run(
            [BIN / "lmforge", "validate", f"s3://{bucket}/ray-corpus/v1", *args, "--report-dir", tmp_path / engine],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        reports[engine] = json.loads((tmp_path / engine / "report.json").read_text())
    assert reports["ray"] == reports["local"]  # the local engine downloads the prefix first; ray reads it
    assert reports["ray"]["stats"]["files"] == 5


def test_a_cluster_of_its_own_listens_on_loopback_only_and_stops_after(tmp_path):
    """The engine's own cluster, in a process of its own: every socket of every Ray process on 127.0.0.1,
    no dashboard, and no Ray process left once the stage is done."""
    script = """
import json, os, re, subprocess, sys
from infra.processes import descendants
from lmforge.params_file import resolve_params
from lmforge.data.ray_engine import RayEngine
engine = RayEngine(resolve_params({}, ["data.engine=ray", "data.ray_cpus=1"]).data)
with engine:
    import ray
    tree = {os.getpid(), *descendants(os.getpid())}
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    listening = [l.split()[3] for l in lines if tree & {int(p) for p in re.findall(r"pid=(\\d+)", l)}]
    inside = {"listening": listening, "ray_processes": len(descendants(os.getpid())),
              "dashboard": engine.context.dashboard_url, "tasks_ran": ray.get(ray.remote(lambda: 1).remote())}
print(json.dumps({**inside, "left": len(descendants(os.getpid()))}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *SINGLE_MACHINE)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["ray_processes"] >= 2 and len(seen["listening"]) >= 3  # GCS, raylet, workers
    assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in seen["listening"]), seen
    assert not seen["dashboard"] and seen["tasks_ran"] == 1
    assert seen["left"] == 0


def test_an_external_cluster_from_ray_address_is_used_and_left_running(corpus, tmp_path):
    """docs/scaling.md's commands for a cluster: `ray start --head`, a second node joining it with
    `ray start --address`, then the stage with RAY_ADDRESS. The tasks run on that cluster of two nodes
    (lmforge's modules shipped to it), which is still up after the stage."""
    port = free_port()
    # not this process's single-machine mode (the module's own cluster set it), which refuses a second node
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *SINGLE_MACHINE)}
    # Ray's session dir stays under /tmp/ray (its socket paths must be short); `ray start` enables token
    # auth, and a client given an address sends the token (~/.ray/auth_token) only with RAY_AUTH_MODE set.
    # Not single-machine mode, which refuses a second node: --node-ip-address keeps both on loopback.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    ray = [BIN / "ray"]
    # --block keeps each node's processes under its own, so stopping it stops only this cluster
    head_cmd = [
        *ray,
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--block",
    ]
    node_cmd = [*ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--block"]
    log, node_log = tmp_path / "head.log", tmp_path / "node.log"
    nodes = []

    def wait_for(cpus: str) -> None:
        for _ in range(120):
            for proc, out in zip(nodes, (log, node_log), strict=False):
                assert proc.poll() is None, out.read_text()[-3000:]
            up = subprocess.run([*ray, "status", f"--address=127.0.0.1:{port}"], capture_output=True,
                                text=True, env=env)  # fmt: skip
            if up.returncode == 0 and f"{cpus} CPU" in up.stdout:
                return
            time.sleep(1)
        raise AssertionError(f"the cluster never showed {cpus} CPU: {up.stdout[-2000:]} {up.stderr[-2000:]}")

    try:
        for cmd, out in ((head_cmd, log), (node_cmd, node_log)):
            with out.open("wb") as fh:
                nodes.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))  # fmt: skip
            wait_for("2.0" if cmd is head_cmd else "3.0")
        assert not list(session_dir(log).glob("runtime_resources/py_modules_files/*"))
        stage_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{port}", LMFORGE_ROOT=str(tmp_path))
        (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
        args = [a for o in [*LOW, "data.engine=ray"] for a in ("-p", o)]
        done = subprocess.run(
            [BIN / "lmforge", "validate", corpus, *args, "--report-dir", tmp_path / "report"],
            capture_output=True, text=True, env=stage_env, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        # (Ray names the head by this host's address, whatever address the client was given)
        pattern = rf"data.engine=ray: connected to Ray cluster at \S+:{port} \(2 node\(s\), 3 CPUs\)"
        assert re.search(pattern, done.stderr), done.stderr[-2000:]
        assert json.loads((tmp_path / "report" / "report.json").read_text())["stats"]["files"] == 5
        wait_for("3.0")  # still up, both nodes
        # the stage ran its tasks there: the cluster holds the modules it shipped (pipeline, infra, lmforge)
        shipped = list(session_dir(log).glob("runtime_resources/py_modules_files/*/*"))
        assert {p.name for p in shipped} == {"pipeline", "infra", "lmforge"}, shipped
    finally:
        for proc in reversed(nodes):
            stop_group(proc, signal.SIGTERM, grace=60)


def session_dir(head_log: Path) -> Path:
    """The session directory `ray start` names in its output (once it has printed it)."""
    for _ in range(60):
        if found := re.search(r"(/\S+/session_[^/\s]+)/logs", head_log.read_text()):
            return Path(found.group(1))
        time.sleep(0.5)
    raise AssertionError(f"no session directory in {head_log}: {head_log.read_text()[-2000:]}")


def test_an_unreachable_cluster_is_named(corpus, tmp_path):
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [BIN / "lmforge", "validate", corpus, "-p", "data.engine=ray", "-p", f"data.ray_address={address}"],
        capture_output=True, text=True, env=dict(os.environ, LMFORGE_ROOT=str(tmp_path)), timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"data.engine=ray: cannot reach the Ray cluster at {address}" in done.stderr
