"""The generation engine in-process: continuous batching gives every request the output it gets alone."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.serving.engine import Engine
from lmforge.serving.rows import Request, Row
from lmforge.serving.sampling import Completion, Delta, SamplingParams
from lmforge.training.model import build_model

WORDS = "the a model data shard token train loss step value river stone light quick brown fox".split()


@pytest.fixture(scope="module")
def engine_parts():
    tokenizer = train_tokenizer(iter([" ".join(WORDS * 20)] * 50), vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), len(tokenizer), 0)
    # Large embeddings: logits far apart, so greedy picks cannot flip on float rounding between a batch
    # of one and a padded batch of several; and a wrong position or a wrong key changes the output.
    torch.nn.init.normal_(model.transformer.wte.weight, std=1.0)
    torch.nn.init.normal_(model.transformer.wpe.weight, std=1.0)
    for block in model.transformer.h:
        torch.nn.init.normal_(block.attn.c_attn.weight, std=0.5)
    return model.eval(), tokenizer


def collect(engine: Engine, prompt: str, params: SamplingParams, on_event=None) -> Completion:
    events: queue.Queue = queue.Queue()

    def emit(event):
        events.put(event)
        if on_event:
            on_event(event)  # runs on the engine thread, between two decode steps

    engine.submit(engine.encode(prompt), params, emit)
    while True:
        event = events.get(timeout=60)
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Completion):
            return event


PROMPTS = ["the quick", "a model data shard token", "river", "stone light fox the a"]


def test_requests_joining_mid_decode_get_their_solo_output(engine_parts):
    model, tokenizer = engine_parts
    joined: list[int] = []
    engine = Engine(model, tokenizer, max_batch_size=8, on_batch=joined.append)
    greedy = [SamplingParams(max_new_tokens=n, temperature=0) for n in (50, 12, 30, 5)]
    sampled = SamplingParams(max_new_tokens=25, temperature=0.9, top_k=20, seed=7)
    solo = [collect(engine, p, g) for p, g in zip(PROMPTS, greedy, strict=True)]
    solo_sampled = collect(engine, PROMPTS[1], sampled)
    assert [c.completion_tokens for c in solo] == [50, 12, 30, 5]  # no EOS in this vocabulary's pick

    # The first request decodes alone. The others are submitted from its own text events, so they
    # join while it runs, at different depths and with prompts of different lengths: the cache gets
    # padded on both sides, and rows leave while others stay.
    results: dict[int, Completion] = {}
    events: dict[int, queue.Queue] = {}
    schedule = {3: [1], 8: [2, 4], 20: [3]}  # after the first request's nth delta: these join
    seen = []

    def join_more(event):
        # On the engine thread, between two decode steps: what is submitted here is queued before the
        # next admission, so 2 and 4 are admitted together whatever the load on the machine.
        if isinstance(event, Delta):
            seen.append(event.text)
            for i in schedule.get(len(seen), []):
                prompt, params = (PROMPTS[1], sampled) if i == 4 else (PROMPTS[i], greedy[i])
                events[i] = queue.Queue()
                engine.submit(engine.encode(prompt), params, events[i].put)

    joined.clear()
    results[0] = collect(engine, PROMPTS[0], greedy[0], join_more)
    for i, pending in events.items():
        while not isinstance(event := pending.get(timeout=120), Completion):
            if isinstance(event, BaseException):
                raise event
        results[i] = event
    assert joined == [1, 1, 2, 1]  # four admissions, each while the first request was decoding
    assert [results[i].text for i in range(4)] == [c.text for c in solo]
    assert results[4].text == solo_sampled.text  # a seeded sampled row too
    assert all(c.text for c in solo)


def test_a_full_batch_admits_the_next_request_when_a_row_finishes(engine_parts):
    """4 requests through a batch of 2: every admission respects the limit and all finish."""
    model, tokenizer = engine_parts
    sizes: list[int] = []
    engine = Engine(model, tokenizer, max_batch_size=2, on_batch=sizes.append)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (50, 3, 3, 3)]
    with_threads = {}
    threads = [
        threading.Thread(
            target=lambda i=i: with_threads.__setitem__(i, collect(engine, PROMPTS[i], params[i]))
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [with_threads[i].completion_tokens for i in range(4)] == [50, 3, 3, 3]
    assert sum(sizes) == 4 and max(sizes) <= 2


def teacher_forced(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, from one plain forward pass of the sequence alone."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def test_prompt_logprobs_are_the_teacher_forced_ones_even_in_a_padded_batch(engine_parts):
    """Scoring requests of different lengths, one of them the whole context, prefilled together."""
    model, tokenizer = engine_parts
    sizes: list[int] = []
    engine = Engine(model, tokenizer, max_batch_size=8, on_batch=sizes.append)
    prompts = [engine.encode(p) for p in PROMPTS]
    prompts.append((prompts[1] * 20)[: engine.context])  # fills the context: allowed when only scoring
    assert len(prompts[-1]) == engine.context
    results: list[queue.Queue] = [queue.Queue() for _ in prompts]
    engine.queue.mutex.acquire()  # hold the queue so that all five are admitted in one prefill
    for ids, out in zip(prompts, results, strict=True):
        engine.queue.queue.append(
            Request(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=2), out.put, False)
        )
    engine.queue.not_empty.notify()
    engine.queue.mutex.release()
    for ids, out in zip(prompts, results, strict=True):
        done = out.get(timeout=60)
        assert isinstance(done, Completion), done
        assert (done.completion_tokens, done.finish_reason, done.text) == (0, "length", "")
        assert done.prompt_logprobs[0] is None and len(done.prompt_logprobs) == len(ids)
        got = torch.tensor([lp.logprob for lp in done.prompt_logprobs[1:]])
        torch.testing.assert_close(got, teacher_forced(model, ids), atol=1e-4, rtol=1e-4)
        assert [lp.token_id for lp in done.prompt_logprobs[1:]] == ids[1:]
        for lp in done.prompt_logprobs[1:]:
            assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] and lp.top[0][1] >= lp.logprob - 1e-6
    assert sizes == [5]


def test_generated_logprobs_are_the_models_own_and_the_greedy_pick_is_the_top(engine_parts):
    model, tokenizer = engine_parts
    engine = Engine(model, tokenizer)
    prompt = engine.encode(PROMPTS[0])
    done = collect(engine, PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0, logprobs=3))
    assert len(done.logprobs) == len(done.token_ids) == 12
    assert [lp.token_id for lp in done.logprobs] == done.token_ids
    assert all(lp.top[0][0] == lp.token_id and len(lp.top) == 3 for lp in done.logprobs)
    expected = teacher_forced(model, prompt + done.token_ids)[len(prompt) - 1 :]
    torch.testing.assert_close(
        torch.tensor([lp.logprob for lp in done.logprobs]), expected, atol=1e-4, rtol=1e-4
    )
    # a sampled row's logprobs are also the model's, not the temperature-scaled distribution's
    hot = collect(engine, PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=1.7, seed=3, logprobs=0))
    expected = teacher_forced(model, prompt + hot.token_ids)[len(prompt) - 1 :]
    torch.testing.assert_close(
        torch.tensor([lp.logprob for lp in hot.logprobs]), expected, atol=1e-4, rtol=1e-4
    )


def test_logit_bias_penalties_min_p_and_stops_change_the_output_as_vllm_defines(engine_parts):
    model, tokenizer = engine_parts
    engine = Engine(model, tokenizer)

    def greedy(**kw) -> Completion:
        return collect(engine, PROMPTS[2], SamplingParams(max_new_tokens=30, temperature=0, **kw))

    plain = greedy()
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # this model repeats itself when greedy
    forced = engine.encode(" fox")[0]
    assert set(greedy(logit_bias={forced: 100.0}).token_ids) == {forced}
    banned = greedy(logit_bias={plain.token_ids[0]: -100.0})
    assert banned.token_ids[0] != plain.token_ids[0]
    for penalty in ({"frequency_penalty": 50.0}, {"presence_penalty": 50.0}):
        ids = greedy(**penalty).token_ids
        assert len(set(ids)) == len(ids), penalty  # every repeat is pushed below the fresh tokens
    repeated = greedy(repetition_penalty=100.0).token_ids
    assert not set(repeated) & set(engine.encode(PROMPTS[2])) and len(set(repeated)) > len(
        set(plain.token_ids)
    )
    # min_p 1 keeps only the likeliest token: sampling becomes greedy
    hot = collect(engine, PROMPTS[2], SamplingParams(max_new_tokens=30, temperature=1.5, seed=1, min_p=1.0))
    assert hot.token_ids == plain.token_ids
    # a stop token ends the row without appearing; EOS can be ignored
    stopped = greedy(stop_token_ids=[plain.token_ids[5]])
    assert (
        stopped.finish_reason == "stop"
        and stopped.token_ids == plain.token_ids[: plain.token_ids.index(plain.token_ids[5])]
    )
    eos = tokenizer.eos_token_id
    assert greedy(logit_bias={eos: 100.0}).completion_tokens == 0
    ignoring = greedy(logit_bias={eos: 100.0}, ignore_eos=True)
    assert (ignoring.completion_tokens, ignoring.finish_reason, ignoring.text) == (30, "length", "")
    # many stop strings: the one that matches first in the text wins, whatever its place in the list
    later = plain.text[len(plain.text) // 2 :][:4]
    many = greedy(stop=[f"never{i}" for i in range(200)] + [later])
    assert many.finish_reason == "stop" and many.text == plain.text[: plain.text.index(later)]


def test_greedy_tokens_are_hugging_face_generates(engine_parts):
    """The engine's own prefill, KV cache, positions and left padding, against transformers' generate
    (do_sample=False) on the same model: alone, and prefilled together in one padded batch."""
    model, tokenizer = engine_parts
    budgets = (40, 12, 55, 20)
    expected = []
    for prompt, n in zip(PROMPTS, budgets, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False)  # fmt: skip
        expected.append(out[0, len(ids) :].tolist())
    assert [len(e) for e in expected] == list(budgets)  # no EOS among them: every token is compared

    engine = Engine(model, tokenizer, max_batch_size=8)
    alone = [
        collect(engine, p, SamplingParams(max_new_tokens=n, temperature=0))
        for p, n in zip(PROMPTS, budgets, strict=True)
    ]
    assert [c.token_ids for c in alone] == expected

    sizes: list[int] = []
    engine = Engine(model, tokenizer, max_batch_size=8, on_batch=sizes.append)
    results: list[queue.Queue] = [queue.Queue() for _ in PROMPTS]
    engine.queue.mutex.acquire()  # hold the queue so that all four are admitted in one prefill
    for prompt, n, out in zip(PROMPTS, budgets, results, strict=True):
        params = SamplingParams(max_new_tokens=n, temperature=0)
        engine.queue.queue.append(Request(engine.encode(prompt), params, out.put, False))
    engine.queue.not_empty.notify()
    engine.queue.mutex.release()
    together = []
    for out in results:
        while not isinstance(event := out.get(timeout=60), Completion):
            assert isinstance(event, Delta), event
        together.append(event)
    assert sizes == [4]
    assert [c.token_ids for c in together] == expected


def test_a_cancelled_request_leaves_its_row_and_the_next_one_is_served(engine_parts):
    """What a client that disconnects mid-stream causes (the service's stream, and Engine.stream, set the
    request's `cancelled` when abandoned): the row leaves the batch at the next step, unfinished, and a
    waiting request takes its place. With one row, the waiting request is only admitted once it is free."""
    model, tokenizer = engine_parts
    sizes: list[int] = []
    engine = Engine(model, tokenizer, max_batch_size=1, on_batch=sizes.append)
    abandoned: queue.Queue = queue.Queue()
    request = engine.submit(
        engine.encode(PROMPTS[0]), SamplingParams(max_new_tokens=55, temperature=0), abandoned.put
    )
    first = abandoned.get(timeout=60)
    assert isinstance(first, Delta)
    request.cancelled.set()  # the client went away after its first chunk
    waiting = collect(engine, PROMPTS[1], SamplingParams(max_new_tokens=5, temperature=0))
    assert waiting.completion_tokens == 5 and sizes == [1, 1]
    events = []
    while not abandoned.empty():
        events.append(abandoned.get())
    assert not any(isinstance(e, Completion) for e in events), events  # never ran to its 55 tokens
    assert len(events) < 5  # it stopped within a step or two of the cancel
    # and a cancelled request still in the queue is never admitted
    engine.queue.mutex.acquire()
    gone = Request(engine.encode(PROMPTS[2]), SamplingParams(max_new_tokens=5, temperature=0), abandoned.put)
    gone.cancelled.set()
    engine.queue.queue.append(gone)
    engine.queue.mutex.release()
    assert collect(engine, PROMPTS[3], SamplingParams(max_new_tokens=3, temperature=0)).completion_tokens == 3
    assert sizes == [1, 1, 1] and abandoned.empty()


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning"
)  # the thread dies, as meant
def test_an_engine_whose_thread_dies_fails_what_it_holds_and_the_probes_turn_503(engine_parts, monkeypatch):
    """Something that stops the decoding loop itself (not one batch's error): the request it held fails
    at once instead of hanging, a new one is refused, and the service's /health, /livez and /readyz
    answer 503 so that an orchestrator replaces the worker."""
    import asyncio

    from lmforge.serving.engine import EngineStopped
    from lmforge.serving.middleware import Health
    from lmforge.serving.models import Served, ServedModels

    model, tokenizer = engine_parts
    engine = Engine(model, tokenizer)

    def stop_the_loop(active):
        raise SystemExit("the decoding thread is gone")

    monkeypatch.setattr(engine, "_step", stop_the_loop)
    with pytest.raises(
        EngineStopped, match="the engine has stopped .SystemExit: the decoding thread is gone"
    ):
        collect(engine, "the quick", SamplingParams(max_new_tokens=4))
    engine.thread.join(timeout=30)
    assert not engine.alive
    with pytest.raises(EngineStopped, match="decodes nothing more"):
        engine.submit(engine.encode("river"), SamplingParams(max_new_tokens=4), lambda event: None)

    async def probe(path: str, engine: Engine) -> int:
        models = ServedModels()
        models.switch(Served("tiny:1", {}, engine, "", []))
        sent = []

        async def send(message):
            sent.append(message)

        async def downstream(scope, receive, send):  # BentoML's own /livez and /readyz: 200
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        await Health(downstream, models)({"type": "http", "path": path, "method": "GET"}, None, send)
        return sent[0]["status"]

    working = Engine(model, tokenizer)
    for path in ("/health", "/livez", "/readyz"):
        assert asyncio.run(probe(path, working)) == 200, path
        assert asyncio.run(probe(path, engine)) == 503, path


def test_a_request_whose_client_hangs_up_leaves_the_batch(engine_parts, monkeypatch):
    """The service's wait for a non-streaming answer (`unless_abandoned`) sees the client's disconnect
    on the ASGI channel and cancels the work: the engine drops the request's rows before its next step,
    long before the tokens it asked for, and the next request is served."""
    import asyncio

    from starlette.requests import Request

    import lmforge.serving.streaming as streaming
    from lmforge.serving.models import Served, ServedModels

    _, tokenizer = engine_parts
    torch.manual_seed(0)  # a model big enough that 60 tokens take many polls of the channel
    model = build_model(ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=64), len(tokenizer), 0).eval()
    engine = Engine(model, tokenizer)
    models = ServedModels()
    models.switch(Served("tiny:1", {}, engine, "", []))
    lease = models.lease()
    monkeypatch.setattr(streaming, "DISCONNECT_POLL_SECONDS", 0.002)
    gone = asyncio.Event()

    async def receive():  # an ASGI channel: the body was read; then the client disconnects
        await gone.wait()
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive)
    decoded = []

    async def complete(params: SamplingParams):
        async for event in streaming.engine_events(lease, engine.encode("the quick"), params, None):
            if isinstance(event, Delta):
                decoded.append(event)
            if isinstance(event, Completion):
                return event

    async def abandon():
        params = SamplingParams(max_new_tokens=60, temperature=0.8, ignore_eos=True)
        waiting = asyncio.create_task(
            streaming.unless_abandoned(request, lambda: asyncio.gather(*(complete(params) for _ in range(8))))
        )
        started = time.monotonic()
        while len(decoded) < 8:  # every row has decoded a token: the batch is running
            assert not waiting.done() and time.monotonic() - started < 30, waiting
            await asyncio.sleep(0.001)
        gone.set()
        return await asyncio.wait_for(waiting, timeout=10)

    assert asyncio.run(abandon()) is None
    deadline = time.monotonic() + 10
    while engine._active.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine._active.rows and engine.waiting() == 0
    assert len(decoded) < 8 * 60 / 2  # the rows left long before their 60 tokens
    done = collect(engine, "river", SamplingParams(max_new_tokens=3, temperature=0))
    assert done.completion_tokens == 3


def test_only_the_prompts_that_are_scored_get_every_positions_logits(engine_parts):
    """Two requests scoring their prompts taken from the queue with two that only generate: the head
    computes every position for the two that score, and the last position alone for the others
    (logits_to_keep), so a scoring request does not multiply the batch's logits; all four are answered."""
    model, tokenizer = engine_parts
    engine = Engine(model, tokenizer)
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, out: shapes.append(tuple(out.shape)))
    events: queue.Queue = queue.Queue()
    asks = (("the quick brown fox", 1), ("river stone", None), ("a model data", 0), ("light", None))
    requests = [
        Request(
            engine.encode(p),
            SamplingParams(max_new_tokens=3, temperature=0, prompt_logprobs=scored),
            events.put,
        )
        for p, scored in asks
    ]
    try:
        with engine.queue.mutex:  # all four at once: the engine takes them in one admission
            engine.queue.queue.extend(requests)
            engine.queue.unfinished_tasks += len(requests)
            engine.queue.not_empty.notify()
        done = []
        while len(done) < len(requests):
            event = events.get(timeout=60)
            assert not isinstance(event, BaseException), event
            done += [event] if isinstance(event, Completion) else []
    finally:
        hook.remove()
    vocab, width = model.lm_head.out_features, len(requests[0].prompt_ids)
    assert shapes[:2] == [(2, width, vocab), (2, 1, vocab)], shapes
    assert sorted(d.completion_tokens for d in done) == [3, 3, 3, 3]


def test_every_tensor_the_engine_makes_is_made_on_the_models_device(engine_parts):
    """A batch mixing a seed, logit_bias, every penalty, logprobs and prompt scoring, admitted and decoded
    with a record of every tensor factory call: each one names the model's device (so on a GPU nothing
    meets the logits from the CPU), and a seeded row's generator lives there too."""
    from torch.overrides import TorchFunctionMode

    from lmforge.serving.batch import Batch

    factories = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.rand,
                 torch.randn, torch.randint, torch.as_tensor}  # fmt: skip

    class Factories(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories:
                self.calls.append((func.__name__, kwargs.get("device")))
            return func(*args, **kwargs)

    model, tokenizer = engine_parts
    engine = Engine(model, tokenizer)  # its thread waits on the queue: this test drives it
    shaped = {"seed": 3, "temperature": 0.9, "logit_bias": {5: 2.0}, "presence_penalty": 0.5,
              "frequency_penalty": 0.5, "repetition_penalty": 1.2, "logprobs": 2}  # fmt: skip
    asks = [SamplingParams(max_new_tokens=4, **shaped), SamplingParams(max_new_tokens=4, prompt_logprobs=1),
            SamplingParams(max_new_tokens=4, temperature=0, logprobs=0)]  # fmt: skip
    requests = [Request(engine.encode("the quick brown"), p, lambda event: None) for p in asks]
    active = Batch()
    with Factories() as recorded:
        engine._admit(active, requests[1:2])
        engine._admit(active, [requests[0], requests[2]])
        while active.rows:
            engine._step(active)
    assert recorded.calls and all(device == engine.device for _, device in recorded.calls), recorded.calls
    row = Row(requests[0], tokenizer, 4, len(tokenizer), engine.device)
    assert row.generator.device == row.bias.device == row.counts.device == row.seen.device == engine.device


def test_a_switch_sends_new_requests_to_the_new_model_and_frees_the_old_once_its_requests_end(engine_parts):
    """What `lmforge serve --follow` does in each worker: after switch(), a new lease gets the new model at
    once; a request that began on the old one finishes there; the old engine then stops and its model is
    freed. A lease that is dropped unreturned (a stream that never started) is returned all the same."""
    import gc
    import weakref

    from lmforge.serving.models import Served, ServedModels

    model, tokenizer = engine_parts
    torch.manual_seed(1)
    old_model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), len(tokenizer), 0).eval()
    freed = weakref.ref(old_model)
    old, new = Engine(old_model, tokenizer), Engine(model, tokenizer)
    del old_model
    models = ServedModels()
    models.switch(Served("lm:old", {}, old, "", []))
    in_flight = models.lease()
    dropped = models.lease()
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    expected_old = collect(old, "the quick", greedy).text

    models.switch(Served("lm:new", {}, new, "", []))
    with models.lease() as lease:
        assert lease.served.tag == "lm:new"
        assert collect(lease.served.engine, "the quick", greedy).text == collect(new, "the quick", greedy).text
    assert old.alive and models.retiring  # two requests still hold it
    assert collect(in_flight.served.engine, "the quick", greedy).text == expected_old
    in_flight.release()
    del dropped
    old.thread.join(timeout=30)
    assert not old.alive and not models.retiring
    assert expected_old != collect(new, "the quick", greedy).text  # two models that answer differently
    gc.collect()
    assert freed() is None, "the old model is still referenced"
    assert models.current.engine.alive and models.alive


def test_follow_switches_to_the_model_the_file_names_and_keeps_serving_through_a_bad_one(
    engine_parts, tmp_path, monkeypatch
):
    import json

    import lmforge.serving.models as served_models
    from lmforge.serving.models import Served, ServedModels

    model, tokenizer = engine_parts
    monkeypatch.setattr(served_models, "FOLLOW_POLL_SECONDS", 0.01)
    loaded = []

    def load(wanted: dict) -> Served:
        if wanted["model_tag"] == "lm:broken":
            raise OSError("no such model in the store")
        loaded.append(wanted["model_tag"])
        return Served(wanted["model_tag"], {}, Engine(model, tokenizer), "", [])

    models = ServedModels()
    models.switch(load({"model_tag": "lm:1"}))
    follow_file = tmp_path / "follow.json"

    def names(tag: str) -> None:
        follow_file.write_text(json.dumps({"model_tag": tag}))
        deadline = time.monotonic() + 10
        while models.current.tag != tag and time.monotonic() < deadline:
            time.sleep(0.01)

    models.follow(follow_file, load)
    names("lm:2")
    assert models.current.tag == "lm:2"
    names("lm:broken")
    time.sleep(0.2)
    assert models.current.tag == "lm:2" and models.current.engine.alive
    names("lm:1")
    assert models.current.tag == "lm:1" and loaded == ["lm:1", "lm:2", "lm:1"]


def test_admission_counts_rows_on_their_way_so_a_burst_cannot_overfill_the_queue(engine_parts):
    """serve.max_queue bounds the rows waiting for the engine, counting those admitted but still being
    tokenized: requests that arrive together cannot all pass the check before any is queued. A request
    that ends before its rows reach the engine gives their places back (a dropped stream too)."""
    from lmforge.serving.models import Served, ServedModels

    model, tokenizer = engine_parts
    models = ServedModels()
    models.switch(Served("lm:1", {}, Engine(model, tokenizer), "", []))
    first, second = models.lease(), models.lease()
    assert models.admit(first, 3, max_queue=4)
    assert not models.admit(second, 2, max_queue=4)  # 3 on their way and 2 more: over 4, none queued yet
    assert models.admit(second, 1, max_queue=4) and models.waiting() == 4
    first.queued()  # one of first's rows reached the engine's queue: the engine counts it now
    assert models.admitted == 3
    first.release()
    assert models.admitted == 1
    del second
    assert models.admitted == 0 and models.waiting() == 0
