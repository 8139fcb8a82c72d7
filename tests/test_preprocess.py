"""Tokenizer training, the deterministic split, and the packed shards, on a tiny corpus."""

import json
import random

import numpy as np
import pytest

from lmforge.config import GateConfig
from lmforge.data.contamination import contamination, ngram_hashes
from lmforge.data.corpus import read_documents
from lmforge.data.formats import CorpusError
from lmforge.data.shards import load_shard, sorted_unique
from lmforge.data.tokenizer import EOS_TOKEN
from lmforge.params_file import resolve_params
from pipeline.gate import decide
from pipeline.preprocess import SPLITS, preprocess, split_by_hash

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
    assert manifest.vocab_size == len(tokenizer) == 300
    assert manifest.dtype == "uint16" and manifest.eos_token_id == tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert sum(manifest.splits[s].documents for s in SPLITS) == 120
    assert all(manifest.splits[s].documents >= 1 for s in SPLITS)

    docs = [d.text for d in read_documents(corpus, PARAMS.ingest)]  # all kept: no duplicates, no bad ones
    decoded = []
    for split in SPLITS:
        info = manifest.splits[split]
        shards = load_shard(tmp_path / "shards", split)
        assert [len(s) for s in shards] == [s.tokens for s in info.shards]
        assert all(len(s) <= 2048 for s in shards)  # shard_tokens is respected
        ids = np.concatenate(shards)
        assert len(ids) == info.tokens and int((ids == manifest.eos_token_id).sum()) == info.documents
        decoded += tokenizer.decode(ids.tolist()).split(EOS_TOKEN)[:-1]
    # byte-level BPE is lossless: every document comes back exactly, in some split
    assert sorted(decoded) == sorted(docs)


def test_preprocess_is_deterministic(tmp_path, corpus):
    first = preprocess(corpus, tmp_path / "t1", tmp_path / "s1", PARAMS)
    second = preprocess(corpus, tmp_path / "t2", tmp_path / "s2", PARAMS)
    assert first.splits == second.splits
    assert (tmp_path / "t1/tokenizer.json").read_bytes() == (tmp_path / "t2/tokenizer.json").read_bytes()
    for shard in first.splits["train"].shards:
        assert (tmp_path / "s1" / shard.file).read_bytes() == (tmp_path / "s2" / shard.file).read_bytes()


def test_base_model_tokenizer_is_reused(tmp_path, corpus):
    preprocess(corpus, tmp_path / "base", tmp_path / "s0", PARAMS)  # stands in for a base model's tokenizer
    params = resolve_params({}, ["preprocess.vocab_size=5000"])  # ignored when the base brings its tokenizer
    manifest = preprocess(corpus, tmp_path / "tok", tmp_path / "shards", params, base_dir=tmp_path / "base")
    assert manifest.tokenizer == "base" and manifest.vocab_size == 300
    assert (tmp_path / "tok/tokenizer.json").read_bytes() == (tmp_path / "base/tokenizer.json").read_bytes()


def test_trains_only_on_the_kept_documents(tmp_path, corpus):
    """Two of 122 documents are bad: the shards hold the other 120, which their document counts prove."""
    lines = (corpus / "docs.jsonl").read_text().splitlines()
    lines[10:10] = [json.dumps({"text": "\x00\x01" * 50}), json.dumps({"text": json.loads(lines[3])["text"]})]
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n")  # binary noise, and a duplicate of #3
    manifest = preprocess(corpus, tmp_path / "tok", tmp_path / "shards", PARAMS)
    assert sum(manifest.splits[s].documents for s in SPLITS) == 120
    with pytest.raises(CorpusError, match="120 documents kept now, but validation kept 122"):
        preprocess(corpus, tmp_path / "tok", tmp_path / "shards", PARAMS, expected_documents=122)


def test_tokenizer_learns_from_a_bounded_sample(tmp_path, corpus):
    params = resolve_params({}, ["preprocess.vocab_size=300", "preprocess.tokenizer_train_chars=10000"])
    manifest = preprocess(corpus, tmp_path / "tok", tmp_path / "shards", params)
    train_chars = sum(len(d.text) for d in read_documents(corpus, params.ingest))
    sample = manifest.tokenizer_sample
    assert 5000 < sample["chars"] <= 10000 < train_chars / 2
    assert 10 < sample["documents"] < manifest.splits["train"].documents / 2


def test_sorted_unique_matches_numpy():
    values = np.random.default_rng(0).integers(0, 50, 1000).astype(np.uint64)
    unique, counts = sorted_unique(values, return_counts=True)
    expected = np.unique(values, return_counts=True)
    assert unique.tolist() == expected[0].tolist() and counts.tolist() == expected[1].tolist()
    assert sorted_unique(np.empty(0, np.uint64)).tolist() == []


def test_ngram_hashes_stay_inside_documents():
    boundary = 9
    ids = np.array([1, 2, 3, 4, boundary, 1, 2, 3, 4, 5], dtype=np.uint64)
    h = ngram_hashes(ids, 3, boundary)
    assert len(h) == 2 + 3  # 1-2-3, 2-3-4 | 1-2-3, 2-3-4, 3-4-5; none across the EOS
    assert h[0] == h[2] and h[1] == h[3] and len(set(h.tolist())) == 3


RNG_WORDS = ["".join(random.Random(i).choices("bcdfghjklmnpqrstvwxz", k=6)) for i in range(3000)]


def leaky_corpus(path, near: bool, shared: int = 2, own: bool = True):
    """600 documents: a paragraph of their own (unless own=False) plus `shared` paragraphs drawn from 40
    common ones, the common ones repeated exactly, or (near=True) with one word changed per copy."""
    rng = random.Random(1)
    common = [" ".join(rng.choices(RNG_WORDS, k=80)) for _ in range(40)]
    docs = []
    for i in range(600):
        paras = [" ".join(rng.choices(RNG_WORDS, k=60))] if own else []
        for k in range(shared):
            words = common[(i * 7 + k * 13) % 40].split()
            if near:
                words[40] = f"copy{i}"
            paras.append(" ".join(words))
        docs.append("\n\n".join(paras))
    path.mkdir()
    (path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


LEAK_PARAMS_OVERRIDES = ["preprocess.vocab_size=400", "preprocess.val_fraction=0.1"]
LEAK_PARAMS = resolve_params({}, LEAK_PARAMS_OVERRIDES)
METRICS = {"val_perplexity": 20.0, "bigram_val_perplexity": 40.0}


def test_repeated_paragraphs_are_removed_so_val_does_not_leak(tmp_path):
    manifest = preprocess(
        leaky_corpus(tmp_path / "c", near=False), tmp_path / "t", tmp_path / "s", LEAK_PARAMS
    )
    leak = manifest.contamination
    assert leak["ngram"] == 13 and leak["val_ngrams"] > 1000
    assert leak["val"] < 0.01 and leak["test"] < 0.01
    gate = decide(METRICS | {f"{s}_contamination": leak[s] for s in ("val", "test")}, None, GateConfig())
    assert gate.promote, gate.reasons


def test_near_identical_paragraphs_leak_and_the_gate_refuses_with_the_figure(tmp_path):
    manifest = preprocess(
        leaky_corpus(tmp_path / "c", near=True), tmp_path / "t", tmp_path / "s", LEAK_PARAMS
    )
    leak = manifest.contamination
    assert leak["val"] > 0.3 and leak["test"] > 0.3  # the common paragraphs' 13-grams are all in train
    gate = decide(METRICS | {f"{s}_contamination": leak[s] for s in ("val", "test")}, None, GateConfig())
    worst = max(("val", "test"), key=leak.get)
    assert not gate.promote
    assert (
        f"FAIL: contamination {leak[worst]:.2%} of {worst} word n-grams seen in train > 5.00%" in gate.reasons[2]
    )


def test_a_sampled_estimate_agrees_with_the_exact_figure(tmp_path, monkeypatch):
    """On splits too large to keep every held-out n-gram, a hash-based sample of them estimates the share."""
    import lmforge.data.contamination as leak_module

    corpus = leaky_corpus(tmp_path / "c", near=True)
    exact = preprocess(corpus, tmp_path / "t", tmp_path / "s", LEAK_PARAMS).contamination
    assert exact["sample_rate"] == 1.0
    held_chars = sum(len(t) for s in ("val", "test") for t in read_jsonl_texts(tmp_path / "s" / f"{s}.jsonl"))
    monkeypatch.setattr(leak_module, "HELD_OUT_SAMPLE", held_chars // 10)
    estimate = preprocess(corpus, tmp_path / "t2", tmp_path / "s2", LEAK_PARAMS).contamination
    assert 0.05 < estimate["sample_rate"] < 0.15
    assert estimate["val_ngrams"] < exact["val_ngrams"] / 4
    for split in ("val", "test"):
        assert abs(estimate[split] - exact[split]) < 0.05, (split, estimate, exact)


def read_jsonl_texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_the_near_duplicate_filter_removes_that_leak(tmp_path):
    params = resolve_params({}, [*LEAK_PARAMS_OVERRIDES, "validation.near_duplicates=true"])
    corpus = leaky_corpus(tmp_path / "c", near=True, shared=1, own=False)  # near-identical documents
    without = preprocess(corpus, tmp_path / "t0", tmp_path / "s0", resolve_params({}, LEAK_PARAMS_OVERRIDES))
    manifest = preprocess(corpus, tmp_path / "t", tmp_path / "s", params)
    assert without.contamination["val"] > 0.5
    assert manifest.contamination["val"] < 0.05 and manifest.contamination["test"] < 0.05
    kept = sum(manifest.splits[s].documents for s in SPLITS)
    assert 40 <= kept < 60  # of 600: 15 near-copies of each of 40 documents


def test_contamination_counts_a_leak_in_the_last_train_chunk(monkeypatch):
    """Train streams past the held-out n-grams chunk by chunk: a leak at the very end counts too."""
    import lmforge.data.contamination as leak_module

    monkeypatch.setattr(leak_module, "CHUNK_UNITS", 200)
    rng = random.Random(3)
    held = " ".join(rng.choices(RNG_WORDS, k=60))
    train = [" ".join(rng.choices(RNG_WORDS, k=60)) for _ in range(50)]
    clean = contamination([("val", held)], train, 13, len(held))
    assert clean["val"] == 0.0 and clean["val_ngrams"] == 60 - 12
    # the same words in another case, other punctuation and line breaks: the same word n-grams
    leaked = contamination([("val", held)], [*train, held.upper().replace(" ", ",\n")], 13, len(held))
    assert leaked["val"] == 1.0 and leaked["test"] == 0.0 and leaked["test_ngrams"] == 0


def test_contamination_is_a_figure_of_the_text_not_of_the_tokenizer(tmp_path):
    """One corpus, two tokenizers (one trained here with 400 tokens, one of 1,200 learnt on other text, as a
    base model brings): the same documents in the same splits, so the same figure to the last digit."""
    corpus = leaky_corpus(tmp_path / "c", near=True)
    own = preprocess(corpus, tmp_path / "t", tmp_path / "s", LEAK_PARAMS)
    other_text = tmp_path / "other"
    other_text.mkdir()
    (other_text / "docs.jsonl").write_text("".join(
        json.dumps({"text": " ".join(random.Random(i).choices(WORDS, k=200))}) + "\n" for i in range(300)
    ))  # fmt: skip
    preprocess(other_text, tmp_path / "base", tmp_path / "s0", resolve_params({}, ["preprocess.vocab_size=1200"]))
    with_base = preprocess(corpus, tmp_path / "t2", tmp_path / "s2", LEAK_PARAMS, base_dir=tmp_path / "base")
    assert with_base.vocab_size != own.vocab_size and with_base.total_tokens != own.total_tokens
    assert with_base.contamination == own.contamination
    assert own.contamination["val"] > 0.3  # the near-identical paragraphs do leak, under either tokenizer


def chinese_documents(count: int, seed: int, leak_from: list[str] = ()) -> list[str]:
    """Poem-like documents: lines of five characters drawn from real poems and the Thousand Character
    Classic, the common characters more often (so short runs repeat across documents, as in real text)."""
    from .conftest import POEM_LINES
    from .test_corpus import QIANZIWEN

    chars = [c for c in "".join(POEM_LINES) + QIANZIWEN if c not in "，。"]
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        lines = ["".join(rng.choices(chars, k=5)) + rng.choice("，。") for _ in range(16)]
        if leak_from:
            lines[4:4] = [leak_from[i % len(leak_from)]]
        docs.append("".join(lines))
    return docs


def test_a_chinese_corpus_with_no_leak_measures_near_zero_and_a_leak_is_seen(tmp_path):
    """Chinese has no spaces: its characters are the units, so 13 of them are a phrase, not four characters
    of byte-level tokens. Mixed with English, each script is reported apart."""
    corpus = tmp_path / "zh"
    corpus.mkdir()
    (corpus / "poems.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                                for d in chinese_documents(400, seed=0)))  # fmt: skip
    params = resolve_params({}, ["preprocess.vocab_size=400", "preprocess.val_fraction=0.1"])
    clean = preprocess(corpus, tmp_path / "t", tmp_path / "s", params).contamination
    assert clean["val_ngrams"] > 2000 and clean["val"] < 0.005 and clean["test"] < 0.005, clean
    assert list(clean["by_script"]) == ["Han"]

    # a stanza of 40 shared ones in every document (distinct documents, so dedup keeps them): a real leak,
    # in the Chinese documents only, beside English ones that do not leak
    shared = ["".join(random.Random(100 + k).choices("天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往", k=30)) for k in range(40)]
    english = [" ".join(random.Random(k).choices(RNG_WORDS, k=120)) for k in range(300)]
    (corpus / "poems.jsonl").write_text("".join(
        json.dumps({"text": d}, ensure_ascii=False) + "\n"
        for d in chinese_documents(400, seed=0, leak_from=shared) + english
    ))  # fmt: skip
    mixed = preprocess(corpus, tmp_path / "t2", tmp_path / "s2", params).contamination
    han, latin = mixed["by_script"]["Han"], mixed["by_script"]["Latin"]
    assert han["val"] > 0.05 and latin["val"] < 0.005, mixed
    assert mixed["val_ngrams"] == han["val_ngrams"] + latin["val_ngrams"]
