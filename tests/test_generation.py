"""The generation engine in-process: continuous batching gives every request the output it gets alone."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.generation import Completion, Engine, SamplingParams
from pipeline.model import build_model
from pipeline.preprocess import train_tokenizer

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
    waiters: list[threading.Thread] = []
    schedule = {3: [1], 8: [2, 4], 20: [3]}  # after the first request's nth delta: these join
    seen = []

    def join_more(event):
        if isinstance(event, str):
            seen.append(event)
            for i in schedule.get(len(seen), []):
                prompt, params = (PROMPTS[1], sampled) if i == 4 else (PROMPTS[i], greedy[i])
                t = threading.Thread(
                    target=lambda i=i, p=prompt, q=params: results.__setitem__(i, collect(engine, p, q))
                )
                t.start()
                waiters.append(t)

    joined.clear()
    results[0] = collect(engine, PROMPTS[0], greedy[0], join_more)
    for t in waiters:
        t.join(120)
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
