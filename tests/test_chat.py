"""Chat data: records to messages, the loss mask against an independent rendering, validation's record
policy, conversations through preprocess (English and Chinese, JSONL and Parquet), packing that keeps
conversations apart in every architecture, and a short fine-tune that beats its base on the assistant's
tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmforge.data.chat import canonical, parse_conversation, render_conversation
from lmforge.params_file import load_params, write_overrides
from lmforge.serving.chat_template import PLAIN_CHAT_TEMPLATE, end_of_turn_ids, render_text
from lmforge.workspace import Workspace

from .conftest import CHATML, REPO, TINY, TINY_BASES, chat_records, chatml_tokenizer, tiny_base, write_jsonl

CHAT = [*TINY, "ingest.format=chat", "model.block_size=64", "validation.min_total_chars=1000"]
CONVERSATION = [
    {"role": "user", "content": "Repeat these words: river stone"},
    {"role": "assistant", "content": "river stone"},
    {"role": "user", "content": "Now say them backwards."},
    {"role": "assistant", "content": "stone river"},
]
SYSTEM = [{"role": "system", "content": "You repeat words."}, *CONVERSATION]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [json.dumps(r, ensure_ascii=False) for r in chat_records(300) + chat_records(300, "zh")]
    return chatml_tokenizer(tmp_path_factory.mktemp("chatml"), texts)


def pieces(messages: list[dict], template: str, eos: str) -> list[tuple[str, bool]]:
    """The test's own rendering, turn by turn, each piece marked with whether it is the assistant's: what
    the mask must say, written out by hand for the two templates."""
    out = []
    for m in messages:
        if template == CHATML:
            header, body = f"<|im_start|>{m['role']}\n", f"{m['content']}<|im_end|>\n"
        else:
            header, body = (
                f"{m['role'].capitalize()}:",
                f" {m['content']}{eos if m['role'] == 'assistant' else ''}\n\n",
            )
        out += [(header, False), (body, m["role"] == "assistant")]
    return out


@pytest.mark.parametrize("template", ["chatml", "plain"])
@pytest.mark.parametrize("messages", [CONVERSATION, SYSTEM], ids=["no-system", "system"])
def test_the_loss_mask_is_exactly_the_assistant_turns(tokenizer, template, messages):
    template = CHATML if template == "chatml" else PLAIN_CHAT_TEMPLATE
    rendered = render_conversation(tokenizer, template, messages)
    ids, mask = [], []
    for text, assistant in pieces(messages, template, tokenizer.eos_token):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [assistant] * len(piece)
    assert rendered.ids == ids
    assert rendered.mask == mask
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    scored = tokenizer.decode([i for i, m in zip(rendered.ids, rendered.mask, strict=True) if m])
    end = "<|im_end|>\n" if template == CHATML else f"{tokenizer.eos_token}\n\n"
    assert scored == "".join(f"{'' if template == CHATML else ' '}{a}{end}" for a in answers)
    assert rendered.assistant_bytes == len(scored.encode())
    # a reply stops at the token that ends the template's assistant turn
    stop = "<|im_end|>" if template == CHATML else tokenizer.eos_token
    assert end_of_turn_ids(tokenizer, template) == [tokenizer.convert_tokens_to_ids(stop)]


def test_each_prompt_is_the_tokens_a_server_sends(tokenizer):
    """Cut before each assistant turn, the conversation's tokens are the prompt's tokens as a server
    renders and tokenizes it alone (with the generation prompt)."""
    rendered = render_conversation(tokenizer, CHATML, SYSTEM)
    for turn in (2, 4):
        prompt = tokenizer(render_text(tokenizer, CHATML, SYSTEM[:turn], True), add_special_tokens=False)[
            "input_ids"
        ]
        assert rendered.ids[: len(prompt)] == prompt
        assert rendered.mask[len(prompt) - 1] is False and rendered.mask[len(prompt)] is True


@pytest.mark.parametrize(
    "record, reason",
    [
        (
            {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "unknown_role",
        ),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
            "empty_content",
        ),
        ({"prompt": "q", "completion": " \n"}, "empty_content"),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
            "no_assistant_turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"},
                ]
            },
            "ends_without_assistant",
        ),  # fmt: skip
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
            "non_string_content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "non_string_content",
        ),  # fmt: skip
        ({"messages": [{"role": "user"}]}, "malformed_record"),
        ({"messages": []}, "malformed_record"),
        ({"text": "plain text"}, "malformed_record"),
        (["not", "an", "object"], "malformed_record"),
    ],
)
def test_bad_records_are_named(record, reason):
    messages, problem = parse_conversation(record, "messages", "prompt", "completion")
    assert messages is None and problem[0] == reason


def test_good_records_in_every_shape_and_field_names_of_ones_own():
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c", "name": "x"}]}  # fmt: skip
    assert parse_conversation(parts, "messages", "prompt", "completion") == (
        [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}],
        None,
    )
    pair = {"question": "q", "answer": "a", "id": 7}
    assert parse_conversation(pair, "messages", "question", "answer")[0] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    dialog = {"turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert parse_conversation(dialog, "turns", "prompt", "completion")[0] == dialog["turns"]


def chat_params(root, extra=()):
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    write_overrides(root, [*CHAT, *extra])
    return load_params(root)


@pytest.mark.parametrize("bad_every, passes", [(50, True), (5, False)], ids=["2%-bad", "20%-bad"])
def test_a_few_bad_records_are_dropped_and_many_refuse_the_corpus(tmp_path, bad_every, passes):
    from lmforge.data.validation_report import format_failure
    from pipeline.validate import validate_corpus

    records = chat_records(400, bad_every=bad_every)
    corpus = write_jsonl(tmp_path / "chats.jsonl", records)
    report = validate_corpus(corpus, chat_params(tmp_path))
    bad = 400 // bad_every
    assert report.success is passes, format_failure(report)
    assert report.stats["documents"] == 400
    assert report.stats["dropped_documents"] == bad
    assert set(report.stats["dropped_by_reason"]) == {
        "unknown_role", "empty_content", "no_assistant_turn", "ends_without_assistant", "non_string_content",
    }  # fmt: skip
    report.dropped_records.seek(0)
    dropped = [json.loads(line) for line in report.dropped_records]
    assert [d["source"] for d in dropped] == [
        f"chats.jsonl#{i}" for i in range(bad_every - 1, 400, bad_every)
    ]
    assert all(d["detail"] for d in dropped)
    if not passes:
        failure = format_failure(report)
        assert "dropped_fraction: observed 80 of 400 documents (20.00%): unknown_role 16" in failure
        assert "(unknown_role: role 'robot' is not one of system, user, assistant)" in failure


def test_a_secret_in_a_conversation_refuses_the_corpus(tmp_path):
    from pipeline.validate import validate_corpus

    records = chat_records(100)
    records[7]["messages"][-1]["content"] += " AKIA" + "ABCDEFGHIJKLMNOP"  # split: no key in the source
    report = validate_corpus(write_jsonl(tmp_path / "c.jsonl", records), chat_params(tmp_path))
    assert not report.success
    assert [c.name for c in report.failed] == ["secret:aws_access_key_id"]


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    """A Chinese conversation corpus, as Parquet (messages: a list of structs) and JSONL, through
    preprocess with a tokenizer trained on it."""
    from pipeline.preprocess import preprocess

    root = tmp_path_factory.mktemp("zh") / "ws"
    root.mkdir()
    params = chat_params(root, ["preprocess.vocab_size=2000"])
    ws = Workspace(root)
    records = chat_records(600, "zh", seed=1)
    messages = [r["messages"] if "messages" in r else None for r in records]
    half = len(records) // 2
    ws.data.mkdir(parents=True)
    pq.write_table(pa.table({"messages": [m for m in messages[:half] if m]}), ws.data / "a.parquet")
    write_jsonl(ws.data / "b.jsonl", records[half:])
    manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, root=root)
    return ws, params, manifest, records


def test_a_chinese_conversation_corpus_becomes_tokens_and_masks(chinese):
    from transformers import AutoTokenizer

    ws, _, manifest, records = chinese
    kept = sum(1 for r in records[: len(records) // 2] if "messages" in r) + len(records) - len(records) // 2
    assert manifest.format == "chat" and manifest.chat["dropped"] == {}
    assert sum(s.documents for s in manifest.splits.values()) == kept
    tokenizer = AutoTokenizer.from_pretrained(ws.tokenizer_dir)
    assert (
        tokenizer.chat_template == PLAIN_CHAT_TEMPLATE == manifest.chat_template
    )  # saved with the tokenizer
    held = manifest.held_out_conversations(ws.shards_dir, "val")
    shard = manifest.splits["val"].shards[0]
    tokens = np.fromfile(ws.shards_dir / shard.file, dtype=manifest.dtype)
    mask = np.fromfile(ws.shards_dir / shard.mask, dtype=np.uint8).astype(bool)
    starts = np.fromfile(ws.shards_dir / shard.starts, dtype=np.uint32)
    assert len(tokens) == len(mask) == shard.tokens and len(starts) == len(held)
    first = slice(int(starts[0]), int(starts[1]))
    answers = [m["content"] for m in held[0] if m["role"] == "assistant"]
    assert tokenizer.decode(tokens[first][mask[first]]) == "".join(
        f" {a}{tokenizer.eos_token}\n\n" for a in answers
    )
    assert manifest.contamination["by_script"].keys() == {"Han"}  # measured on the answers, by character


def test_a_packed_row_scores_as_its_conversations_alone(chinese, tmp_path):
    """In every architecture, a row of packed conversations has the loss of each conversation computed
    alone (summed over the assistant's tokens, within 1e-5): no token attends across into another one."""
    from transformers import AutoModelForCausalLM

    from lmforge.training.loss import FusedNextTokenLoss, NextTokenLoss
    from lmforge.training.windows import ConversationRows, packing_isolates

    ws, _, manifest, _ = chinese
    rows = ConversationRows(ws.shards_dir, manifest, "train", 64)
    row = next(r for r in rows.rows if len(r) >= 3)
    batch = rows.collate([row])
    for kind in TINY_BASES:
        model = AutoModelForCausalLM.from_pretrained(
            tiny_base(kind, tmp_path / kind, ws.tokenizer_dir)
        ).eval()
        assert packing_isolates(model, rows, torch.device("cpu")), kind
        count = int((batch["labels"][:, 1:] != -100).sum())
        for loss in (NextTokenLoss(model), FusedNextTokenLoss(model)):
            with torch.no_grad():
                packed = float(loss(**batch)) * count
                alone, at = 0.0, 0
                for _, _, length in row:
                    ids, labels = (
                        batch["input_ids"][:, at : at + length],
                        batch["labels"][:, at : at + length],
                    )
                    n = int((labels[:, 1:] != -100).sum())
                    alone += float(loss(ids, labels)) * n
                    at += length
            assert packed == pytest.approx(alone, rel=1e-5), kind
        # the padded layout, one conversation a row, gives the same
        padded = ConversationRows(ws.shards_dir, manifest, "train", 64, packed=False)
        with torch.no_grad():
            one_a_row = padded.collate([[c] for c in row])
            assert float(NextTokenLoss(model)(**one_a_row)) * count == pytest.approx(packed, rel=1e-5), kind


def test_a_short_chat_fine_tune_beats_its_base_on_the_assistant_tokens(tmp_path, monkeypatch):
    """A tiny Llama with a ChatML tokenizer, fine-tuned on conversations for 60 steps: evaluate scores it
    and its base on the val conversations' assistant turns, and it needs fewer bits per byte."""
    from pipeline.evaluate import evaluate
    from pipeline.preprocess import preprocess
    from pipeline.train import train

    root = tmp_path / "ws"
    root.mkdir()
    records = chat_records(800, seed=2)
    chatml_tokenizer(tmp_path / "tok", [json.dumps(r) for r in records])
    base = tiny_base("llama", tmp_path / "base", tmp_path / "tok")
    params = chat_params(root, [f"model.base={base}", "train.max_steps=60", "train.lr=0.003", "train.eval_every=30",
                                "evaluate.prompts=['river stone light']", "gate.max_contamination=1.0"])  # fmt: skip
    ws = Workspace(root)
    write_jsonl(ws.data / "chats.jsonl", records)
    monkeypatch.setenv("LMFORGE_ROOT", str(root))
    manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, base, root=root)
    assert manifest.chat_template == CHATML
    threads = torch.get_num_threads()
    train(params, ws, base)
    metrics = evaluate(params, ws)
    torch.set_num_threads(threads)
    assert metrics["val_bits_per_byte"] < 0.8 * metrics["base_val_bits_per_byte"], metrics


@pytest.mark.parametrize("long, passes", [(3, True), (30, False)], ids=["1.5%-too-long", "15%-too-long"])
def test_conversations_longer_than_the_context_are_dropped_by_the_same_policy(tmp_path, long, passes):
    from lmforge.data.formats import CorpusError
    from pipeline.preprocess import preprocess

    records = chat_records(200, seed=5)
    rambling = " ".join(["river stone light model data"] * 12)
    records[:long] = [
        {"prompt": f"Repeat these words ({i}): {rambling}", "completion": rambling} for i in range(long)
    ]
    root = tmp_path / "ws"
    root.mkdir()
    params = chat_params(root, ["preprocess.vocab_size=1000"])
    ws = Workspace(root)
    write_jsonl(ws.data / "chats.jsonl", records)
    if not passes:
        with pytest.raises(CorpusError, match=r"30 of 200 conversations \(15\.00%\) cannot be trained on.*"
                           r"too_long_rendered 30, e\.g\. chats\.jsonl#0 \(too_long_rendered: \d+ tokens > model\.block_size 64\)"):  # fmt: skip
            preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, root=root)
        assert not ws.shards_dir.exists()
        return
    manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, root=root)
    assert manifest.chat["dropped"] == {"too_long_rendered": 3}
    assert sum(s.documents for s in manifest.splits.values()) == 197


def test_a_template_that_never_ends_the_assistant_turn_is_refused(tmp_path):
    from lmforge.config import ConfigError
    from pipeline.preprocess import preprocess

    root = tmp_path / "ws"
    root.mkdir()
    params = chat_params(root, ["serve.chat_template='{% for m in messages %}{{ m.content }}\n{% endfor %}'"])
    ws = Workspace(root)
    write_jsonl(ws.data / "chats.jsonl", chat_records(100))
    with pytest.raises(ConfigError, match="ends an assistant turn with no special token"):
        preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, root=root)


def test_text_files_are_not_conversations(tmp_path):
    from lmforge.data.formats import CorpusError
    from pipeline.validate import validate_corpus

    (tmp_path / "notes.txt").write_text("User: hi\n\nAssistant: hello\n")
    with pytest.raises(
        CorpusError, match=r"notes\.txt: ingest\.format=chat reads conversations from \.jsonl or \.parquet"
    ):
        validate_corpus(tmp_path / "notes.txt", chat_params(tmp_path))


def test_a_lone_surrogate_in_a_message_becomes_a_replacement_character(tmp_path):
    """JSON may escape half a surrogate pair ("\\ud800"): no tokenizer can encode it, so it is trained on as
    U+FFFD, and validation counts it as a non-printable character."""
    from pipeline.preprocess import preprocess

    root = tmp_path / "ws"
    root.mkdir()
    # a short message: its one replacement character is over the default share of non-printable ones
    params = chat_params(root, ["preprocess.vocab_size=1000", "validation.max_nonprintable_ratio=0.1"])
    ws = Workspace(root)
    records = chat_records(200, seed=6)
    records[1] = {"prompt": "Repeat these words: river \ud800 stone", "completion": "river \ud800 stone"}
    (ws.data).mkdir(parents=True)
    (ws.data / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # ASCII escapes
    assert (
        parse_conversation(records[1], "messages", "prompt", "completion")[0][1]["content"]
        == "river \ufffd stone"
    )
    manifest = preprocess(ws.data, ws.tokenizer_dir, ws.shards_dir, params, root=root)
    distinct = {canonical(parse_conversation(r, "messages", "prompt", "completion")[0]) for r in records}
    assert sum(s.documents for s in manifest.splits.values()) == len(distinct) > 190  # duplicates aside, all
