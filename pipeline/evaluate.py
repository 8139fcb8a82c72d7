"""Evaluate: the model on the held-out text, in bits per byte and per token, against n-gram baselines.

Every val and test document (up to evaluate.max_bytes of them) is scored the way lm-evaluation-harness
scores rolling log-likelihood (lmforge/evaluation/scoring.py): bits per byte is the unit that compares models
whatever their tokenizers, and the gate compares the champion (and a fine-tune's base) in it, on these
same documents. Perplexity per token stays as a figure of this tokenizer. The unigram and bigram
baselines are fitted on the train shards and score exactly the tokens the model predicts. Also writes
the per-document scores (scores.json, for the gate's bootstrap), sample continuations, the loss curve
(PNG, and JSON for `dvc plots`) and metrics.json.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from lmforge.architecture import context_length
from lmforge.config import ConfigError, EvaluateConfig, Params
from lmforge.data.shards import load_shard, sorted_unique
from lmforge.evaluation.plots import plot_loss_curve
from lmforge.evaluation.scoring import (
    LN2,
    DocScores,
    Encoded,
    encode_held_out,
    held_out_documents,
    prefix_token_id,
    score_documents,
    score_model_dir,
)
from lmforge.params_file import load_params
from lmforge.runs.contracts import (
    HELD_OUT,
    METRICS_FILE,
    SCORES_FILE,
    Manifest,
    TrainSummary,
    write_json,
)
from lmforge.serving.chat_template import end_of_turn_ids, render_text
from lmforge.training.model import load_model
from lmforge.workspace import Workspace
from pipeline.stage import run_stage

# ---------------------------------------------------------------------------------------------
# n-gram baselines


class NGramBaseline:
    """Add-k smoothed unigram and bigram models over token ids."""

    def __init__(self, train_shards: list[np.ndarray], vocab_size: int, k: float):
        self.vocab, self.k = vocab_size, k
        self.unigram = np.zeros(vocab_size, dtype=np.int64)
        self.prev_counts = np.zeros(vocab_size, dtype=np.int64)
        pair_codes = []
        for shard in train_shards:
            ids = np.asarray(shard, dtype=np.int64)
            self.unigram += np.bincount(ids, minlength=vocab_size)
            self.prev_counts += np.bincount(ids[:-1], minlength=vocab_size)
            pair_codes.append(ids[:-1] * vocab_size + ids[1:])
        # Sparse bigram counts: a dense V x V table would be 8k x 8k (or 32k x 32k) integers.
        self.pairs, self.pair_counts = sorted_unique(
            np.concatenate(pair_codes) if pair_codes else np.array([], np.int64), return_counts=True
        )
        self.total = int(self.unigram.sum())

    def unigram_nll(self, targets: np.ndarray) -> np.ndarray:
        return -np.log((self.unigram[targets] + self.k) / (self.total + self.k * self.vocab))

    def bigram_nll(self, prev: np.ndarray, targets: np.ndarray) -> np.ndarray:
        codes = prev.astype(np.int64) * self.vocab + targets
        idx = np.clip(np.searchsorted(self.pairs, codes), 0, max(len(self.pairs) - 1, 0))
        found = (self.pairs[idx] == codes) if len(self.pairs) else np.zeros(len(codes), bool)
        counts = np.where(found, self.pair_counts[idx] if len(self.pairs) else 0, 0)
        return -np.log((counts + self.k) / (self.prev_counts[prev] + self.k * self.vocab))

    def score(self, encoded: Encoded, prefix: int, model: DocScores) -> dict[str, DocScores]:
        """Both baselines on the very tokens the model predicted (each document after the prefix token;
        of a conversation, the assistant's)."""
        docs = encoded.ids
        targets = np.concatenate([np.empty(0, np.int64), *(np.asarray(ids, np.int64) for ids in docs)])
        prev = np.concatenate(
            [np.empty(0, np.int64), *(np.asarray([prefix, *ids[:-1]], np.int64) for ids in docs if ids)]
        )
        doc = np.repeat(np.arange(len(docs)), [len(ids) for ids in docs])
        scored = (
            np.ones(len(targets))
            if encoded.scored is None
            else np.concatenate([np.empty(0), *encoded.scored])
        )
        out = {}
        for name, nll in (("unigram", self.unigram_nll(targets)), ("bigram", self.bigram_nll(prev, targets))):
            bits = np.bincount(doc, weights=nll * scored, minlength=len(docs)) / LN2
            out[name] = DocScores(model.documents, bits, model.tokens, model.bytes)
        return out


# ---------------------------------------------------------------------------------------------
# samples and plots


def generate_samples(
    model, tokenizer, cfg: EvaluateConfig, device: torch.device, template: str | None = None
) -> list[dict]:
    """Continuations of each of evaluate.prompts; with a chat template, the replies to each as a user's
    message, rendered as a server renders it, ending at the template's end of turn."""
    samples, stops = [], [tokenizer.eos_token_id]
    if template is not None:
        stops += end_of_turn_ids(tokenizer, template)
    for prompt in cfg.prompts:
        if template is None:
            inputs = tokenizer(prompt, return_tensors="pt").to(device)
        else:
            text = render_text(
                tokenizer, template, [{"role": "user", "content": prompt}], generation_prompt=True
            )
            inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
        # never past the model's context: positions beyond it do not exist (an IndexError in GPT-2)
        room = context_length(model.config) - inputs["input_ids"].shape[1]
        if room < 1:
            raise ConfigError(f"evaluate.prompts: {prompt!r} fills the model's whole context")
        out = {"prompt": prompt}
        for mode, kwargs in (
            ("greedy", {"do_sample": False}),
            ("sampled", {"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k}),
        ):
            torch.manual_seed(cfg.seed)
            ids = model.generate(
                **inputs,
                max_new_tokens=min(cfg.max_new_tokens, room),
                pad_token_id=tokenizer.eos_token_id,
                eos_token_id=stops,
                **kwargs,
            )
            out[mode] = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append(out)
    return samples


# ---------------------------------------------------------------------------------------------
# the stage


def split_figures(prefix: str, split: str, scores: DocScores) -> dict:
    return {
        f"{prefix}{split}_bits_per_byte": round(scores.bits_per_byte, 6),
        f"{prefix}{split}_perplexity": round(math.exp(scores.loss), 3),
    }


def evaluate(params: Params, ws: Workspace) -> dict:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pipeline.base_model import resolve_base

    hf_logging.set_verbosity_error()  # generate() warns about pad == eos, which is how GPT-2 is set up

    cfg = params.evaluate
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = Manifest.read(ws.shards_dir)
    train_summary = TrainSummary.load(ws.model_dir / TrainSummary.FILE)
    model = load_model(ws.model_dir).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(ws.model_dir)
    baseline = NGramBaseline(
        load_shard(ws.shards_dir, "train", manifest), manifest.vocab_size, cfg.smoothing_k
    )
    base_dir = resolve_base(params.model.base, ws, params) if params.model.base else None

    metrics: dict = {}
    scores: dict = {}
    eval_tokens, eval_seconds = 0, 0.0
    template = manifest.chat_template  # conversations: their assistant turns are scored
    docs_by_split = {
        split: held_out_documents(manifest, ws.shards_dir, split, cfg.max_bytes) for split in HELD_OUT
    }
    for split, docs in docs_by_split.items():
        start = time.perf_counter()
        encoded = encode_held_out(tokenizer, docs, template)
        mine = score_documents(model, tokenizer, docs, cfg.batch_size, device, template, encoded)
        eval_seconds += time.perf_counter() - start
        eval_tokens += int(mine.tokens.sum())
        baselines = baseline.score(encoded, prefix_token_id(tokenizer), mine)
        metrics |= {
            **split_figures("", split, mine),
            f"{split}_loss": round(mine.loss, 5),
            f"{split}_tokens": int(mine.tokens.sum()),
            f"{split}_bytes": int(mine.bytes.sum()),
            f"{split}_documents": len(docs),
            **split_figures("unigram_", split, baselines["unigram"]),
            **split_figures("bigram_", split, baselines["bigram"]),
        }
        scores[split] = {"documents": mine.documents, "challenger": mine.to_dict()}
    if base_dir is not None:  # a fine-tune must beat its base on the same bytes: the gate checks
        for split, theirs in score_model_dir(
            base_dir, docs_by_split, cfg.batch_size, device, template
        ).items():
            metrics[f"base_{split}_bits_per_byte"] = round(theirs.bits_per_byte, 6)
            scores[split]["base"] = theirs.to_dict()
    # Measured by preprocess: a figure on val/test n-grams that were also trained on is not evidence.
    contamination = manifest.contamination or {}
    for split in HELD_OUT:
        metrics[f"{split}_contamination"] = contamination.get(split)
    metrics["eval_tokens_per_s"] = round(eval_tokens / max(eval_seconds, 1e-9))
    metrics |= {"train_" + k: v for k, v in train_summary.to_dict().items()}

    ws.eval_dir.mkdir(parents=True, exist_ok=True)
    samples = generate_samples(model, tokenizer, cfg, device, template)
    write_json(ws.eval_dir / "samples.json", samples)
    plot_loss_curve(ws.train_log, ws.eval_dir)
    write_json(ws.eval_dir / SCORES_FILE, scores)
    write_json(ws.eval_dir / METRICS_FILE, metrics)
    return metrics


def run() -> None:
    ws = Workspace.find()
    m = evaluate(load_params(ws.root), ws)
    base = f", base {m['base_val_bits_per_byte']:.4f}" if "base_val_bits_per_byte" in m else ""
    print(
        f"evaluate: val {m['val_bits_per_byte']:.4f} bits/byte (bigram {m['bigram_val_bits_per_byte']:.4f}, "
        f"unigram {m['unigram_val_bits_per_byte']:.4f}{base}), test {m['test_bits_per_byte']:.4f}; "
        f"per token: val ppl {m['val_perplexity']:.2f} (bigram {m['bigram_val_perplexity']:.2f}); "
        f"contamination val {m['val_contamination']:.2%}, test {m['test_contamination']:.2%}"
    )


def main() -> int:
    return run_stage("evaluate", run)


if __name__ == "__main__":
    raise SystemExit(main())
