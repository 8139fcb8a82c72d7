"""The validate section: `lmforge validate` on one large JSONL file against bare reading and JSON decoding
of the same file, and the peak RSS per GB of corpus of validate and of preprocess on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Bench, figure, side
from infra.processes import bin_path
from pipeline.config import Workspace
from pipeline.contracts import Manifest

CORPUS_BYTES = {True: 32 << 20, False: 1 << 30}  # quick, full
BARE_DECODE = """import json, sys
chars = 0
with open(sys.argv[1], encoding="utf-8") as fh:
    for line in fh:
        chars += len(json.loads(line)["text"])
print(chars)
"""

# A small launcher between the bench and the measured command: a child forked from the bench itself
# would count the bench's own memory (torch and all) in its peak RSS until it execs.
RSS_LAUNCHER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=sys.stderr); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)"
)


def run(b: Bench) -> dict:
    """`lmforge validate FILE` (the CLI, start-up and GE included) against reading and json-decoding the same
    file in a bare Python loop; both in child processes of their own, so each peak RSS is its own."""
    corpus = b.tmp / "large.jsonl"
    b.log(f"validate: writing a {CORPUS_BYTES[b.quick] / 2**20:,.0f} MiB JSONL corpus")
    documents = write_large_corpus(corpus, CORPUS_BYTES[b.quick], b.ws.data)
    size = corpus.stat().st_size
    env = dict(os.environ, LMFORGE_ROOT=str(b.ws.root), TQDM_DISABLE="1")
    b.log("validate: bare read + json.loads")
    bare_seconds, bare_rss, _ = peak_rss_run([sys.executable, "-c", BARE_DECODE, str(corpus)], env)
    b.log("validate: lmforge validate")
    lmforge = [bin_path("lmforge"), "validate", str(corpus)]
    seconds, rss, out = peak_rss_run(lmforge, env)
    kept = next((line.strip() for line in out.splitlines() if "kept (" in line), "")

    b.log("validate: preprocess of the same corpus (bounded tokenizer sample)")
    large = Workspace(b.tmp / "large-ws")
    large.data.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(b.ws.root / name, large.root / name)
    (large.data / corpus.name).symlink_to(corpus)
    pre_env = dict(env, LMFORGE_ROOT=str(large.root))
    pre_seconds, pre_rss, _ = peak_rss_run([sys.executable, "-m", "pipeline.preprocess"], pre_env)
    manifest = Manifest.read(large.shards_dir)
    sample = manifest.tokenizer_sample
    return {
        "throughput": figure(
            "validate: MB/s on one large JSONL file",
            side("lmforge validate (CLI, GE suite, filter, report)", size / 1e6, "MB", seconds),
            side("bare read + json.loads of each line", size / 1e6, "MB", bare_seconds),
            note=f"{size / 2**30:.2f} GiB, {documents:,} documents ({kept}); the ratio is the share of bare "
            "decoding speed that the filter, measures and suite leave",
            documents=documents,
            bytes=size,
        ),
        "peak_rss": figure(
            "validate: peak RSS per GB of corpus",
            rss_side("lmforge validate, peak RSS", rss, size),
            None,
            note="GB of peak resident memory per GB of corpus (the targets are for full mode's 1 GiB file; "
            f"in quick mode start-up dominates both rows); bare read + json.loads peaked at {bare_rss / 1e9:.2f} GB",
            rss_bytes=rss,
            bare_rss_bytes=bare_rss,
        ),
        "preprocess_rss": figure(
            "preprocess: peak RSS per GB of corpus (same file)",
            rss_side("python -m pipeline.preprocess, peak RSS", pre_rss, size),
            note=f"the tokenizer learned from a sample of {sample['chars']:,} chars ({sample['documents']:,} "
            f"documents; preprocess.tokenizer_train_chars {b.params.preprocess.tokenizer_train_chars:,}); "
            f"{manifest.total_tokens:,} tokens in {pre_seconds:.0f} s, encode pass "
            f"{manifest.tokens_per_second:,} tok/s",
            rss_bytes=pre_rss,
            seconds=pre_seconds,
            tokenizer_sample=sample,
        ),
    }


def rss_side(what: str, rss_bytes: int, corpus_bytes: int) -> dict:
    """A side that is memory, not work per second: GB of peak RSS, and its rate per GB of corpus."""
    rss_gb = rss_bytes / 1e9
    return {
        "what": what,
        "amount": rss_gb,
        "unit": "GB RSS",
        "seconds": None,
        "rate": rss_gb / (corpus_bytes / 1e9),
    }


def peak_rss_run(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, output) of one command."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-S", "-c", RSS_LAUNCHER, *cmd], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, int(done.stdout.split()[-1]), done.stderr


def write_large_corpus(path: Path, target_bytes: int, vocabulary_from: Path, seed: int = 0) -> int:
    """A single-file JSONL corpus of about target_bytes: documents of 2 to 5 paragraphs of random words
    from the bench corpus's own vocabulary (distinct, so that they survive deduplication), with 1% exact
    duplicates and 0.5% binary noise, so that the filter has work to do. Returns its document count."""
    import re

    from tqdm import tqdm

    from pipeline.config import IngestConfig
    from pipeline.corpus import read_documents

    words = sorted(
        {
            w
            for d in read_documents(vocabulary_from, IngestConfig())
            for w in re.findall(r"[A-Za-z][a-z]+", d.text)
        }
    )
    vocab, rng = np.array(words), np.random.default_rng(seed)
    written, count, previous = 0, 0, ""
    with (
        path.open("w", encoding="utf-8") as fh,
        tqdm(total=target_bytes, unit="B", unit_scale=True, desc="corpus", disable=None) as bar,
    ):
        while written < target_bytes:
            kind = rng.random()
            if kind < 0.01 and previous:
                text = previous
            elif kind < 0.015:
                text = "".join(map(chr, rng.integers(0, 32, 400)))
            else:
                text = "\n\n".join(
                    " ".join(vocab[rng.integers(0, len(vocab), rng.integers(40, 120))]) + "."
                    for _ in range(rng.integers(2, 6))
                )
                previous = text
            line = json.dumps({"id": count, "text": text}) + "\n"
            fh.write(line)
            written += len(line)
            count += 1
            bar.update(len(line))
    return count
