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

from benchmarks.harness import REPEATS, Bench, Run, figure, interleaved, side, span
from infra.processes import bin_path
from lmforge.runs.contracts import Manifest
from lmforge.workspace import Workspace

CORPUS_BYTES = {True: 16 << 20, False: 1 << 30}  # quick, full
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
    file in a bare Python loop, interleaved; both in child processes of their own, so each peak RSS is
    its own. Preprocess on the same file runs once: its row is memory, which does not vary run to run
    the way time does, and in full mode it takes minutes."""
    corpus = b.tmp / "large.jsonl"
    b.log(f"validate: writing a {CORPUS_BYTES[b.quick] / 2**20:,.0f} MiB JSONL corpus")
    documents = write_large_corpus(corpus, CORPUS_BYTES[b.quick], b.ws.data)
    size = corpus.stat().st_size
    env = dict(os.environ, LMFORGE_ROOT=str(b.ws.root), TQDM_DISABLE="1")
    bare_rss, rss, kept = [], [], []

    def bare() -> tuple[float, float]:
        b.log("validate: bare read + json.loads")
        seconds, peak, _ = peak_rss_run([sys.executable, "-c", BARE_DECODE, str(corpus)], env)
        bare_rss.append(peak)
        return size / 1e6, seconds

    def lmforge() -> tuple[float, float]:
        b.log("validate: lmforge validate")
        seconds, peak, out = peak_rss_run([bin_path("lmforge"), "validate", str(corpus)], env)
        rss.append(peak)
        kept.append(next((line.strip() for line in out.splitlines() if "kept (" in line), ""))
        return size / 1e6, seconds

    lmforge_runs, bare_runs = interleaved(REPEATS, lmforge, bare)
    # the same runs' peak memory, in GB, per GB of corpus
    rss_runs = [Run(peak / 1e9, r.seconds, r.start, r.end) for peak, r in zip(rss, lmforge_runs, strict=True)]

    b.log("validate: preprocess of the same corpus (bounded tokenizer sample)")
    large = Workspace(b.tmp / "large-ws")
    large.data.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(b.ws.root / name, large.root / name)
    (large.data / corpus.name).symlink_to(corpus)
    pre_env = dict(env, LMFORGE_ROOT=str(large.root))
    started = time.time()
    pre_seconds, pre_rss, _ = peak_rss_run([sys.executable, "-m", "pipeline.preprocess"], pre_env)
    pre_run = span(pre_rss / 1e9, pre_seconds, started, time.time())  # once: memory, not a rate
    manifest = Manifest.read(large.shards_dir)
    sample = manifest.tokenizer_sample
    return {
        "throughput": figure(
            "validate: MB/s on one large JSONL file",
            side("lmforge validate (CLI, GE suite, filter, report)", "MB", lmforge_runs),
            side("bare read + json.loads of each line", "MB", bare_runs),
            note=f"{size / 2**30:.2f} GiB, {documents:,} documents ({kept[0]}); the ratio is the share of bare "
            "decoding speed that the filter, measures and suite leave",
            documents=documents,
            bytes=size,
        ),
        "peak_rss": figure(
            "validate: peak RSS per GB of corpus",
            side("lmforge validate, peak RSS", "GB RSS", rss_runs, per=size / 1e9),
            None,
            note="GB of peak resident memory per GB of corpus, in the runs above (the targets are for full "
            "mode's 1 GiB file; in quick mode start-up dominates both rows); bare read + json.loads peaked "
            f"at {max(bare_rss) / 1e9:.2f} GB",
            rss_bytes=rss,
            bare_rss_bytes=bare_rss,
        ),
        "preprocess_rss": figure(
            "preprocess: peak RSS per GB of corpus (same file)",
            side("python -m pipeline.preprocess, peak RSS", "GB RSS", [pre_run], per=size / 1e9),
            note=f"the tokenizer learned from a sample of {sample['chars']:,} chars ({sample['documents']:,} "
            f"documents; preprocess.tokenizer_train_chars {b.params.preprocess.tokenizer_train_chars:,}); "
            f"{manifest.total_tokens:,} tokens in {pre_seconds:.0f} s (the whole stage, start-up included)",
            rss_bytes=pre_rss,
            seconds=pre_seconds,
            tokenizer_sample=sample,
        ),
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

    from lmforge.config import IngestConfig
    from lmforge.data.corpus import read_documents

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
