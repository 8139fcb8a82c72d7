"""What a request asks of the engine and what it gets back: its sampling settings, the events of its
stream (text deltas, then the completion), and the pick of each next token from the model's logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """One request's settings, with vLLM's meanings. Penalties and logit_bias shape the logits before
    the pick (greedy included); logprobs are always those of the model's own distribution."""

    max_new_tokens: int = 64  # 0: no new token, only the prompt's logprobs (scoring)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # end like EOS; the token is not in the text
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    repetition_penalty: float = 1.0  # divides (or multiplies, if negative) logits of prompt and output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits
    logprobs: int | None = None  # per new token: its logprob, and this many top alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token after the first

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def shapes_logits(self) -> bool:
        return bool(
            self.logit_bias or self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
        )


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the likeliest tokens at this position, best first


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS, a stop string or a stop token) or "length"
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token; the first is None


@dataclass
class Delta:
    """New final text of a streamed request, with the logprobs of the tokens decoded since the last one."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first Delta of a scored prompt


# A stream yields Deltas, then one Completion at the end.
Event = Delta | Completion | BaseException


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Each row's chosen token's logprob and the k likeliest, from raw logits [rows, vocab]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    ids = chosen.tolist()
    if k:
        values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in ids]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(ids, picked, tops, strict=True)]


def sample_next(logits: torch.Tensor, params: SamplingParams, generator) -> int:
    """One token from one row's logits: greedy at temperature 0, else temperature, min-p, top-k, top-p."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # float64, and the max subtracted before dividing: a tiny temperature (1e-45 is a float32 zero)
    # then sends the other logits to -inf instead of making inf/inf = NaN probabilities
    logits = logits.double()
    logits = (logits - logits.max()) / params.temperature
    if params.min_p > 0:  # the max is now 0, so min_p x p_max is a logit cut at log(min_p)
        logits = logits.masked_fill(logits < math.log(params.min_p), -math.inf)
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p, and always the top token
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
