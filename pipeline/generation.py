"""Generation: batched decoding with a KV cache, shared by the service, `lmforge generate` and the bench.

One engine thread owns the model and decodes every active request together, one forward pass per
token for the whole batch; on a CPU a pass over 16 rows costs little more than over one. Between
steps it admits waiting requests (continuous batching): they are prefilled together, left-padded
and joined to the batch's KV cache, and a finished row leaves at once. So a request never waits for
another to finish. Each row keeps its own sampling settings, seed, stop strings and token budget;
text streams out per row as it is decoded.

This module imports no lmforge config: it travels inside the Bento on its own.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


class GenerationError(ValueError):
    """A request the model cannot serve as asked (too long, bad settings); the message says why."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


# A stream yields text deltas, then one Completion at the end.
Event = str | Completion | BaseException


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    deltas: bool = True  # False: only the Completion, so no text is decoded token by token
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, request: _Request, tokenizer, budget: int):
        self.request, self.tokenizer = request, tokenizer
        self.params = request.params
        self.budget = budget  # new tokens allowed: max_new_tokens, cut to what the context holds
        self.ids: list[int] = []
        self.sent = 0  # characters of text already emitted
        self.text = ""
        self.decoded = 0  # how many of ids the text reflects
        self.finish: str | None = None
        self.generator = None
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        # text that could still become a stop string is held back until it cannot
        self.holdback = max((len(s) for s in self.params.stop), default=1) - 1

    def push(self, token: int, eos_id: int | None) -> None:
        if token == eos_id:
            self.finish = "stop"
            return
        self.ids.append(token)
        if len(self.ids) >= self.budget:
            self.finish = "length"
        # A request without deltas or stop strings needs its text only at the end: decoding the whole
        # sequence every token would cost more than the forward pass on a small model.
        if self.request.deltas or self.params.stop or self.finish:
            self._decode()

    def _decode(self) -> None:
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.decoded = len(self.ids)
        for stop in self.params.stop:
            cut = self.text.find(stop)
            if cut != -1:
                self.text, self.finish = self.text[:cut], "stop"
                break

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
        if end > self.sent:
            self.request.emit(self.text[self.sent : end])
            self.sent = end
        if self.finish:
            self.request.emit(Completion(self.text, len(self.request.prompt_ids), len(self.ids), self.finish))


def sample_next(logits: torch.Tensor, params: SamplingParams, generator) -> int:
    """One token from one row's logits: greedy at temperature 0, else temperature, top-k, top-p."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # float64, and the max subtracted before dividing: a tiny temperature (1e-45 is a float32 zero)
    # then sends the other logits to -inf instead of making inf/inf = NaN probabilities
    logits = logits.double()
    logits = (logits - logits.max()) / params.temperature
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
        self.max_batch_size = max_batch_size
        self.queue: queue.Queue[_Request] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.thread.start()

    # -- the public side --------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        if len(prompt) > self.max_prompt_chars:
            raise GenerationError(
                f"prompt: {len(prompt):,} characters cannot fit the model's context of {self.context} tokens"
            )
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise GenerationError("prompt: must not be empty")
        if len(prompt_ids) >= self.context:
            raise GenerationError(
                f"prompt: {len(prompt_ids)} tokens, but the model's context is {self.context} tokens "
                f"(the prompt must leave room for at least one new token)"
            )
        if params.max_new_tokens < 1:
            raise GenerationError("max_new_tokens: must be at least 1")
        # a bad setting fails this request here, not the whole batch it would join in the engine
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise GenerationError("temperature: must be a finite number, at least 0")
        if not 0 < params.top_p <= 1:
            raise GenerationError("top_p: must be in (0, 1]")
        if params.top_k < 0:
            raise GenerationError("top_k: must be at least 0")

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[Event], None],
        deltas: bool = True,
    ):
        """Queue one request; emit() gets text deltas (unless deltas=False), then a Completion (or an
        exception)."""
        self.check(prompt_ids, params)
        request = _Request(list(prompt_ids), params, emit, deltas)
        self.queue.put(request)
        return request

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Event]:
        """Blocking iterator of text deltas then the Completion, for callers without an event loop."""
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
        active = _Batch()
        while True:
            room = self.max_batch_size - len(active.rows)
            # A batch whose cache can take new rows admits waiting requests between decode steps, so a
            # request never waits for a whole batch to finish (continuous batching).
            if room and (not active.rows or active.mergeable):
                waiting = self._take(room, wait=not active.rows)
                if waiting:
                    if self.on_batch:
                        self.on_batch(len(waiting))
                    try:
                        self._admit(active, waiting)
                    except Exception as exc:  # noqa: BLE001 - fails the new requests, not the batch
                        for request in waiting:
                            request.emit(exc)
            if not active.rows:
                continue
            try:
                self._step(active)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the engine
                for row in active.rows:
                    row.request.emit(exc)
                active = _Batch()

    def _take(self, room: int, wait: bool) -> list[_Request]:
        """Up to `room` queued requests; with `wait` (nothing is decoding), block for the first one.
        No waiting for company: a request that arrives a moment later joins at the next step."""
        taken = [self.queue.get()] if wait else []
        try:
            while len(taken) < room:
                taken.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        return [r for r in taken if not r.cancelled.is_set()]

    @torch.inference_mode()
    def _admit(self, active: _Batch, requests: list[_Request]) -> None:
        """Prefill the requests together, then join their rows to the decoding batch."""
        rows = [
            _Row(r, self.tokenizer, min(r.params.max_new_tokens, self.context - len(r.prompt_ids)))
            for r in requests
        ]
        width = max(len(r.prompt_ids) for r in requests)
        # Left padding: every row's last prompt token sits in the last column, so one step decodes all.
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        active.join(rows, out.past_key_values, mask, positions[:, -1:] + 1, out.logits[:, -1, :])

    @torch.inference_mode()
    def _step(self, active: _Batch) -> None:
        """Sample one token for every row, retire the finished rows, run one forward pass for the rest."""
        next_inputs: dict[int, int] = {}  # row index -> its new token, for the rows still decoding
        for i, row in enumerate(active.rows):
            if row.request.cancelled.is_set():
                row.finish = "cancelled"
                continue
            token = sample_next(active.logits[i], row.params, row.generator)
            row.push(token, self.eos_id)
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
