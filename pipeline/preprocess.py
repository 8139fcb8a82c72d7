"""Preprocess: corpus -> tokenizer + flat token shards for train / val / test.

It reads the documents validation kept (the same DocumentFilter: duplicates removed down to the
paragraph, bad documents dropped), in three streaming passes over data/, so memory stays flat however
large the corpus is:
  1. measure every document, filter, and assign each kept one its split (by the hash of its text);
  2. train a byte-level BPE on a bounded, uniform sample of the train split (or load the base model's);
  3. encode with the batch API, append EOS after each document, append to uint16/uint32 shards.
The reading, measuring and encoding are data.engine's (this process, or a Ray cluster); the decisions,
the splits and the writing are here, so both engines write the same bytes.
Then it writes the val and test text (val.jsonl, test.jsonl: every model, whatever its tokenizer, is
scored on these same bytes) and measures contamination: the share of val and test word n-grams that
also occur in train (lmforge/data/contamination.py), a figure of the text, not of the tokenizer.
The shards are raw little-endian arrays that `np.memmap` opens without a copy; manifest.json says
their dtype, token and document counts, the held-out text files, and the contamination.
"""

from __future__ import annotations

import json
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from infra.atomic import replace_dir
from lmforge.config import ConfigError, IngestConfig, Params
from lmforge.data.chat import (
    conversation_text,
    labelled_text,
    parse_conversation,
    render_conversation,
    template_setting,
)
from lmforge.data.contamination import contamination
from lmforge.data.corpus import Corpus, open_corpus
from lmforge.data.documents import DocumentFilter, KeepPlan
from lmforge.data.engines import DataEngine, data_engine
from lmforge.data.formats import CorpusError
from lmforge.data.shards import ShardWriter
from lmforge.data.tokenizer import load_base_tokenizer, train_tokenizer
from lmforge.params_file import load_params
from lmforge.runs.contracts import HELD_OUT, SPLITS, Manifest, ValidationReport, read_held_out
from lmforge.serving.chat_template import ChatError, end_of_turn_ids, resolve_template
from lmforge.workspace import Workspace
from pipeline.base_model import resolve_base
from pipeline.stage import run_stage


def split_by_hash(digests: list[bytes], val_fraction: float, test_fraction: float) -> list[str]:
    """A split per document from its content hash; every split gets at least one document."""
    if len(digests) < len(SPLITS):
        raise CorpusError(
            f"{len(digests)} documents cannot fill train, val and test; the corpus needs at least 3"
        )
    position = [int.from_bytes(d[:8], "big") / 2**64 for d in digests]
    splits = [
        "test" if p < test_fraction else "val" if p < test_fraction + val_fraction else "train"
        for p in position
    ]
    # A small corpus can leave a split empty: give it the nearest document of the largest split.
    for name, target in (("test", 0.0), ("val", test_fraction), ("train", 1.0)):
        if name not in splits:
            donor = max(SPLITS, key=splits.count)
            candidates = [i for i, s in enumerate(splits) if s == donor]
            splits[min(candidates, key=lambda i: abs(position[i] - target))] = name
    return splits


def keep_plan(corpus: Corpus, params: Params, engine: DataEngine) -> tuple[KeepPlan, list[bytes], list[int]]:
    """Pass 1: the filter over the engine's facts. The plan of the kept documents, and their digests and
    kept lengths in corpus order."""
    keep, plan = DocumentFilter(params.validation), KeepPlan(len(corpus.files))
    digests, lengths = [], array("q")
    for facts in tqdm(engine.facts(corpus, params), unit="doc", desc="split", disable=None, mininterval=2):
        if not facts.blank and (verdict := keep(facts)).kept:
            plan.add(facts.file, facts.index, verdict.fresh)
            digests.append(facts.digest)
            lengths.append(verdict.length)
    return plan, digests, lengths


def subplan(plan: KeepPlan, splits: list[str], wanted: set[str]) -> KeepPlan:
    """The part of plan whose documents are in the wanted splits (splits is in corpus order)."""
    part, k = KeepPlan(len(plan.kept)), 0
    for file, kept in enumerate(plan.kept):
        for index, fresh in kept.items():
            if splits[k] in wanted:
                part.add(file, index, fresh)
            k += 1
    return part


def tokenizer_sample(
    plan: KeepPlan, splits: list[str], digests: list[bytes], lengths: list[int], budget: int
) -> tuple[KeepPlan, dict]:
    """A uniform sample of the train split (by a second slice of each document's hash), in corpus order,
    never more than budget characters."""
    train_chars = sum(n for n, s in zip(lengths, splits, strict=True) if s == "train")
    rate = min(1.0, budget / max(train_chars, 1))
    sample, stats, k = KeepPlan(len(plan.kept)), {"chars": 0, "documents": 0}, 0
    for file, kept in enumerate(plan.kept):
        for index, fresh in kept.items():
            position = int.from_bytes(digests[k][8:16], "big") / 2**64
            if splits[k] == "train" and position < rate and stats["chars"] + lengths[k] <= budget:
                sample.add(file, index, fresh)
                stats["chars"] += lengths[k]
                stats["documents"] += 1
            k += 1
    return sample, stats


def preprocess(
    corpus: Path | Corpus,
    tokenizer_dir: Path,
    shards_dir: Path,
    params: Params,
    base_dir: Path | None = None,
    expected_documents: int | None = None,
    root: Path | None = None,
) -> Manifest:
    """Run the three passes; write tokenizer_dir and shards_dir (replacing them whole); return the manifest.

    The documents are read, measured and tokenized by data.engine; the result is the same on every engine.
    expected_documents, validation's count of kept documents, guards against a corpus that changed since.
    root is the workspace a relative serve.chat_template file is found in.
    """
    cfg, chat = params.preprocess, params.ingest.format == "chat"
    source = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    with data_engine(params) as engine:
        plan, digests, lengths = keep_plan(source, params, engine)
        if expected_documents is not None and len(digests) != expected_documents:
            raise CorpusError(
                f"{corpus}: {len(digests):,} documents kept now, but validation kept {expected_documents:,}; "
                "the corpus or the filter changed since validation (run the validate stage again)"
            )
        splits = split_by_hash(digests, cfg.val_fraction, cfg.test_fraction)

        def texts_of(part: KeepPlan, as_text=conversation_text) -> Iterator[str]:
            texts = engine.kept_texts(source, params, part)
            return (as_text(m) for m in conversations(texts, params.ingest)) if chat else texts

        sample_stats = None
        if base_dir is not None:
            tokenizer = load_base_tokenizer(base_dir)
        else:
            sample, sample_stats = tokenizer_sample(plan, splits, digests, lengths, cfg.tokenizer_train_chars)
            tokenizer = train_tokenizer(
                texts_of(sample, labelled_text), cfg.vocab_size, cfg.min_frequency, length=sample.count()
            )
        vocab_size = len(tokenizer)
        dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
        eos = tokenizer.eos_token_id

        # Write beside the outputs, then rename: an interrupted run never leaves half a shard set behind.
        tmp_tok, tmp_shards = (Path(f"{p}.tmp") for p in (tokenizer_dir, shards_dir))
        for p in (tmp_tok, tmp_shards):
            shutil.rmtree(p, ignore_errors=True)
            p.mkdir(parents=True)
        writers = {s: ShardWriter(tmp_shards, s, dtype, cfg.shard_tokens, masks=chat) for s in SPLITS}
        held_out = {s: (tmp_shards / f"{s}.jsonl").open("w", encoding="utf-8") for s in HELD_OUT}

        start = time.perf_counter()
        if chat:
            names = [f"{source.files[f].rel}#{i}" for f, kept in enumerate(plan.kept) for i in kept]
            chat_info = encode_conversations(
                engine.kept_texts(source, params, plan),
                names,
                splits,
                tokenizer,
                params,
                writers,
                held_out,
                root,
            )
            doc_counts = chat_info.pop("documents")
        else:
            chat_info, doc_counts = None, {s: splits.count(s) for s in SPLITS}
            encoded = engine.token_ids(
                source, params, plan, tokenizer.backend_tokenizer
            )  # Rust: no Python per token
            with tqdm(total=len(splits), unit="doc", desc=f"tokenize ({engine.name})", disable=None) as bar:
                for split, ids in zip(splits, encoded, strict=True):
                    writers[split].write(np.append(np.asarray(ids, dtype=np.int64), eos))
                    bar.update()
        seconds = time.perf_counter() - start
        for w in writers.values():
            w.close()

        if (
            not chat
        ):  # the held-out text as it is, one JSON line per document in corpus order: what evaluate scores
            texts = engine.kept_texts(source, params, subplan(plan, splits, set(HELD_OUT)))
            for split, text in zip([s for s in splits if s in HELD_OUT], texts, strict=True):
                held_out[split].write(
                    json.dumps({"text": text}) + "\n"
                )  # ASCII escapes: a lone surrogate survives
        for fh in held_out.values():
            fh.close()
        held_out_chars = sum(n for n, s in zip(lengths, splits, strict=True) if s in HELD_OUT)
        leak = contamination(
            held_out_scored(tmp_shards, chat),
            texts_of(subplan(plan, splits, {"train"})),
            cfg.contamination_ngram,
            held_out_chars,
        )

    tokenizer.save_pretrained(tmp_tok)
    total = sum(w.tokens for w in writers.values())
    manifest = Manifest(
        dtype=dtype.name,
        vocab_size=vocab_size,
        eos_token_id=eos,
        tokenizer="base" if base_dir else "trained",
        tokenizer_sample=sample_stats,
        splits={
            s: {"documents": doc_counts[s], "tokens": writers[s].tokens, "shards": writers[s].shards}
            for s in SPLITS
        },
        total_tokens=total,
        text={s: f"{s}.jsonl" for s in HELD_OUT},
        format=params.ingest.format,
        chat=chat_info,
        encode_seconds=round(seconds, 3),
        tokens_per_second=round(total / max(seconds, 1e-9)),
        contamination=leak,
    )
    manifest.write(tmp_shards)
    for tmp, final in ((tmp_tok, tokenizer_dir), (tmp_shards, shards_dir)):
        replace_dir(tmp, final)
    return manifest


def held_out_scored(shards_dir: Path, chat: bool) -> Iterator[tuple[str, str]]:
    """(split, text) of what evaluate scores, for the contamination check: each held-out document, or each
    assistant turn of a held-out conversation (what a chat model is judged on)."""
    for split in HELD_OUT:
        if not chat:
            yield from ((split, text) for text in read_held_out(shards_dir, f"{split}.jsonl"))
            continue
        for messages in read_held_out(shards_dir, f"{split}.jsonl", "messages"):
            yield from ((split, m["content"]) for m in messages if m["role"] == "assistant")


def conversations(records: Iterator[str], cfg: IngestConfig) -> Iterator[list[dict]]:
    """The messages of kept conversation records (validation already dropped the ones that have none)."""
    for record in records:
        messages, _ = parse_conversation(
            json.loads(record), cfg.messages_field, cfg.prompt_field, cfg.completion_field
        )
        yield messages


def encode_conversations(records, names, splits, tokenizer, params: Params, writers, held_out, root) -> dict:
    """Every kept conversation rendered with the chat template, its tokens and loss mask written to its
    split. A conversation that does not fit model.block_size, or that the template cannot render the way
    training needs, is dropped and counted; past validation.max_dropped_fraction the corpus fails. The
    template goes into the tokenizer, which the model, and so the Bento, carries."""
    template = resolve_template(tokenizer, template_setting(params.serve.chat_template, root or Path.cwd()))
    tokenizer.chat_template = template
    stops = end_of_turn_ids(tokenizer, template)
    if not stops:
        raise ConfigError(
            "the chat template ends an assistant turn with no special token, so a model trained on it never "
            "learns to stop: set serve.chat_template to one that does (lmforge's plain template ends it with EOS)"
        )
    limit = params.model.block_size
    dropped, examples, documents = Counter(), {}, dict.fromkeys(SPLITS, 0)
    messages_of = conversations(records, params.ingest)
    with tqdm(total=len(splits), unit="conversation", desc="render", disable=None, mininterval=2) as bar:
        for k, (split, messages) in enumerate(zip(splits, messages_of, strict=True)):
            bar.update()
            try:
                rendered = render_conversation(tokenizer, template, messages)
                problem = None
                if len(rendered.ids) > limit:
                    problem = (
                        "too_long_rendered",
                        f"{len(rendered.ids):,} tokens > model.block_size {limit}",
                    )
            except ChatError as exc:
                problem = ("template_error", str(exc))
            if problem is not None:
                reason, detail = problem
                dropped[reason] += 1
                examples.setdefault(reason, f"{names[k]} ({reason}: {detail})")
                continue
            writers[split].write_conversation(np.asarray(rendered.ids, np.int64), np.asarray(rendered.mask))
            documents[split] += 1
            if split in held_out:
                line = {"text": conversation_text(messages), "messages": messages}
                held_out[split].write(json.dumps(line) + "\n")
    share = sum(dropped.values()) / max(len(splits), 1)
    if share > params.validation.max_dropped_fraction:
        raise CorpusError(
            f"{sum(dropped.values()):,} of {len(splits):,} conversations ({share:.2%}) cannot be trained on, over "
            f"validation.max_dropped_fraction {params.validation.max_dropped_fraction:.0%}: "
            + "; ".join(f"{r} {n:,}, e.g. {examples[r]}" for r, n in dropped.items())
        )
    if empty := [s for s in SPLITS if not documents[s]]:
        raise CorpusError(
            f"no conversation left in {', '.join(empty)} after rendering: the corpus is too small"
        )
    for reason, n in dropped.items():
        print(f"preprocess: dropped {n:,} conversations ({reason}), e.g. {examples[reason]}")
    return {"template": template, "end_of_turn_ids": stops, "dropped": dict(dropped), "documents": documents}


def run() -> None:
    """The DVC stage: data/ -> artifacts/tokenizer + artifacts/shards."""
    ws = Workspace.find()
    params = load_params(ws.root)
    base_dir = resolve_base(params.model.base, ws, params) if params.model.base else None
    report = ValidationReport.read(ws.validation_dir)
    kept = report.stats.get("kept_documents") if report else None
    manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, base_dir, kept, ws.root)
    counts = ", ".join(
        f"{s} {manifest.splits[s].tokens:,} ({manifest.splits[s].documents:,} docs)" for s in SPLITS
    )
    c = manifest.contamination
    print(
        f"preprocess: vocab {manifest.vocab_size:,}, tokens: {counts} ({manifest.tokens_per_second:,} tok/s)\n"
        f"contamination: {c['val']:.2%} of val and {c['test']:.2%} of test word {c['ngram']}-grams also occur in train"
    )


def main() -> int:
    return run_stage("preprocess", run)


if __name__ == "__main__":
    raise SystemExit(main())
