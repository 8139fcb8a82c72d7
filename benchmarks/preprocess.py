"""The preprocess section: the stage's encode pass against raw `tokenizers` encode_batch, same corpus and
tokenizer."""

from __future__ import annotations

import time

from benchmarks.harness import Bench, figure, side


def run(b: Bench) -> dict:
    """The stage's encode pass (read, encode_batch, write shards) against bare encode_batch."""
    from tokenizers import Tokenizer

    from pipeline.corpus import open_corpus
    from pipeline.preprocess import preprocess
    from pipeline.validate import kept_documents

    ws, params = b.ws, b.params
    b.log("preprocess: the stage")
    manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params)
    documents = sum(s.documents for s in manifest.splits.values())
    # the stage appends one EOS per document that it did not encode: count encoded tokens on both sides
    stage_tokens = manifest.total_tokens - documents

    b.log("preprocess: bare encode_batch")
    # the documents the stage encodes (validation's kept ones), in memory before the clock starts
    texts = [d.text for d in kept_documents(open_corpus(ws.data), params)]
    tokenizer = Tokenizer.from_file(str(ws.tokenizer_dir / "tokenizer.json"))
    size = params.preprocess.encode_batch_docs
    start = time.perf_counter()
    bare_tokens = 0
    for i in range(0, len(texts), size):
        bare_tokens += sum(
            len(e.ids) for e in tokenizer.encode_batch(texts[i : i + size], add_special_tokens=False)
        )
    bare_seconds = time.perf_counter() - start

    return {
        "encode": figure(
            "preprocess: encode tokens/s",
            side("preprocess stage, encode pass", stage_tokens, "tokens", manifest.encode_seconds),
            side("tokenizers encode_batch", bare_tokens, "tokens", bare_seconds),
            note=f"{len(texts):,} documents, batches of {size}; the stage also reads the corpus and writes shards",
            same_tokens=stage_tokens == bare_tokens,
            documents=len(texts),
        )
    }
