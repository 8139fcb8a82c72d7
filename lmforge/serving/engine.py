"""Generation: batched decoding with a KV cache, shared by the service, `lmforge generate` and the bench.

One engine thread owns the model and decodes every active request together, one forward pass per
token for the whole batch; on a CPU a pass over 16 rows costs little more than over one. Between
steps it admits waiting requests (continuous batching): they are prefilled together, left-padded
and joined to the batch's KV cache, and a finished row leaves at once. So a request never waits for
another to finish. Each row keeps its own sampling settings, seed, stop strings and token budget;
text streams out per row as it is decoded.

"""

from __future__ import annotations

import inspect
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lmforge.serving.errors import ServingError


class GenerationError(ServingError):
    """A request the model cannot serve as asked (too long, bad settings); the message says why."""


class EngineStopped(RuntimeError):
    """The engine's decoding thread has died: nothing more will be decoded by this worker."""


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


class _Closed(Exception):
    """Raised in the engine thread when close() asks it to end."""


_CLOSE = object()  # queued by close(): the thread ends when it takes it


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    deltas: bool = True  # False: only the Completion, so no text is decoded token by token
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)  # for the service's latency metrics
    first_token_at: float | None = None


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, request: _Request, tokenizer, budget: int, vocab: int, device: torch.device):
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


class Engine:
    """Owns the model; `submit()` and `stream()` are safe to call from any thread."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.model = model.eval()
        self.on_batch = on_batch  # called with each batch's size: the service exports it as a metric
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context = context_length(model)
        # No token is longer than the longest vocabulary entry, so a prompt over context × that many
        # characters cannot fit: it is refused without spending seconds tokenizing a megabyte.
        self.max_prompt_chars = self.context * max(len(t) for t in tokenizer.get_vocab())
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.vocab = len(tokenizer)  # token ids a request may name
        self.logits_width = model.get_output_embeddings().weight.shape[0]
        self.max_batch_size = max_batch_size
        self._token_texts: dict[int, str] = {}
        # a prefill that needs no prompt logprobs computes the last position's logits only
        self.keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.queue: queue.Queue = queue.Queue()  # _Requests, and _CLOSE at the end
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.thread.start()

    # -- the public side --------------------------------------------------------------------

    def encode(self, prompt: str, add_special_tokens: bool = False) -> list[int]:
        # checked before tokenizing: a 1 MB prompt is refused at once instead of stalling the worker
        if len(prompt) > self.max_prompt_chars:
            raise GenerationError(
                f"prompt: {len(prompt):,} characters cannot fit the model's context of {self.context} tokens"
            )
        return self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]

    def check_ids(self, name: str, ids: list[int]) -> None:
        if bad := [t for t in ids if not 0 <= t < self.vocab]:
            raise GenerationError(f"{name}: token id {bad[0]} is not in the vocabulary (0..{self.vocab - 1})")

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise GenerationError("prompt: must not be empty")
        self.check_ids("prompt", prompt_ids)
        # scoring (prompt logprobs) may fill the context; generating needs room for one new token
        room = 0 if params.prompt_logprobs is not None else 1
        if len(prompt_ids) + room > self.context:
            raise GenerationError(
                f"prompt: {len(prompt_ids)} tokens, but the model's context is {self.context} tokens"
                + (" (the prompt must leave room for at least one new token)" if room else "")
            )
        if params.max_new_tokens < 0 or (params.max_new_tokens == 0 and params.prompt_logprobs is None):
            raise GenerationError("max_new_tokens: must be at least 1 (0 only to score the prompt)")
        # a bad setting fails this request here, not the whole batch it would join in the engine
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise GenerationError("temperature: must be a finite number, at least 0")
        if not 0 < params.top_p <= 1:
            raise GenerationError("top_p: must be in (0, 1]")
        if params.top_k < 0:
            raise GenerationError("top_k: must be at least 0")
        if not 0 <= params.min_p <= 1:
            raise GenerationError("min_p: must be in [0, 1]")
        if not (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0):
            raise GenerationError("repetition_penalty: must be a finite number above 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(params, name)):
                raise GenerationError(f"{name}: must be a finite number")
        for name, ids in (("logit_bias", list(params.logit_bias)), ("stop_token_ids", params.stop_token_ids)):
            self.check_ids(name, ids)
        if not all(math.isfinite(b) for b in params.logit_bias.values()):
            raise GenerationError("logit_bias: values must be finite numbers")
        for name in ("logprobs", "prompt_logprobs"):
            if (value := getattr(params, name)) is not None and value < 0:
                raise GenerationError(f"{name}: must be at least 0")

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (a byte-level piece of a character reads as U+FFFD)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def waiting(self) -> int:
        """Requests queued for the engine, not yet in its batch."""
        return self.queue.qsize()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        """Stop the decoding thread once it has nothing to do, and let the model go: for a worker that
        has switched to another model. Requests still queued then fail with EngineStopped."""
        self.queue.put(_CLOSE)
        self.thread.join()
        self.model = None

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[Event], None],
        deltas: bool = True,
    ):
        """Queue one request; emit() gets Deltas (unless deltas=False), then a Completion (or an
        exception)."""
        self.check(prompt_ids, params)
        if not self.alive:
            raise EngineStopped("the engine has stopped: this worker decodes nothing more")
        request = _Request(list(prompt_ids), params, emit, deltas)
        self.queue.put(request)
        return request

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Event]:
        """Blocking iterator of Deltas then the Completion, for callers without an event loop."""
        events: queue.Queue[Event] = queue.Queue()
        request = self.submit(self.encode(prompt), params, events.put)
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Completion):
                    return
        finally:
            request.cancelled.set()

    # -- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        """Decode until the process ends. An error in a batch fails that batch's requests; anything
        that stops the loop itself fails every request it holds or that waits, so none hangs."""
        self._active = _Batch()
        try:
            self._decode()
        except _Closed:
            stopped = EngineStopped("the engine was closed: this worker serves another model now")
            while not self.queue.empty():
                self.queue.get_nowait().emit(stopped)
        except BaseException as exc:
            stopped = EngineStopped(f"the engine has stopped ({type(exc).__name__}: {exc})")
            for row in self._active.rows:
                row.request.emit(stopped)
            while not self.queue.empty():
                self.queue.get_nowait().emit(stopped)
            raise

    def _decode(self) -> None:
        active = self._active
        while True:
            room = self.max_batch_size - len(active.rows)
            # A batch whose cache can take new rows admits waiting requests between decode steps, so a
            # request never waits for a whole batch to finish (continuous batching).
            if room and (not active.rows or active.mergeable):
                waiting = self._take(room, wait=not active.rows)
                if waiting and self.on_batch:
                    self.on_batch(len(waiting))
                # prompts to score are prefilled apart, with every position's logits; the rest keep only
                # the last position's, so one scoring request never inflates a whole batch's logits
                scoring = [r for r in waiting if r.params.prompt_logprobs is not None]
                for group in (scoring, [r for r in waiting if r.params.prompt_logprobs is None]):
                    try:
                        if group:
                            self._admit(active, group)
                    except Exception as exc:  # noqa: BLE001 - fails the new requests, not the batch
                        for request in group:
                            request.emit(exc)
            if not active.rows:
                continue
            try:
                self._step(active)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the engine
                for row in active.rows:
                    row.request.emit(exc)
                active = self._active = _Batch()

    def _take(self, room: int, wait: bool) -> list[_Request]:
        """Up to `room` queued requests; with `wait` (nothing is decoding), block for the first one.
        No waiting for company: a request that arrives a moment later joins at the next step."""
        taken = [self.queue.get()] if wait else []
        try:
            while len(taken) < room:
                taken.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        if _CLOSE in taken:  # only an idle engine is closed, so nothing else was queued before it
            raise _Closed
        return [r for r in taken if not r.cancelled.is_set()]

    @torch.inference_mode()
    def _admit(self, active: _Batch, requests: list[_Request]) -> None:
        """Prefill the requests together (all of them scoring their prompts, or none), then join the rows
        that generate to the decoding batch; a scoring-only row is done here."""
        rows = [
            _Row(
                r,
                self.tokenizer,
                min(r.params.max_new_tokens, self.context - len(r.prompt_ids)),
                self.logits_width,
                self.device,
            )
            for r in requests
        ]
        width = max(len(r.prompt_ids) for r in requests)
        # Left padding: every row's last prompt token sits in the last column, so one step decodes all.
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(requests), width), dtype=torch.long, device=self.device)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, device=self.device)
            mask[i, width - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        scoring = [i for i, r in enumerate(requests) if r.params.prompt_logprobs is not None]
        extra = {"logits_to_keep": 1} if self.keep_last_logits and not scoring else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        for i in scoring:
            self._score_prompt(rows[i], out.logits[i, width - len(requests[i].prompt_ids) : -1])
        fresh = _Batch()
        fresh.join(rows, out.past_key_values, mask, positions[:, -1:] + 1, out.logits[:, -1, :])
        done = [row for row in rows if row.finish]
        fresh.keep([i for i, row in enumerate(rows) if not row.finish])
        for row in done:
            row.flush()
        if fresh.rows:
            active.join(fresh.rows, fresh.cache, fresh.mask, fresh.positions, fresh.logits)

    def _score_prompt(self, row: _Row, logits: torch.Tensor) -> None:
        """The teacher-forced logprob of each prompt token after the first, from the prefill's logits."""
        targets = torch.tensor(row.request.prompt_ids[1:], device=logits.device)
        scored = top_logprobs(logits, targets, row.params.prompt_logprobs) if len(targets) else []
        row.prompt_logprobs = [None, *scored]
        if row.request.deltas:  # a stream that echoes its prompt shows these before any new text
            row.request.emit(Delta("", [], row.prompt_logprobs))

    @torch.inference_mode()
    def _step(self, active: _Batch) -> None:
        """Sample one token for every row, retire the finished rows, run one forward pass for the rest."""
        next_inputs: dict[int, int] = {}  # row index -> its new token, for the rows still decoding
        greedy = None  # plain greedy rows take one argmax over the batch, not one call per row
        if any(r.params.temperature == 0 and not r.params.shapes_logits for r in active.rows):
            greedy = active.logits.argmax(-1).tolist()
        for i, row in enumerate(active.rows):
            if row.request.cancelled.is_set():
                row.finish = "cancelled"
                continue
            logits = active.logits[i]
            if greedy is not None and row.params.temperature == 0 and not row.params.shapes_logits:
                token = greedy[i]
            else:
                token = sample_next(row.shape(logits), row.params, row.generator)
            logprob = None
            if row.params.logprobs is not None:
                chosen = torch.tensor([token], device=logits.device)
                (logprob,) = top_logprobs(logits.unsqueeze(0), chosen, row.params.logprobs)
            row.push(token, self.eos_id, logprob)
            row.flush()
            if row.finish is None:
                next_inputs[i] = token
        active.keep(list(next_inputs))
        if not active.rows:
            return
        step = torch.tensor(list(next_inputs.values()), dtype=torch.long, device=self.device).unsqueeze(1)
        active.mask = torch.cat([active.mask, torch.ones_like(step)], dim=1)
        out = self.model(
            input_ids=step,
            attention_mask=active.mask,
            position_ids=active.positions,
            past_key_values=active.cache,
            use_cache=True,
        )
        active.cache, active.logits = out.past_key_values, out.logits[:, -1, :]
        active.positions = (active.positions + 1).clamp(max=self.context - 1)


class _Batch:
    """The rows decoding together: their KV cache, attention mask, next positions and last logits.

    Row i of every tensor is rows[i]. Rows join with left padding, so all end in the same column."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.cache = self.mask = self.positions = self.logits = None

    @property
    def mergeable(self) -> bool:
        """Whether rows can join mid-decode: a cache of plain per-layer key/value tensors. Sliding-window
        and recurrent caches cannot be padded like that, so such models decode in waves."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        return type(self.cache) is DynamicCache and all(
            type(layer) is DynamicLayer for layer in self.cache.layers
        )

    def join(self, rows: list[_Row], cache, mask, positions, logits) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.logits = (
                rows,
                cache,
                mask,
                positions,
                logits,
            )
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.rows = self.rows + rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows; then drop leading columns that are padding for every row left."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache = self.mask = self.positions = self.logits = None
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead and self.mergeable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros before `tensor` along dim, up to width (a zero mask column hides the zero keys)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def context_length(model) -> int:
    """Tokens the model can attend over (GPT-2: n_positions; most others: max_position_embeddings)."""
    config = model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0) or 0)


def load_engine(
    model_dir,
    max_batch_size: int = 16,
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Engine:
    """Model and tokenizer from a Hugging Face directory (safetensors only), on the GPU if there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Engine(model, tokenizer, max_batch_size=max_batch_size, on_batch=on_batch)
