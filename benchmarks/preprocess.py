"""The preprocess section: the stage's encode pass against raw `tokenizers` encode_batch, same corpus and
tokenizer; and the whole stage on the Ray engine (a local cluster of 2 CPUs) against the local engine."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from benchmarks.harness import REPEATS, Bench, figure, interleaved, side


def run(b: Bench) -> dict:
    """The stage's encode pass (read, encode_batch, write shards) against bare encode_batch, interleaved."""
    from tokenizers import Tokenizer

    from lmforge.data.corpus import open_corpus
    from lmforge.data.engines import kept_documents
    from pipeline.preprocess import preprocess

    ws, params = b.ws, b.params
    # the documents the stage encodes (validation's kept ones), in memory before any clock starts
    texts = [d.text for d in kept_documents(open_corpus(ws.data), params)]
    size = params.preprocess.encode_batch_docs
    counts = []

    def stage() -> tuple[int, float]:
        b.log("preprocess: the stage")
        manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params)
        documents = sum(s.documents for s in manifest.splits.values())
        # the stage appends one EOS per document that it did not encode: count encoded tokens on both sides
        counts.append(manifest.total_tokens - documents)
        return counts[-1], manifest.encode_seconds

    def bare() -> tuple[int, float]:
        b.log("preprocess: bare encode_batch")
        tokenizer = Tokenizer.from_file(str(ws.tokenizer_dir / "tokenizer.json"))  # the stage's, just trained
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), size):
            tokens += sum(
                len(e.ids) for e in tokenizer.encode_batch(texts[i : i + size], add_special_tokens=False)
            )
        return tokens, time.perf_counter() - start

    stage_runs, bare_runs = interleaved(REPEATS, stage, bare)
    return {
        "ray": ray_engine(b),
        "encode": figure(
            "preprocess: encode tokens/s",
            side("preprocess stage, encode pass", "tokens", stage_runs),
            side("tokenizers encode_batch", "tokens", bare_runs),
            note=f"{len(texts):,} documents, batches of {size}; the stage also reads the corpus and writes shards",
            same_tokens=all(s.amount == r.amount for s, r in zip(stage_runs, bare_runs, strict=True)),
            documents=len(texts),
        ),
    }


def ray_engine(b: Bench) -> dict:
    """The whole stage (read, filter, tokenizer sample and training, encode, shards) with data.engine=ray
    on a local cluster of 2 CPUs, against data.engine=local, as a user runs them, interleaved. The
    cluster starts once, as a RAY_ADDRESS cluster would be up already; its start-up is reported apart."""
    from lmforge.config import DataConfig
    from lmforge.data.ray_engine import RayEngine
    from pipeline.preprocess import preprocess

    ws = b.ws
    engines = {name: DataConfig(engine=name, ray_cpus=2) for name in ("local", "ray")}
    digests: dict[str, set[str]] = {name: set() for name in engines}
    encode_seconds: dict[str, list[float]] = {name: [] for name in engines}  # of each run's total

    def run_on(name: str):
        def measure() -> tuple[int, float]:
            b.log(f"preprocess: the stage on the {name} engine")
            params = b.params.model_copy(update={"data": engines[name]})
            start = time.perf_counter()
            manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params)
            seconds = time.perf_counter() - start
            digests[name].add(output_digest(ws.tokenizer_dir, ws.shards_dir))
            encode_seconds[name].append(manifest.encode_seconds)
            return manifest.total_tokens, seconds

        return measure

    # the local engine as the stage runs it: tokenizers' own threads on every core (the bench turns
    # them off for the other figures, which compare one thread with one thread)
    threads = os.environ.pop("TOKENIZERS_PARALLELISM", None)
    try:
        started = time.perf_counter()
        with RayEngine(engines["ray"]):
            cluster_seconds = time.perf_counter() - started
            ray_runs, local_runs = interleaved(REPEATS, run_on("ray"), run_on("local"))
    finally:
        if threads is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = threads
    return figure(
        "preprocess: the whole stage, tokens/s, Ray engine (2 CPUs) vs local engine",
        side("preprocess, data.engine=ray", "tokens", ray_runs),
        side("preprocess, data.engine=local", "tokens", local_runs),
        note=f"a local Ray cluster started once ({cluster_seconds:.1f} s, not counted); the filter's "
        "decisions, the tokenizer's training and the shard writing run on the driver on both",
        cluster_start_seconds=cluster_seconds,
        encode_seconds=encode_seconds,  # the encode pass; the rest is reading, the filter, the tokenizer
        driver_seconds=driver_parts(b),
        same_output=len(digests["ray"] | digests["local"]) == 1,
    )


def output_digest(*dirs: Path) -> str:
    """One hash of every file the stage wrote, names included: equal iff the outputs are byte-identical."""
    h = hashlib.sha256()
    for d in dirs:
        for path in sorted(p for p in d.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(d)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def driver_parts(b: Bench) -> dict[str, float]:
    """What the Ray engine leaves serial on the driver, each part timed alone in this process on the same
    corpus: turning the tasks' fact rows into Python, the filter's decisions, training the tokenizer on
    its sample, and turning the tasks' token ids into shards. With more machines the rest (reading,
    measuring, encoding) spreads out; this does not."""
    import tempfile
    from types import SimpleNamespace

    import numpy as np
    import pyarrow as pa

    from lmforge.data.corpus import open_corpus
    from lmforge.data.engines import LocalEngine
    from lmforge.data.formats import read_file_documents
    from lmforge.data.ray_engine import _DocumentBatch, _measure, facts_from_table
    from lmforge.data.shards import ShardWriter
    from lmforge.data.tokenizer import train_tokenizer
    from pipeline.preprocess import keep_plan, split_by_hash, tokenizer_sample

    params, corpus, local = b.params, open_corpus(b.ws.data), LocalEngine()
    cfg = params.preprocess
    b.log("preprocess: the Ray driver's serial parts, timed alone")
    tables = []  # what the facts pass's tasks send back, made here
    for file, cf in enumerate(corpus.files):
        batch = _DocumentBatch(file)
        for index, doc in enumerate(read_file_documents(cf, params.ingest)):
            batch.add(index, doc.source, doc.utf8_ok, doc.text)
        tables.append(_measure(batch.table(cf.layout), params.validation, params.ingest))
    timer, parts = time.perf_counter(), {}
    facts = [f for table in tables for f in facts_from_table(table)]
    parts["fact_rows"] = time.perf_counter() - timer

    timer = time.perf_counter()
    replay = SimpleNamespace(facts=lambda corpus, params: iter(facts))  # the rows above, as an engine
    plan, digests, lengths = keep_plan(corpus, params, replay)
    parts["filter"] = time.perf_counter() - timer

    splits = split_by_hash(digests, cfg.val_fraction, cfg.test_fraction)
    sample, _ = tokenizer_sample(plan, splits, digests, lengths, cfg.tokenizer_train_chars)
    texts = list(local.kept_texts(corpus, params, sample))
    timer = time.perf_counter()
    tokenizer = train_tokenizer(iter(texts), cfg.vocab_size, cfg.min_frequency, length=len(texts))
    parts["tokenizer_training"] = time.perf_counter() - timer

    ids = list(local.token_ids(corpus, params, plan, tokenizer.backend_tokenizer))
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(ids).astype(np.uint32)))
    with tempfile.TemporaryDirectory() as out:
        timer = time.perf_counter()
        dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)  # as the stage picks it
        writer = ShardWriter(Path(out), "train", dtype, cfg.shard_tokens)
        starts, values = column.offsets.to_numpy(), column.values.to_numpy()
        for i in range(len(column)):  # as RayEngine.token_ids slices them and the stage writes them
            writer.write(np.append(np.asarray(values[starts[i] : starts[i + 1]], dtype=np.int64), 0))
        writer.close()
        parts["shard_writing"] = time.perf_counter() - timer
    return {**{k: round(v, 3) for k, v in parts.items()}, "tokens": int(offsets[-1])}
