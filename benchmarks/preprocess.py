"""The preprocess section: the stage's encode pass against raw `tokenizers` encode_batch, same corpus and
tokenizer."""

from __future__ import annotations

import time

from benchmarks.harness import REPEATS, Bench, figure, interleaved, side


def run(b: Bench) -> dict:
    """The stage's encode pass (read, encode_batch, write shards) against bare encode_batch, interleaved."""
    from tokenizers import Tokenizer

    from pipeline.corpus import open_corpus
    from pipeline.preprocess import preprocess
    from pipeline.validate import kept_documents

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
        "encode": figure(
            "preprocess: encode tokens/s",
            side("preprocess stage, encode pass", "tokens", stage_runs),
            side("tokenizers encode_batch", "tokens", bare_runs),
            note=f"{len(texts):,} documents, batches of {size}; the stage also reads the corpus and writes shards",
            same_tokens=all(s.amount == r.amount for s, r in zip(stage_runs, bare_runs, strict=True)),
            documents=len(texts),
        )
    }
