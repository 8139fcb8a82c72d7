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
from collections.abc import Callable, Iterator

import torch

from lmforge.architecture import context_length
from lmforge.serving.batch import Batch
from lmforge.serving.errors import ServingError
from lmforge.serving.rows import Request, Row
from lmforge.serving.sampling import (
    Completion,
    Delta,
    Event,
    SamplingParams,
    sample_next,
    top_logprobs,
)


class GenerationError(ServingError):
    """A request the model cannot serve as asked (too long, bad settings); the message says why."""


class EngineStopped(RuntimeError):
    """The engine's decoding thread has died: nothing more will be decoded by this worker."""


class _Closed(Exception):
    """Raised in the engine thread when close() asks it to end."""


_CLOSE = object()  # queued by close(): the thread ends when it takes it


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
        self.context = context_length(model.config)
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
        self.queue: queue.Queue = queue.Queue()  # Requests, and _CLOSE at the end
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
        request = Request(list(prompt_ids), params, emit, deltas)
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
        self._active = Batch()
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
                active = self._active = Batch()

    def _take(self, room: int, wait: bool) -> list[Request]:
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
    def _admit(self, active: Batch, requests: list[Request]) -> None:
        """Prefill the requests together (all of them scoring their prompts, or none), then join the rows
        that generate to the decoding batch; a scoring-only row is done here."""
        rows = [
            Row(
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
        fresh = Batch()
        fresh.join(rows, out.past_key_values, mask, positions[:, -1:] + 1, out.logits[:, -1, :])
        done = [row for row in rows if row.finish]
        fresh.keep([i for i, row in enumerate(rows) if not row.finish])
        for row in done:
            row.flush()
        if fresh.rows:
            active.join(fresh.rows, fresh.cache, fresh.mask, fresh.positions, fresh.logits)

    def _score_prompt(self, row: Row, logits: torch.Tensor) -> None:
        """The teacher-forced logprob of each prompt token after the first, from the prefill's logits."""
        targets = torch.tensor(row.request.prompt_ids[1:], device=logits.device)
        scored = top_logprobs(logits, targets, row.params.prompt_logprobs) if len(targets) else []
        row.prompt_logprobs = [None, *scored]
        if row.request.deltas:  # a stream that echoes its prompt shows these before any new text
            row.request.emit(Delta("", [], row.prompt_logprobs))

    @torch.inference_mode()
    def _step(self, active: Batch) -> None:
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
