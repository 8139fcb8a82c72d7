"""Reliability of the data path: every kind of bad corpus, and S3 sources that fail, against a workspace
that already has a champion. None of them may change data/, data.dvc, the checkpoints, the remote or
the champion record.

One real workspace for the module: a real `lmforge run` makes the champion first (real SeaweedFS,
real DVC, torchrun, Prefect), then each bad source goes through `lmforge ingest`, which is the
function the flow's ingest task calls, and a few go through the whole flow.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from lmforge.params_file import load_params, write_overrides
from lmforge.runs.registry import read_champion

from .conftest import S3Server
from .test_e2e_data import BIN, free_port, object_count, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Built at run time, so that the repository itself holds no string a secret scanner would flag.
FAKE_AWS_KEY = "AKIA" + "IOSFODNN7EXAMPL3"
FAKE_GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2
FAKE_KEY_HEADER = "-----BEGIN " + "RSA PRIVATE KEY-----"


def good_text(seed: int = 0, docs: int = 60) -> str:
    """The body of a corpus that passes every check (as in words_corpus), as plain paragraphs."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 9))) for _ in range(800)]
    return "\n\n".join(" ".join(rng.choice(vocab) for _ in range(400)) + "." for _ in range(docs))


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


# Each case writes a bad source under the given directory and returns the path to ingest; the second
# item is what the error must say, naming the problem.
BadCorpus = Callable[[Path], Path]


def mixed_encodings(d: Path) -> Path:
    write(d / "src" / "a_good.txt", good_text(1))
    write(d / "src" / "b_latin1.txt", ("café naïve résumé " * 2000).encode("latin-1"))
    return d / "src"


def symlink_loop_dir(d: Path) -> Path:
    write(d / "src" / "docs.txt", good_text(2))
    (d / "src" / "again").symlink_to(d / "src")
    return d / "src"


def symlink_loop_file(d: Path) -> Path:
    write(d / "src" / "docs.txt", good_text(3))
    (d / "src" / "x.txt").symlink_to(d / "src" / "y.txt")
    (d / "src" / "y.txt").symlink_to(d / "src" / "x.txt")
    return d / "src"


def fifo(d: Path) -> Path:
    write(d / "src" / "docs.txt", good_text(4))
    os.mkfifo(d / "src" / "pipe.txt")  # reading it would block forever
    return d / "src"


def giant_record(d: Path) -> Path:
    """One 50 MB JSONL document (a JSONL record is never cut: it is the user's own document)."""
    rng = random.Random(5)
    words = " ".join(rng.choice("abcdefghij") * rng.randint(1, 8) for _ in range(5000))
    with (d / "giant.jsonl").open("w") as fh:
        fh.write(json.dumps({"text": (words + " ") * (50 * 2**20 // len(words))}) + "\n")
    return d / "giant.jsonl"


def mostly_bad(d: Path) -> Path:
    """20% of the documents are binary noise or far too long: dropped, and too many of them."""
    docs = good_text(12, 100).split("\n\n")
    for i in range(0, 100, 5):
        docs[i] = "\x00\x01\x02\x03" * 200 if i % 10 else "y" * 2_000_000
    return write(d / "c.jsonl", jsonl([{"text": t} for t in docs]))


def truncated_gzip(d: Path) -> Path:
    packed = gzip.compress(jsonl([{"text": t} for t in good_text(13).split("\n\n")]).encode())
    return write(d / "src" / "docs.jsonl.gz", packed[: len(packed) // 2])


def nothing_readable(d: Path) -> Path:
    write(d / "src" / "table.csv", "a,b\n1,2\n")
    write(d / "src" / "scan.pdf", b"%PDF-1.4")
    return d / "src"


BAD_CORPORA: dict[str, tuple[BadCorpus, str]] = {
    "empty": (lambda d: write(d / "c.txt", ""), "min_documents: observed 0"),
    "whitespace_only": (lambda d: write(d / "c.txt", "  \n\n\t \n   \n\n"), "min_documents: observed 0"),
    "binary_garbage": (lambda d: write(d / "c.txt", random.Random(1).randbytes(300_000)), "utf8:"),
    "latin1": (
        lambda d: write(d / "c.txt", (good_text(6) + " café déjà vu").encode("latin-1")),
        "utf8: observed",
    ),
    "mixed_encodings": (mixed_encodings, "example: b_latin1.txt"),
    "giant_record_50mb": (giant_record, "doc_length:"),
    "mostly_bad_20pct": (
        mostly_bad,
        "dropped_fraction: observed 20 of 100 documents (20.00%): nonprintable 10, too_long 10",
    ),
    "truncated_gzip": (truncated_gzip, "docs.jsonl.gz: truncated or corrupt .jsonl.gz file"),
    "parquet_without_the_text_column": (
        lambda d: _parquet(d / "c.parquet", {"body": good_text(14).split("\n\n")}),
        "c.parquet: no 'text' column (its columns: body)",
    ),
    "nothing_readable": (nothing_readable, "nothing readable; a corpus needs files of"),
    "duplicates_over_90pct": (
        lambda d: write(
            d / "c.txt", "\n\n".join(["one paragraph said again. " * 40] * 300 + [good_text(7, 5)])
        ),
        "duplicate_ratio:",
    ),
    "jsonl_missing_text": (
        lambda d: write(d / "c.jsonl", jsonl([{"text": "fine"}] * 3 + [{"body": "no text key"}])),
        "c.jsonl:4: JSONL record has no 'text' field",
    ),
    "jsonl_wrong_type": (
        lambda d: write(d / "c.jsonl", jsonl([{"text": "fine"}, {"text": 42}])),
        "c.jsonl:2: 'text' must be a string, got int",
    ),
    "jsonl_truncated": (
        lambda d: write(d / "c.jsonl", jsonl([{"text": good_text(8, 3)}] * 30)[:-40]),
        "c.jsonl:30: not valid JSON",
    ),
    "aws_key_in_text": (
        lambda d: write(d / "c.txt", good_text(9) + f"\n\nour key is {FAKE_AWS_KEY} do not share"),
        "secret:aws_access_key_id:",
    ),
    "github_token_in_text": (
        lambda d: write(d / "c.txt", good_text(10) + f"\n\ntoken={FAKE_GITHUB_TOKEN}"),
        "secret:github_token:",
    ),
    "private_key_in_text": (
        lambda d: write(d / "c.txt", good_text(11) + f"\n\n{FAKE_KEY_HEADER}\nMIIEow...\n"),
        "secret:private_key_block:",
    ),
    "too_few_documents": (
        lambda d: write(d / "c.jsonl", jsonl([{"text": good_text(seed, 10)} for seed in range(5)])),
        "min_documents: observed 5",
    ),
    "symlink_loop_dir": (symlink_loop_dir, "symlink loop"),
    "symlink_loop_file": (symlink_loop_file, "x.txt: cannot read (Too many levels of symbolic links)"),
    "fifo_not_a_file": (fifo, "pipe.txt: not a regular file"),
    "shrinks_to_10pct": (lambda d: write(d / "c.txt", ""), "shrinkage:"),  # written by the test
}


@pytest.fixture(scope="module")
def champion_ws(operated):
    """The operations tests' workspace, whose champion was trained on a real corpus of ~150k characters.
    Every test here leaves it as it found it (each checks that it did)."""
    ws = operated["ws"]
    # a small corpus may be valid on its own: only the shrink guard should stop a tenth of this one
    write_overrides(ws, ["validation.min_total_chars=5000"])
    return ws, operated["env"], operated["bucket"], operated["corpus"], operated["s3"]


def tenth_of(corpus: Path, tmp_path: Path) -> Path:
    """The first tenth of the champion's documents: the same kind of data, 10% of its size."""
    lines = (corpus / "docs.jsonl").read_text().splitlines()
    return write(tmp_path / "small" / "docs.jsonl", "\n".join(lines[: len(lines) // 10]) + "\n")


def snapshot(ws: Path, s3: S3Server, bucket: str) -> dict:
    """Everything a bad corpus must leave alone."""
    params = load_params(ws)
    files = {
        str(p.relative_to(ws)): hashlib.md5(p.read_bytes()).hexdigest()
        for top in ("data", "artifacts/checkpoints", "artifacts/model", "artifacts/shards")
        for p in sorted((ws / top).rglob("*"))
        if p.is_file()
    }
    return {
        "files": files,
        "data.dvc": (ws / "data.dvc").read_text(),
        "dvc.lock": (ws / "dvc.lock").read_text(),
        "champion": read_champion(params.storage, s3.state),
        "objects": object_count(s3, bucket),
        "leftovers": sorted(p.name for p in ws.iterdir() if p.name.startswith(".data-")),
    }


@pytest.mark.parametrize("case", list(BAD_CORPORA))
def test_bad_corpus_is_rejected_and_changes_nothing(case, champion_ws, tmp_path):
    ws, env, bucket, corpus, s3 = champion_ws
    make, message = BAD_CORPORA[case]
    if case == "shrinks_to_10pct":  # the same kind of data, a tenth of it: valid on its own
        source = tenth_of(corpus, tmp_path)
    else:
        source = make(tmp_path)
    before = snapshot(ws, s3, bucket)
    assert before["champion"].data_stats["total_chars"] > 100_000
    result = run([BIN / "lmforge", "ingest", "--source", source], ws, env, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if case == "shrinks_to_10pct":  # valid on its own: the guard alone stops it
        assert result.stderr.count("observed") == 1, result.stderr
    for secret in (FAKE_AWS_KEY, FAKE_GITHUB_TOKEN):
        assert secret not in result.stdout + result.stderr  # named, never echoed
    assert snapshot(ws, s3, bucket) == before


@pytest.mark.parametrize("case", ["binary_garbage", "shrinks_to_10pct"])
def test_the_flow_stops_before_training(case, champion_ws, tmp_path):
    """Through `lmforge run`: the ingest task fails, no stage runs, nothing is promoted."""
    ws, env, bucket, corpus, s3 = champion_ws
    if case == "shrinks_to_10pct":
        source = tenth_of(corpus, tmp_path)
    else:
        source = BAD_CORPORA[case][0](tmp_path)
    before = snapshot(ws, s3, bucket)
    result = run([BIN / "lmforge", "run", "--source", source], ws, env, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    assert BAD_CORPORA[case][1] in out and "data/ is unchanged" in out
    for stage in ("validate", "preprocess", "train", "publish"):
        assert f"Task run '{stage}" not in out
    assert snapshot(ws, s3, bucket) == before


def test_shrink_guard_can_be_turned_off_on_purpose(champion_ws, tmp_path):
    """A deliberate shrink is allowed with the param the error names; it is not a hidden default."""
    ws, env, bucket, corpus, s3 = champion_ws
    before = snapshot(ws, s3, bucket)
    lines = (corpus / "docs.jsonl").read_text().splitlines()
    source = write(tmp_path / "small" / "docs.jsonl", "\n".join(lines[:100]) + "\n")
    result = run(
        [
            BIN / "lmforge",
            "ingest",
            "--source",
            source,
            "--no-push",
            "-p",
            "validation.min_fraction_of_champion=0",
        ],
        ws,
        env,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        assert (ws / "data" / "docs.jsonl").read_bytes() == source.read_bytes()
    finally:  # put the champion's corpus back for the other tests
        run([BIN / "lmforge", "ingest", "--source", corpus, "--no-push"], ws, env)
    assert snapshot(ws, s3, bucket) == before


def test_s3_source_failures_are_clear_retried_when_useful_and_change_nothing(champion_ws):
    ws, env, bucket, _, s3 = champion_ws
    before = snapshot(ws, s3, bucket)
    # a prefix with nothing under it, and a bucket that does not exist: no retry can help
    for source, message in {
        f"s3://{bucket}/incoming/missing": "no objects under that prefix",
        "s3://no-such-bucket-here/x": "no such bucket",
    }.items():
        result = run([BIN / "lmforge", "run", "--source", source], ws, env, check=False)
        out = result.stdout + result.stderr
        assert result.returncode == 1 and message in out, out[-3000:]
        assert "Retry 1/2" not in out
    # wrong credentials: refused at once, not retried
    bad_keys = dict(env, AWS_ACCESS_KEY_ID="WRONGKEY", AWS_SECRET_ACCESS_KEY="s3cr3t-Zq9-never-shown")
    result = run([BIN / "lmforge", "run", "--source", f"s3://{bucket}/x"], ws, bad_keys, check=False)
    out = result.stdout + result.stderr
    refused = "refused the credentials" in out or "denied access (403): check the access key" in out
    assert result.returncode == 1 and refused and "Retry 1/2" not in out, out[-3000:]
    assert "s3cr3t-Zq9" not in out
    # the endpoint is down: a retry may help, so it is retried, then fails with the reason
    dead = f"http://127.0.0.1:{free_port()}"
    params_yaml = (ws / "params.yaml").read_text()
    result = run(
        [BIN / "lmforge", "run", "--source", f"s3://{bucket}/x", "-p", f"storage.endpoint_url={dead}"],
        ws,
        env,
        check=False,
    )
    (ws / "params.yaml").write_text(params_yaml)  # -p persists overrides, as `dvc exp run -S` does
    out = result.stdout + result.stderr
    assert result.returncode == 1 and f"S3 endpoint {dead} is not reachable" in out, out[-3000:]
    assert "Retry 1/2" in out and "Retry 2/2" in out
    assert snapshot(ws, s3, bucket) == before
