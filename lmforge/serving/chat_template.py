"""Chat templates as the server applies them: which template a model speaks, a conversation rendered as
the prompt text, and the tokens that end an assistant turn. Preprocess renders training data through the
same functions (lmforge/data/chat.py), so training and serving cannot drift."""

from __future__ import annotations

from lmforge.serving.errors import ServingError

# lmforge's own template, for a tokenizer that has none: "User: hi", a blank line, "Assistant:". The
# assistant's turn ends with EOS, so a model trained on it learns to stop where the turn ends.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] | trim }}"
    "{{ eos_token if message['role'] == 'assistant' else '' }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatError(ServingError):
    """A conversation the template cannot render the way training needs it."""


def resolve_template(tokenizer, setting: str | None = None) -> str:
    """The template a model is trained and served with: serve.chat_template (its text) if set, else the
    tokenizer's own, else lmforge's plain one."""
    return setting or getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE


def render_text(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    """The messages through the template, as text: what a server tokenizes (without special tokens
    added: a template writes its own BOS)."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (TemplateError, TypeError, ValueError) as exc:
        raise ChatError(f"the chat template cannot render it ({exc})") from None


def encode_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer, template: str) -> list[int]:
    """The special tokens that end an assistant turn in this template (<|im_end|>, <|eot_id|>, EOS): a
    chat reply stops at them. Found by rendering a short exchange."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text = render_text(tokenizer, template, probe, generation_prompt=False)
    except ChatError:
        return []
    tail = text[text.rfind("Hello") + len("Hello") :]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    return list(dict.fromkeys(i for i in encode_prompt(tokenizer, tail) if i in special))
