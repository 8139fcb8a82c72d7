"""Tokenizer training, the deterministic split, and the packed shards, on a tiny corpus."""

import json
import random

import numpy as np
import pytest

from pipeline.config import resolve_params
from pipeline.ingest import CorpusError, read_documents
from pipeline.preprocess import EOS_TOKEN, SPLITS, load_shard, preprocess, split_by_hash

WORDS = "the a model data shard token train loss step value river stone light quick brown fox jumps over lazy dog".split()


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "corpus"
    path.mkdir()
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "." for _ in range(120)]
    (path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


PARAMS = resolve_params(
    {}, ["preprocess.vocab_size=300", "preprocess.shard_tokens=2048", "preprocess.encode_batch_docs=7"]
)


def test_split_is_by_hash_and_fills_every_split():
    digests = [bytes([i]) * 32 for i in range(3)]
    assert sorted(split_by_hash(digests, 0.05, 0.05)) == ["test", "train", "val"]
    many = [random.Random(i).randbytes(32) for i in range(2000)]
    splits = split_by_hash(many, 0.1, 0.05)
    assert split_by_hash(many, 0.1, 0.05) == splits
    assert 0.08 < splits.count("val") / 2000 < 0.12 and 0.03 < splits.count("test") / 2000 < 0.07
    with pytest.raises(CorpusError, match="at least 3"):
        split_by_hash(many[:2], 0.1, 0.1)


def test_preprocess_packs_every_document_with_eos(tmp_path, corpus):
    manifest = preprocess(corpus, tmp_path / "tok", tmp_path / "shards", PARAMS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert manifest["vocab_size"] == len(tokenizer) == 300
    assert manifest["dtype"] == "uint16" and manifest["eos_token_id"] == tokenizer.convert_tokens_to_ids(
        EOS_TOKEN
    )
    assert sum(manifest["splits"][s]["documents"] for s in SPLITS) == 120
    assert all(manifest["splits"][s]["documents"] >= 1 for s in SPLITS)

    docs = [d.text for d in read_documents(corpus, PARAMS.ingest)]
    decoded = []
    for split in SPLITS:
        info = manifest["splits"][split]
        shards = load_shard(tmp_path / "shards", split)
        assert [len(s) for s in shards] == [s["tokens"] for s in info["shards"]]
        assert all(len(s) <= 2048 for s in shards)  # shard_tokens is respected
        ids = np.concatenate(shards)
        assert (
            len(ids) == info["tokens"] and int((ids == manifest["eos_token_id"]).sum()) == info["documents"]
        )
        decoded += tokenizer.decode(ids.tolist()).split(EOS_TOKEN)[:-1]
    # byte-level BPE is lossless: every document comes back exactly, in some split
    assert sorted(decoded) == sorted(docs)


def test_preprocess_is_deterministic(tmp_path, corpus):
    first = preprocess(corpus, tmp_path / "t1", tmp_path / "s1", PARAMS)
    second = preprocess(corpus, tmp_path / "t2", tmp_path / "s2", PARAMS)
    assert first["splits"] == second["splits"]
    assert (tmp_path / "t1/tokenizer.json").read_bytes() == (tmp_path / "t2/tokenizer.json").read_bytes()
    for shard in first["splits"]["train"]["shards"]:
        assert (tmp_path / "s1" / shard["file"]).read_bytes() == (
            tmp_path / "s2" / shard["file"]
        ).read_bytes()


def test_base_model_tokenizer_is_reused(tmp_path, corpus):
    preprocess(corpus, tmp_path / "base", tmp_path / "s0", PARAMS)  # stands in for a base model's tokenizer
    params = resolve_params({}, ["preprocess.vocab_size=5000"])  # ignored when the base brings its tokenizer
    manifest = preprocess(corpus, tmp_path / "tok", tmp_path / "shards", params, base_dir=tmp_path / "base")
    assert manifest["tokenizer"] == "base" and manifest["vocab_size"] == 300
    assert (tmp_path / "tok/tokenizer.json").read_bytes() == (tmp_path / "base/tokenizer.json").read_bytes()
