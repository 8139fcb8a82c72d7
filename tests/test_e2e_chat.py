"""Instruction tuning end to end: `lmforge run --source chats.jsonl -p ingest.format=chat -p model.base=DIR`
on a conversation corpus with a few bad records, a Qwen2-shaped base with a ChatML tokenizer, then the
promoted model served by `lmforge serve` and asked through the openai client. Real SeaweedFS, DVC,
Prefect, torchrun and BentoML."""

from __future__ import annotations

import json

import httpx
import pytest

from lmforge.data.chat import render_conversation
from lmforge.runs.contracts import Decision

from .conftest import CHATML, chat_records, chatml_tokenizer, tiny_base, write_jsonl
from .test_e2e_data import BIN, PASSING_TRAINING, lmforge_serve, make_workspace, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_conversation_corpus_fine_tunes_a_base_into_a_model_that_chats(tmp_path, s3_server, prefect_api):
    from openai import OpenAI
    from transformers import AutoTokenizer

    ws, env, _ = make_workspace(tmp_path / "ws", s3_server, "e2e-chat", prefect_api)
    records = chat_records(1500, seed=3, bad_every=60)  # 25 bad records of 1,500: dropped, not refused
    corpus = write_jsonl(tmp_path / "chats.jsonl", records)
    chatml_tokenizer(tmp_path / "tok", [json.dumps(r) for r in records], vocab_size=600)
    base = tiny_base("qwen2", tmp_path / "base", tmp_path / "tok")
    overrides = ["ingest.format=chat", f"model.base={base}", "model.block_size=64", *PASSING_TRAINING,
                 "evaluate.prompts=['Repeat these words: river stone light']"]  # fmt: skip
    result = run([BIN / "lmforge", "run", "--source", corpus, *(a for o in overrides for a in ("-p", o))],
                 ws, env, timeout=1200)  # fmt: skip
    assert "gate          PROMOTED" in result.stdout, result.stdout[-3000:]
    dropped = "unknown_role 5, non_string_content 5, empty_content 5, no_assistant_turn 5, ends_without_assistant 5"
    assert f"of 1,500 (dropped: {dropped}" in result.stdout, result.stdout[-3000:]

    manifest = json.loads((ws / "artifacts/shards/manifest.json").read_text())
    assert manifest["format"] == "chat" and manifest["chat"]["template"] == CHATML
    decision = Decision.load(ws / "artifacts/gate.json")
    assert decision.head_to_head["base"]["val"]["interval"][1] < 0  # better than its base, on assistant bytes
    assert any("better than the base" in r for r in decision.reasons)

    conversation = [{"role": "system", "content": "You repeat words."},
                    {"role": "user", "content": "Repeat these words: river stone light"},
                    {"role": "assistant", "content": "river stone light"},
                    {"role": "user", "content": "Now say them backwards."},
                    {"role": "assistant", "content": "light stone river"}]  # fmt: skip
    trained = render_conversation(AutoTokenizer.from_pretrained(ws / "artifacts/model"), CHATML, conversation)
    with lmforge_serve(ws, env) as (models, _, url):
        assert models["data"][0]["lineage"]["data_format"] == "chat"
        # the prompt the server renders for each assistant turn is the very tokens training saw before it
        for turn in (2, 4):
            served = httpx.post(f"{url}/tokenize", json={"messages": conversation[:turn]}, timeout=30).json()
            assert served["tokens"] == trained.ids[: served["count"]]
            assert not trained.mask[served["count"] - 1] and trained.mask[served["count"]]
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="lmforge", messages=conversation[:2], max_completion_tokens=24, temperature=0
        )
    choice = reply.choices[0]
    # it learnt to answer and to end its turn: <|im_end|> stops the reply, and is not in it
    assert choice.finish_reason == "stop" and reply.usage.completion_tokens < 24, reply
    assert choice.message.content.strip() and "<|im_end|>" not in choice.message.content
