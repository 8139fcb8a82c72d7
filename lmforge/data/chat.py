"""Conversations: the records chat data comes in, and the one rendering that training, evaluation and
serving share.

A record is OpenAI's `{"messages": [{"role", "content"}, ...]}` or a `{"prompt", "completion"}` pair (one
user turn, one assistant turn); the field names are ingest's. `parse_conversation` turns a record into
messages, or names what is wrong with it (a reason validation drops the record for).

`render_conversation` renders the messages with the chat template (serve.chat_template, else the
tokenizer's own, else PLAIN_CHAT_TEMPLATE) and tokenizes the whole text once. Its loss mask is true
exactly on the assistant turns: for turn i, the text between the rendering of the messages before it
(with the generation prompt) and the rendering up to it, so the end-of-turn markup is learnt too. A
server renders the messages before turn i with the generation prompt and tokenizes that text; the
rendering checks that those are the very tokens training saw, so training and serving cannot drift.

No torch here: ingest, validate and preprocess import it. The serving side of templates (which
template, rendering a prompt, where a turn ends) is lmforge/serving/chat_template.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError
from lmforge.serving.chat_template import ChatError, encode_prompt, render_text

ROLES = ("system", "user", "assistant")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Why a record is dropped (validation counts them against validation.max_dropped_fraction).
RECORD_PROBLEMS = (
    "malformed_record", "unknown_role", "non_string_content", "empty_content", "no_assistant_turn",
    "ends_without_assistant",
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# records -> messages


def parse_conversation(
    record: Any, messages_field: str, prompt_field: str, completion_field: str
) -> tuple[list[dict] | None, tuple[str, str] | None]:
    """(messages, None) for a usable record, else (None, (reason, detail)), reason in RECORD_PROBLEMS."""
    if not isinstance(record, dict):
        return None, ("malformed_record", f"a record must be a JSON object, got {type(record).__name__}")
    if messages_field in record:
        raw = record[messages_field]
        if not isinstance(raw, list) or not raw:
            return None, ("malformed_record", f"{messages_field!r} must be a non-empty list of messages")
        pairs = []
        for message in raw:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                return None, ("malformed_record", "every message needs a 'role' and a 'content'")
            pairs.append((message["role"], message["content"]))
    elif prompt_field in record and completion_field in record:
        pairs = [("user", record[prompt_field]), ("assistant", record[completion_field])]
    else:
        fields = ", ".join(sorted(map(str, record))[:8])
        return None, (
            "malformed_record",
            f"no {messages_field!r} field, nor {prompt_field!r} and {completion_field!r} (its fields: {fields}); "
            "set ingest.messages_field, or ingest.prompt_field and ingest.completion_field",
        )
    messages = []
    for role, content in pairs:
        if role not in ROLES:
            return None, ("unknown_role", f"role {role!r} is not one of {', '.join(ROLES)}")
        text = content_text(content)
        if text is None:
            return None, (
                "non_string_content",
                f"the {role} message's content is not text ({_kind(content)})",
            )
        if not text.strip():
            return None, ("empty_content", f"the {role} message is empty")
        messages.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        return None, ("no_assistant_turn", "no assistant message to learn from")
    if messages[-1]["role"] != "assistant":
        return None, ("ends_without_assistant", f"the last message is the {messages[-1]['role']}'s")
    return messages, None


def content_text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI's list of text parts joined; None for anything else. A lone
    surrogate (a JSON escape no tokenizer can encode) becomes U+FFFD, which validation counts."""
    if isinstance(content, list) and content:
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        content = "".join(parts) if all(isinstance(p, str) for p in parts) else None
    if not isinstance(content, str):
        return None
    return content if content.isascii() else LONE_SURROGATE.sub("\ufffd", content)


def _kind(content: Any) -> str:
    if isinstance(content, list):
        return "a list with a part that is not {'type': 'text', 'text': str}"
    return type(content).__name__


def conversation_text(messages: list[dict]) -> str:
    """What the conversation says, without markup: what secrets, contamination and sizes are measured on."""
    return "\n\n".join(m["content"] for m in messages)


def labelled_text(messages: list[dict]) -> str:
    """The conversation with its roles, as lmforge's plain template writes them: what a tokenizer trained
    from scratch learns from, so that the markup gets tokens of its own too."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def canonical(messages: list[dict]) -> str:
    """One string per conversation, whatever else its record held: what duplicates and splits go by."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# messages -> tokens and the loss mask


def template_setting(setting: str | None, root: Path) -> str | None:
    """serve.chat_template as text: a template file's contents (relative to the workspace), or the
    template itself; None when unset."""
    if not setting:
        return None
    path = Path(setting) if Path(setting).is_absolute() else root / setting
    if "{" not in setting and path.is_file():
        return path.read_text()
    if "{{" not in setting and "{%" not in setting:
        raise ConfigError(f"serve.chat_template: {setting!r} is neither a file nor a Jinja template")
    return setting


@dataclass
class Rendered:
    ids: list[int]
    mask: list[bool]  # true on the assistant's tokens, end of turn included
    assistant_bytes: int  # UTF-8 bytes of the assistant turns as rendered: the unit of bits per byte


def render_conversation(tokenizer, template: str, messages: list[dict], served: bool = True) -> Rendered:
    """The conversation's tokens and loss mask; ChatError when the template renders turns inconsistently
    or (served: for training) the tokens of a prompt differ from the ones a server would send."""
    text = render_text(tokenizer, template, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_text(tokenizer, template, messages[:i], generation_prompt=True)
        upto = render_text(tokenizer, template, messages[: i + 1], generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ChatError("the chat template does not render a conversation as the sum of its turns")
        spans.append((len(before), len(upto)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in offsets]
    for lo, _ in spans if served else ():  # the prompt a server would tokenize for this turn
        served = encode_prompt(tokenizer, text[:lo])
        if ids[: len(served)] != served or (len(served) < len(ids) and offsets[len(served)][0] < lo):
            raise ChatError(
                "the tokens of the prompt differ from those of the whole conversation at a turn boundary"
            )
    assistant_bytes = sum(len(text[lo:hi].encode("utf-8", "surrogatepass")) for lo, hi in spans)
    return Rendered(ids, mask, assistant_bytes)
