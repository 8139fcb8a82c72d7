"""The tokenizer a model is trained with: a byte-level BPE trained on the corpus, or the base model's own.

Its EOS token ends every document in the shards, and the plain chat template gives a tokenizer trained
here a /v1/chat/completions that works out of the box.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.serving.chat_template import PLAIN_CHAT_TEMPLATE

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Iterator[str], vocab_size: int, min_frequency: int, length: int | None = None):
    """A GPT-2 style byte-level BPE, so any input byte can be encoded and nothing is ever <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    fast.chat_template = PLAIN_CHAT_TEMPLATE  # /v1/chat/completions works out of the box
    return fast


def load_base_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.base: no usable tokenizer in {base_dir} ({exc})") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model.base: the tokenizer in {base_dir} has no EOS token, which packing needs")
    return tokenizer
