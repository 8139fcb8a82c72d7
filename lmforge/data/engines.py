"""Data engines: where validate and preprocess read, measure and tokenize the documents.

  local  this process, one document after another (the default);
  ray    a Ray cluster (lmforge/data/ray_engine.py): files read in parallel, documents measured and tokenized
         in parallel, the results streamed back in corpus order.

Either engine only does the per-document work. The decisions that depend on order (DocumentFilter), the
splits, the tokenizer's sample and the shard writing stay in the stage, so the same corpus and params
give the same bytes on both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from lmforge.config import Params
from lmforge.data.corpus import Corpus
from lmforge.data.documents import DocumentFacts, DocumentFilter, FactFinder, KeepPlan, kept_text
from lmforge.data.formats import Document, read_file_documents


class DataEngine(AbstractContextManager, Protocol):
    name: str

    def facts(self, corpus: Corpus, params: Params) -> Iterator[DocumentFacts]:
        """Every document read, measured, in corpus order (files sorted, documents in file order)."""

    def kept_texts(self, corpus: Corpus, params: Params, plan: KeepPlan) -> Iterator[str]:
        """The kept text of every document in plan, in corpus order."""

    def token_ids(
        self, corpus: Corpus, params: Params, plan: KeepPlan, tokenizer: Any
    ) -> Iterator[list[int]]:
        """The token ids of every document in plan (no special tokens), in corpus order."""


class LocalEngine(AbstractContextManager):
    name = "local"

    def __exit__(self, *exc) -> None:
        return None

    def facts(self, corpus: Corpus, params: Params) -> Iterator[DocumentFacts]:
        find = FactFinder(params.validation, params.ingest)
        for file, cf in enumerate(corpus.files):
            cf.documents = 0
            for index, doc in enumerate(read_file_documents(cf, params.ingest)):
                cf.documents += 1
                yield find(doc, file, index)

    def kept_texts(self, corpus: Corpus, params: Params, plan: KeepPlan) -> Iterator[str]:
        for file, cf in enumerate(corpus.files):
            if not plan.count(file):
                continue
            kept = plan.kept[file]
            for index, doc in enumerate(read_file_documents(cf, params.ingest)):
                if index in kept:
                    yield kept_text(doc.text, kept[index])

    def token_ids(
        self, corpus: Corpus, params: Params, plan: KeepPlan, tokenizer: Any
    ) -> Iterator[list[int]]:
        size, batch = params.preprocess.encode_batch_docs, []
        for text in self.kept_texts(corpus, params, plan):
            batch.append(text)
            if len(batch) == size:
                yield from (e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=False))
                batch = []
        if batch:
            yield from (e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=False))


def data_engine(params: Params) -> DataEngine:
    """The engine data.engine names; Ray is imported only when it is asked for."""
    if params.data.engine == "ray":
        from lmforge.data.ray_engine import RayEngine

        return RayEngine(params.data)
    return LocalEngine()


def kept_documents(corpus: Corpus, params: Params) -> Iterator[Document]:
    """The documents validation keeps, with duplicate paragraphs removed: what preprocess trains on."""
    find, keep = FactFinder(params.validation, params.ingest), DocumentFilter(params.validation)
    for file, cf in enumerate(corpus.files):
        for index, doc in enumerate(read_file_documents(cf, params.ingest)):
            facts = find(doc, file, index)
            if not facts.blank and (verdict := keep(facts)).kept:
                yield Document(doc.source, kept_text(doc.text, verdict.fresh), doc.utf8_ok)
