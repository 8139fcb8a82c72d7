"""End to end, for real: SeaweedFS, the dvc CLI, Prefect (ephemeral and a real server), the lmforge CLI.

Each test works in a fresh git workspace copied from this repo, with its own bucket on the session's
SeaweedFS, so that "nothing was pushed" can be checked by counting objects.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from infra.dvc import copy_project
from infra.s3 import s3_client
from lmforge.params_file import write_overrides
from lmforge.runs.contracts import Decision

from .conftest import TINY, free_port, lag2_corpus
from .test_evaluate_gate import reference_bits_per_byte

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHAKESPEARE = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"
needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (only on dev machines)"
)


def run(
    cmd: list, cwd: Path, env: dict, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, text=True).stdout


def make_workspace(
    ws: Path, s3_server, name: str, prefect_api: str | None, processes: int = 1
) -> tuple[Path, dict, str]:
    """A git workspace at ws holding this repo's files, pointed at its own bucket on the test S3 server;
    its flow runs report to the Prefect server at prefect_api, or to an ephemeral one if that is None.
    Training runs under real torchrun with `processes` ranks: 1 where the flow, not DDP, is under test
    (each rank imports torch and transformers for itself: about 16 s of a core here), 2 for DDP."""
    copy_project(REPO, ws)
    bucket = f"ws-{abs(hash(name)) % 10**8}-{random.Random().randint(0, 10**6)}"
    # tiny model and run; the preprocess vocab stays large enough
    tiny = [o for o in TINY if not o.startswith("preprocess.vocab_size")] + [
        f"train.nproc_per_node={processes}",
        "preprocess.vocab_size=1024",
    ]
    write_overrides(
        ws, [f"storage.endpoint_url={s3_server.cfg.endpoint_url}", f"storage.bucket={bucket}", *tiny]
    )
    git(ws, "init", "-q")
    git(ws, "add", "-A")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "workspace")
    env = dict(
        os.environ, LMFORGE_STATE_DIR=str(s3_server.state), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}"
    )
    env.pop("PREFECT_API_URL", None)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    run([BIN / "lmforge", "up"], ws, env)
    return ws, env, bucket


@pytest.fixture
def workspace(tmp_path, s3_server, prefect_api, request):
    return make_workspace(tmp_path / "ws", s3_server, request.node.name, prefect_api)


# enough steps for the tiny model to beat the bigram by the default margin on lag2_corpus
PASSING_TRAINING = [
    "train.max_steps=400",
    "train.batch_size=16",
    "train.lr=0.01",
    "train.min_lr=0.001",
    "model.n_embd=64",
    "train.eval_every=100",
    "train.checkpoint_every=100",
]


def object_count(s3_server, bucket: str) -> int:
    pages = s3_client(s3_server.cfg, s3_server.state).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sum(page.get("KeyCount", 0) for page in pages)


def words_corpus(path: Path, docs: int = 60, seed: int = 0) -> Path:
    """A valid synthetic corpus: enough distinct documents and characters for the default bounds."""
    rng = random.Random(seed)
    vocab = [
        ("".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 9)))) for _ in range(800)
    ]
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(400)) + "."}) for _ in range(docs)]
    (path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return path


def bentos_in_store(env: dict) -> set[str]:
    listing = run([BIN / "bentoml", "list", "lmforge", "-o", "json"], REPO, env)
    return {b["tag"] for b in json.loads(listing.stdout)}


def wait_json(url: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """GET url once the server answers; fails with the server's output if it dies first."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            assert time.time() < deadline, f"{url} did not answer in {timeout} s"
            time.sleep(0.5)


@contextlib.contextmanager
def lmforge_serve(ws: Path, env: dict) -> Iterator[tuple[dict, subprocess.Popen, str]]:
    """`lmforge serve` (the champion, on a free port) in ws: its /v1/models reply once it answers, the
    process, which is stopped afterwards, and its URL."""
    port = free_port()
    server = subprocess.Popen(
        [BIN / "lmforge", "serve", "--port", str(port)], cwd=ws, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield wait_json(f"http://127.0.0.1:{port}/v1/models", server), server, f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def summary_value(stdout: str, label: str) -> str:
    line = next(line for line in stdout.splitlines() if line.strip().startswith(label))
    return line.split(label, 1)[1].strip()


def test_two_dataset_versions_round_trip_through_s3(workspace, s3_server, tmp_path):
    ws, env, bucket = workspace
    lmforge = BIN / "lmforge"
    v1 = lag2_corpus(tmp_path / "v1") / "docs.jsonl"  # a single file, then a directory with a subdirectory
    v2 = tmp_path / "v2"
    (v2 / "sub").mkdir(parents=True)
    lag2_corpus(tmp_path / "poems", seed=1).joinpath("docs.jsonl").rename(v2 / "poems.jsonl")
    words_corpus(tmp_path / "words").joinpath("docs.jsonl").rename(v2 / "sub" / "words.jsonl")

    first = run([lmforge, "run", "--source", v1, *(a for o in PASSING_TRAINING for a in ("-p", o))], ws, env)
    assert "gate          PROMOTED" in first.stdout, first.stdout[-3000:]
    assert yaml.safe_load((ws / "params.yaml").read_text())["ingest"]["source"] == str(v1)
    md5_first = summary_value(first.stdout, "dataset md5")
    assert md5_first.endswith(".dir") and "tokens        train" in first.stdout
    assert (ws / "data" / "docs.jsonl").read_bytes() == v1.read_bytes()
    git(ws, "add", "data.dvc", "dvc.lock")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    champion_model = shutil.copytree(ws / "artifacts" / "model", tmp_path / "v1-model")

    short = ["train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=40"]
    second = run([lmforge, "run", "--source", v2, *(a for o in short for a in ("-p", o))], ws, env)
    # the gate re-scored the champion (pulled from the remote) on v2's val text, with the champion's own
    # tokenizer: the figure in gate.json is that, not the champion record's figure from v1's val split
    decision = Decision.load(ws / "artifacts" / "gate.json")
    scored = json.loads((ws / "artifacts" / "eval" / "scores.json").read_text())["val"]["documents"]
    v2_val = [
        json.loads(line)["text"] for line in (ws / "artifacts/shards/val.jsonl").read_text().splitlines()
    ]
    v2_val = [t for t in v2_val if hashlib.sha256(t.encode()).hexdigest()[:16] in scored]
    expected, nbytes = reference_bits_per_byte(champion_model, v2_val)
    compared = decision.head_to_head["champion"]["val"]
    assert (
        compared["other_bits_per_byte"] == pytest.approx(expected, rel=1e-5) and compared["bytes"] == nbytes
    )
    assert compared["documents"] == len(scored) == len(v2_val) > 5
    assert (
        abs(expected / decision.champion.metrics["val_bits_per_byte"] - 1) > 0.01
    )  # another text, another figure
    figures = json.loads((ws / "artifacts" / "gate_metrics.json").read_text())
    assert figures["champion_val_bits_per_byte"] == compared["other_bits_per_byte"]
    assert (
        f"vs champion   {compared['other_bits_per_byte']:.4f} bits/byte on the same val text" in second.stdout
    )
    md5_second = summary_value(second.stdout, "dataset md5")
    url = summary_value(second.stdout, "data in S3")
    assert md5_second != md5_first and url == f"s3://{bucket}/dvc/files/md5/{md5_second[:2]}/{md5_second[2:]}"
    # the printed location is a real object in S3: the .dir listing of the dataset
    listing = s3_client(s3_server.cfg, s3_server.state).get_object(
        Bucket=bucket, Key=url.split(f"{bucket}/", 1)[1]
    )
    assert {entry["relpath"] for entry in json.loads(listing["Body"].read())} == {
        "poems.jsonl",
        "sub/words.jsonl",
    }
    # --source is recorded as -p is: the next run, without one, trains on v2 (not the builtin default),
    # and a longer max_steps continues the run from its last checkpoint
    assert yaml.safe_load((ws / "params.yaml").read_text())["ingest"]["source"] == str(v2)
    longer = run([lmforge, "run", "-p", "train.max_steps=60"], ws, env)
    assert summary_value(longer.stdout, "dataset md5") == md5_second
    assert "resuming from step_000040" in longer.stdout + longer.stderr, longer.stdout[-3000:]
    git(ws, "add", "data.dvc", "dvc.lock")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v2")

    # nothing changed: DVC skips every stage but the gate, whose champion lives outside DVC
    again = run([BIN / "dvc", "repro"], ws, env)
    for stage in ("validate", "preprocess", "train", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout
    assert "Running stage 'gate'" in again.stdout and "Running stage 'train'" not in again.stdout

    # a clean clone has no cache: it gets both versions back from S3, byte for byte
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    assert not (clone / ".dvc" / "cache").exists()
    run([lmforge, "up"], clone, env)
    run([BIN / "dvc", "pull"], clone, env)
    for sub in (
        "data",
        "artifacts/shards",
        "artifacts/tokenizer",
        "artifacts/model",
        "artifacts/checkpoints",
    ):
        cmp = filecmp.dircmp(ws / sub, clone / sub)
        assert not (cmp.diff_files or cmp.left_only or cmp.right_only), sub
        assert all(filecmp.cmp(ws / sub / f, clone / sub / f, shallow=False) for f in cmp.common_files)
    git(clone, "checkout", "-q", "HEAD~1")
    run([BIN / "dvc", "pull"], clone, env)
    assert [p.name for p in (clone / "data").iterdir()] == ["docs.jsonl"]
    assert (clone / "data" / "docs.jsonl").read_bytes() == v1.read_bytes()


def test_a_bad_corpus_fails_the_flow_on_an_ephemeral_prefect_server_and_nothing_is_pushed(
    workspace, s3_server, tmp_path
):
    """A user without `lmforge up --prefect`: the run starts (and stops) Prefect's temporary server, and
    a binary corpus fails it before any stage runs. Every other bad corpus, through `lmforge ingest`
    and `lmforge run`, is test_reliability_data's."""
    ws, env, bucket = workspace
    good = words_corpus(tmp_path / "good")
    run([BIN / "lmforge", "ingest", "--source", good], ws, env)
    data_dvc, pushed = (ws / "data.dvc").read_text(), object_count(s3_server, bucket)
    assert pushed > 0
    bad = tmp_path / "bad" / "corpus.txt"
    bad.parent.mkdir()
    bad.write_bytes(random.Random(1).randbytes(300_000))
    ephemeral = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    result = run([BIN / "lmforge", "run", "--source", bad.parent], ws, ephemeral, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "data/ is unchanged" in out and "utf8" in out, out[-3000:]
    assert "Starting temporary server" in out
    assert (ws / "data.dvc").read_text() == data_dvc and object_count(s3_server, bucket) == pushed
    assert (ws / "data" / "docs.jsonl").read_bytes() == (good / "docs.jsonl").read_bytes()
    assert not (ws / "artifacts" / "shards").exists()


def test_ingest_from_s3_prefix_and_its_failures(workspace, s3_server, tmp_path):
    ws, env, bucket = workspace
    good = words_corpus(tmp_path / "good", seed=3)
    client = s3_client(s3_server.cfg, s3_server.state)
    client.upload_file(str(good / "docs.jsonl"), bucket, "incoming/v1/docs.jsonl")
    result = run([BIN / "lmforge", "ingest", "--source", f"s3://{bucket}/incoming/v1"], ws, env)
    assert "dataset md5" in result.stdout
    assert (ws / "data" / "docs.jsonl").read_bytes() == (good / "docs.jsonl").read_bytes()
    data_dvc = (ws / "data.dvc").read_text()
    failures = {
        f"s3://{bucket}/incoming/missing": "no objects under that prefix",
        "s3://no-such-bucket-here/x": "no such bucket",
    }
    for source, message in failures.items():
        result = run([BIN / "lmforge", "ingest", "--source", source], ws, env, check=False)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert (ws / "data.dvc").read_text() == data_dvc
    bad_keys = dict(env, AWS_ACCESS_KEY_ID="WRONG", AWS_SECRET_ACCESS_KEY="wrong")
    result = run(
        [BIN / "lmforge", "ingest", "--source", f"s3://{bucket}/incoming/v1", "--no-push"],
        ws,
        bad_keys,
        check=False,
    )
    assert result.returncode == 1 and "refused the credentials" in result.stderr
    assert (ws / "data.dvc").read_text() == data_dvc


def test_lmforge_validate_checks_a_corpus_without_touching_data(workspace, s3_server, tmp_path):
    ws, env, bucket = workspace
    good = words_corpus(tmp_path / "good")
    ok = run([BIN / "lmforge", "validate", good, "--report-dir", tmp_path / "report"], ws, env, check=False)
    assert ok.returncode == 0 and "60 documents read, 60 kept" in ok.stdout
    assert json.loads((tmp_path / "report" / "report.json").read_text())["success"] is True
    # an s3:// prefix goes through the same reader (fetched into a scratch dir that is removed after)
    client = s3_client(s3_server.cfg, s3_server.state)
    client.upload_file(str(good / "docs.jsonl"), bucket, "check/v1/docs.jsonl")
    client.put_object(Bucket=bucket, Key="check/v1/README.pdf", Body=b"%PDF-1.4")
    from_s3 = run([BIN / "lmforge", "validate", f"s3://{bucket}/check/v1"], ws, env, check=False)
    assert from_s3.returncode == 0, from_s3.stderr
    assert f"s3://{bucket}/check/v1: 1 file(s), 1 skipped (README.pdf)" in from_s3.stdout
    assert "60 documents read, 60 kept" in from_s3.stdout
    missing = run([BIN / "lmforge", "validate", f"s3://{bucket}/check/none"], ws, env, check=False)
    assert missing.returncode == 1 and "no objects under that prefix" in missing.stderr
    dup = tmp_path / "dup.txt"
    dup.write_text(("the same paragraph again and again. " * 20 + "\n\n") * 400)
    bad = run([BIN / "lmforge", "validate", dup], ws, env, check=False)
    assert bad.returncode == 1 and "duplicate_ratio" in bad.stderr
    missing = run([BIN / "lmforge", "validate", tmp_path / "nope"], ws, env, check=False)
    assert (
        missing.returncode == 1
        and "no such file or directory" in missing.stderr
        and "Traceback" not in missing.stderr
    )
    assert not (ws / "data").exists()


def api(url: str, body: dict | None = None, attempts: int = 5):
    """POST body to a Prefect API route; a 503 (its SQLite busy) is retried, as Prefect's client does."""
    request = urllib.request.Request(
        url, data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"}
    )
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(2**attempt)


@needs_shakespeare
@pytest.mark.demo
def test_demo_profile_on_tinyshakespeare_beats_the_bigram(workspace, s3_server):
    """The real demo sizes (about 3 minutes of 2-process training) on a corpus nobody here wrote.
    `make test-demo` runs it; `make test` leaves it out (test_run_record checks the recorded demo run of
    this very code instead)."""
    ws, env, bucket = workspace
    (ws / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write_overrides(ws, [f"storage.endpoint_url={s3_server.cfg.endpoint_url}", f"storage.bucket={bucket}"])
    result = run([BIN / "lmforge", "run", "--source", SHAKESPEARE], ws, env, timeout=1200)
    metrics = json.loads((ws / "artifacts" / "eval" / "metrics.json").read_text())
    assert metrics["val_perplexity"] < 0.8 * metrics["bigram_val_perplexity"], metrics
    assert "gate          PROMOTED" in result.stdout
    assert (ws / "artifacts" / "eval" / "loss_curve.png").is_file()
    print(json.dumps(metrics, indent=2))


def test_run_with_s3_down_fails_fast_and_changes_nothing(workspace, tmp_path):
    ws, env, _ = workspace
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = run(
        [
            BIN / "lmforge",
            "run",
            "--source",
            words_corpus(tmp_path / "good"),
            "-p",
            f"storage.endpoint_url={dead}",
        ],
        ws,
        env,
        check=False,
    )
    assert result.returncode == 1
    assert f"S3 endpoint {dead} is not reachable" in result.stdout + result.stderr
    assert time.monotonic() - start < 90
    assert not (ws / "data").exists() and not (ws / "data.dvc").exists()
