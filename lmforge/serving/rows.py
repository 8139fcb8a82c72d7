"""One request inside the engine: what it asked (Request), and its decoding state in the batch (Row):
logit shaping (bias, penalties), incremental decoding of its text, stop strings and tokens, its budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.serving.sampling import Completion, Delta, Event, SamplingParams, TokenLogprob


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    deltas: bool = True  # False: only the Completion, so no text is decoded token by token
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)  # for the service's latency metrics
    first_token_at: float | None = None


class Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, request: Request, tokenizer, budget: int, vocab: int, device: torch.device):
        self.request, self.tokenizer = request, tokenizer
        self.params = p = request.params
        self.budget = budget  # new tokens allowed: max_new_tokens, cut to what the context holds
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.sent = 0  # characters of text already emitted
        self.sent_logprobs = 0
        self.text = ""
        self.decoded = 0  # how many of ids the text reflects
        self.stop_scan = 0  # stop strings cannot start before this character of text
        self.finish: str | None = None if budget > 0 else "length"
        self.generator = None
        if p.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(p.seed)
        # text that could still become a stop string is held back until it cannot
        self.holdback = max((len(s) for s in p.stop), default=1) - 1
        self.ends = set(p.stop_token_ids)
        # logit shaping state, only for rows that ask for it: a bias vector, output counts, seen tokens
        self.bias = self.counts = self.seen = None
        if p.logit_bias:
            self.bias = torch.zeros(vocab, device=device)
            self.bias[list(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()), device=device)
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
        if p.repetition_penalty != 1:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[request.prompt_ids] = True

    def shape(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the pick sees: bias, then the repetition, frequency and presence penalties."""
        p = self.params
        if not p.shapes_logits:
            return logits
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias[: logits.numel()]
        if self.seen is not None:
            seen = self.seen[: logits.numel()]
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        if self.counts is not None:
            counts = self.counts[: logits.numel()]
            logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        return logits

    def push(self, token: int, eos_id: int | None, logprob: TokenLogprob | None = None) -> None:
        if self.request.first_token_at is None:
            self.request.first_token_at = time.monotonic()
        if token in self.ends or (token == eos_id and not self.params.ignore_eos):
            self.finish = "stop"
            return
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if len(self.ids) >= self.budget:
            self.finish = "length"
        # A request without deltas or stop strings needs its text only at the end: decoding the whole
        # sequence every token would cost more than the forward pass on a small model.
        if self.request.deltas or self.params.stop or self.finish:
            self._decode()

    def _decode(self) -> None:
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.decoded = len(self.ids)
        if not self.params.stop:
            return
        # only the new text, and the stop-length tail before it, can hold a stop string not seen yet
        cuts = [c for s in self.params.stop if (c := self.text.find(s, self.stop_scan)) != -1]
        if cuts:
            self.text, self.finish = self.text[: min(cuts)], "stop"
        self.stop_scan = max(0, len(self.text) - self.holdback - 4)  # 4: a multi-byte character completing

    def flush(self) -> None:
        """Emit the text that is final: all of it when done, else all but a possible stop string's
        start and an unfinished multi-byte character."""
        if not (self.request.deltas or self.finish):
            return
        if self.finish and self.decoded != len(self.ids):  # ended at EOS with the text not yet decoded
            self._decode()
        end = len(self.text) if self.finish else len(self.text) - self.holdback
        if not self.finish:
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end > self.sent or (self.finish and self.sent_logprobs < len(self.logprobs)):
            self.request.emit(Delta(self.text[self.sent : end], self.logprobs[self.sent_logprobs :]))
            self.sent, self.sent_logprobs = end, len(self.logprobs)
        if self.finish:
            self.request.emit(self.completion())

    def completion(self) -> Completion:
        p = self.params
        return Completion(
            self.text, len(self.request.prompt_ids), len(self.ids), self.finish or "length", list(self.ids),
            self.logprobs if p.logprobs is not None else None, self.prompt_logprobs,
        )  # fmt: skip
