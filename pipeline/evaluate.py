"""Evaluate: perplexity on val and test, against unigram and bigram baselines on the same tokens.

The baselines are fitted on the train shards and scored on exactly the positions the model predicts
(each window's tokens after its first), so the three perplexities are directly comparable. Also
writes sample continuations, the loss curve (PNG, and JSON for `dvc plots`) and metrics.json.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from pipeline.config import ConfigError, EvaluateConfig, Params, Workspace, load_params
from pipeline.contracts import (
    METRICS_FILE,
    Manifest,
    TrainSummary,
    write_json,
)
from pipeline.data import fixed_windows, mean_loss
from pipeline.generation import context_length
from pipeline.model import load_model
from pipeline.plots import plot_loss_curve
from pipeline.shards import load_shard, sorted_unique
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

    def perplexities(self, windows: torch.Tensor) -> dict[str, float]:
        ids = windows.numpy()
        prev, targets = ids[:, :-1].ravel(), ids[:, 1:].ravel()
        return {
            "unigram": math.exp(self.unigram_nll(targets).mean()),
            "bigram": math.exp(self.bigram_nll(prev, targets).mean()),
        }


# ---------------------------------------------------------------------------------------------
# samples and plots


def generate_samples(model, tokenizer, cfg: EvaluateConfig, device: torch.device) -> list[dict]:
    samples = []
    for prompt in cfg.prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        # never past the model's context: positions beyond it do not exist (an IndexError in GPT-2)
        room = context_length(model) - inputs["input_ids"].shape[1]
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
                **kwargs,
            )
            out[mode] = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append(out)
    return samples


# ---------------------------------------------------------------------------------------------
# the stage


def evaluate(params: Params, ws: Workspace) -> dict:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate() warns about pad == eos, which is how GPT-2 is set up

    cfg, block = params.evaluate, params.model.block_size
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = Manifest.read(ws.shards_dir)
    train_summary = TrainSummary.load(ws.model_dir / TrainSummary.FILE)
    model = load_model(ws.model_dir).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(ws.model_dir)
    baseline = NGramBaseline(
        load_shard(ws.shards_dir, "train", manifest), manifest.vocab_size, cfg.smoothing_k
    )

    metrics: dict = {}
    eval_tokens, eval_seconds = 0, 0.0
    for split in ("val", "test"):
        windows = fixed_windows(load_shard(ws.shards_dir, split, manifest), block, cfg.max_windows)
        start = time.perf_counter()
        loss, tokens = mean_loss(model, windows, cfg.batch_size, device)
        eval_seconds += time.perf_counter() - start
        eval_tokens += windows.numel()
        base = baseline.perplexities(windows)
        metrics |= {
            f"{split}_loss": round(loss, 5),
            f"{split}_perplexity": round(math.exp(loss), 3),
            f"{split}_tokens": tokens,
            f"unigram_{split}_perplexity": round(base["unigram"], 3),
            f"bigram_{split}_perplexity": round(base["bigram"], 3),
        }
    # Measured by preprocess: a perplexity on val/test n-grams that were also trained on is not evidence.
    contamination = manifest.contamination or {}
    for split in ("val", "test"):
        metrics[f"{split}_contamination"] = contamination.get(split)
    metrics["eval_tokens_per_s"] = round(eval_tokens / eval_seconds)
    metrics |= {"train_" + k: v for k, v in train_summary.to_dict().items()}

    ws.eval_dir.mkdir(parents=True, exist_ok=True)
    samples = generate_samples(model, tokenizer, cfg, device)
    write_json(ws.eval_dir / "samples.json", samples)
    plot_loss_curve(ws.train_log, ws.eval_dir)
    write_json(ws.eval_dir / METRICS_FILE, metrics)
    return metrics


def run() -> None:
    ws = Workspace.find()
    metrics = evaluate(load_params(ws.root), ws)
    print(
        f"evaluate: val ppl {metrics['val_perplexity']:.2f} (bigram {metrics['bigram_val_perplexity']:.2f}, "
        f"unigram {metrics['unigram_val_perplexity']:.2f}), test ppl {metrics['test_perplexity']:.2f}; "
        f"contamination val {metrics['val_contamination']:.2%}, test {metrics['test_contamination']:.2%}"
    )


def main() -> int:
    return run_stage("evaluate", run)


if __name__ == "__main__":
    raise SystemExit(main())
