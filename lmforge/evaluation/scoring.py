"""Held-out text in bits per byte: a unit that means the same whatever the tokenizer.

Perplexity per token depends on the tokenizer: with a smaller vocabulary every token is easier to guess.
So models are compared on the same bytes, each with its own tokenizer and context, the way
lm-evaluation-harness scores `loglikelihood_rolling` and defines `bits_per_byte`:
  - a document is tokenized without special tokens, and the model's BOS token (else its EOS) goes first,
    so that the first token has something to condition on;
  - the tokens are cut into the harness's disjoint rolling windows of the model's context
    (lm_eval.utils.get_rolling_token_windows, context_len=1), and every token is scored once;
  - bits per byte is the summed negative log-likelihood, in bits, over the UTF-8 bytes of the text those
    tokens decode to.
Scores are kept per document, so the difference between two models on the same documents has a
bootstrap interval (paired_difference).

A chat corpus's held-out documents are conversations: each is rendered with the run's chat template
(lmforge/data/chat.py), every model with its own tokenizer, and only the assistant's tokens are scored, over
the UTF-8 bytes of the assistant turns as rendered (the same bytes for every model).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmforge.architecture import context_length
from lmforge.data.chat import conversation_text, render_conversation
from lmforge.runs.contracts import Manifest
from lmforge.training.model import autocast_for

LN2 = math.log(2)
LOGIT_BUDGET = 1 << 28  # logits held at once (fp32: 1 GiB): the batch shrinks for a large vocabulary


def document_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def select_documents(texts: list[str], max_bytes: int | None) -> list[int]:
    """Which documents to score (their indices): all of them, or those first in the order of their
    text's hash until max_bytes of UTF-8 are taken (at least one). The choice depends on the text alone,
    so every model, whatever its tokenizer, is scored on the same documents. Corpus order is kept."""
    sizes = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
    if max_bytes is None or sum(sizes) <= max_bytes:
        return list(range(len(texts)))
    chosen, spent = set(), 0
    for i in sorted(range(len(texts)), key=lambda i: document_id(texts[i])):
        if chosen and spent + sizes[i] > max_bytes:
            continue
        chosen.add(i)
        spent += sizes[i]
    return sorted(chosen)


def held_out_documents(manifest: Manifest, shards_dir: Path, split: str, max_bytes: int | None) -> list:
    """What evaluate and the gate score of a split: texts, or conversations (lists of messages)."""
    texts = manifest.held_out_texts(shards_dir, split)
    chosen = select_documents(texts, max_bytes)
    if manifest.format == "chat":
        conversations = manifest.held_out_conversations(shards_dir, split)
        return [conversations[i] for i in chosen]
    return [texts[i] for i in chosen]


@dataclass
class DocScores:
    """One model on some documents: per document, the bits it needs, the tokens it predicted and the
    UTF-8 bytes those tokens decode to."""

    documents: list[str]  # document_id of each
    bits: np.ndarray  # float64
    tokens: np.ndarray  # int64
    bytes: np.ndarray  # int64

    @property
    def bits_per_byte(self) -> float:
        return float(self.bits.sum() / max(int(self.bytes.sum()), 1))

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token, in nats (its exp is the perplexity per token)."""
        return float(self.bits.sum() * LN2 / max(int(self.tokens.sum()), 1))

    def to_dict(self) -> dict:
        return {"bits": self.bits.tolist(), "tokens": self.tokens.tolist(), "bytes": self.bytes.tolist()}

    @classmethod
    def from_dict(cls, documents: list[str], data: dict) -> DocScores:
        return cls(
            documents,
            np.asarray(data["bits"], np.float64),
            np.asarray(data["tokens"], np.int64),
            np.asarray(data["bytes"], np.int64),
        )


def prefix_token_id(tokenizer) -> int:
    """What goes before a document: BOS where the tokenizer has one, else EOS (lm-eval's HFLM)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


@dataclass
class Encoded:
    """Documents as one model sees them: the tokens, which of them are scored (None: all), and the bytes
    the scored tokens stand for."""

    ids: list[list[int]]
    scored: list[list[bool]] | None
    bytes: np.ndarray
    documents: list[str]


def encode_held_out(tokenizer, docs: list, template: str | None = None) -> Encoded:
    """Texts, or with a chat template, conversations (their assistant turns scored)."""
    if template is None:
        ids = encode_documents(tokenizer, docs)
        decoded = tokenizer.batch_decode(ids) if ids else []
        sizes = [len(d.encode("utf-8", "surrogatepass")) for d in decoded]
        return Encoded(ids, None, np.array(sizes, np.int64), [document_id(t) for t in docs])
    rendered = [render_conversation(tokenizer, template, m, served=False) for m in docs]
    return Encoded(
        [r.ids for r in rendered],
        [r.mask for r in rendered],
        np.array([r.assistant_bytes for r in rendered], np.int64),
        [document_id(conversation_text(m)) for m in docs],
    )


def rolling_windows(ids: list[int], prefix: int, context: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows of a document: (model input, the tokens its last positions
    predict). Every token of the document is predicted exactly once."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [
        ((ctx + cont)[:-1][-context:], cont)
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, prefix, context, 1))
    ]


@torch.no_grad()
def score_documents(
    model,
    tokenizer,
    docs: list,
    batch_size: int,
    device: torch.device,
    template: str | None = None,
    encoded: Encoded | None = None,
) -> DocScores:
    """The model's summed NLL of each document in bits, its tokens and the bytes they decode to; with a
    chat template, of each conversation's assistant tokens, over the assistant turns' bytes. encoded:
    the documents as encode_held_out gave them, when the caller has them already."""
    was_training = model.training
    model.eval()
    context, prefix = context_length(model.config), prefix_token_id(tokenizer)
    encoded = encode_held_out(tokenizer, docs, template) if encoded is None else encoded
    windows = []  # (document, model input, targets, the targets' offset in the document)
    for doc, ids in enumerate(encoded.ids):
        offset = 0
        for inputs, targets in rolling_windows(ids, prefix, context):
            windows.append((doc, inputs, targets, offset))
            offset += len(targets)
    windows.sort(key=lambda w: -len(w[1]))  # similar lengths together: little padding
    vocab = model.get_output_embeddings().weight.shape[0]
    nats = np.zeros(len(docs), np.float64)
    bar = tqdm(total=len(windows), unit="window", desc="score", disable=None, mininterval=2)
    i = 0
    while i < len(windows):
        longest = len(windows[i][1])
        rows = max(1, min(batch_size, LOGIT_BUDGET // (longest * vocab)))
        batch, i = windows[i : i + rows], i + rows
        inputs = torch.full((len(batch), longest), prefix, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, (_, ids, _, _) in enumerate(batch):
            inputs[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        with autocast_for(device):
            logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits
        for row, (doc, ids, targets, offset) in enumerate(batch):
            span = logits[row, len(ids) - len(targets) : len(ids)].float()
            picked = span.gather(1, torch.tensor(targets, device=span.device)[:, None]).squeeze(1)
            nll = (torch.logsumexp(span, -1) - picked).double()
            if encoded.scored is not None:
                scored = encoded.scored[doc][offset : offset + len(targets)]
                nll = nll * torch.tensor(scored, dtype=nll.dtype, device=nll.device)
            nats[doc] += float(nll.sum())
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    counted = encoded.ids if encoded.scored is None else encoded.scored
    return DocScores(encoded.documents, nats / LN2, np.array([sum(map(bool, c)) for c in counted], np.int64),
                     encoded.bytes)  # fmt: skip


def score_model_dir(
    model_dir: Path, docs: dict[str, list], batch_size: int, device: torch.device, template: str | None = None
) -> dict[str, DocScores]:
    """A saved model (a champion, a base), loaded once, scored on each split's documents with its own
    tokenizer and context (conversations: rendered with this run's template, the same bytes for all)."""
    from transformers import AutoTokenizer

    from lmforge.training.model import load_model

    model, tokenizer = load_model(model_dir).to(device), AutoTokenizer.from_pretrained(model_dir)
    return {
        split: score_documents(model, tokenizer, d, batch_size, device, template) for split, d in docs.items()
    }


def paired_difference(
    challenger: DocScores, other: DocScores, samples: int, confidence: float, seed: int = 0
) -> dict:
    """How much worse (positive) or better the challenger's bits per byte is than the other model's on
    the same documents, relative to the other's, with a bootstrap interval over documents: each
    resample draws documents with replacement and recomputes both models' bits per byte on them."""
    if challenger.documents != other.documents:
        raise ValueError("the two models were scored on different documents")
    n = len(challenger.documents)
    columns = np.stack([challenger.bits, challenger.bytes, other.bits, other.bytes]).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, samples, 256):  # bounded memory: 256 resamples x n documents at a time
        counts = rng.multinomial(n, np.full(n, 1 / n), size=min(256, samples - start)).astype(np.float64)
        c_bits, c_bytes, o_bits, o_bytes = (counts @ col for col in columns)
        draws.append((c_bits / c_bytes) / (o_bits / o_bytes) - 1)
    draws = np.concatenate(draws)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return {
        "documents": n,
        "bytes": int(other.bytes.sum()),
        "challenger_bits_per_byte": round(challenger.bits_per_byte, 6),
        "other_bits_per_byte": round(other.bits_per_byte, 6),
        "relative_difference": round(challenger.bits_per_byte / other.bits_per_byte - 1, 6),
        "interval": [round(float(low), 6), round(float(high), 6)],
        "confidence": confidence,
    }
