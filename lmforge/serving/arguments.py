"""What this server was started with: the Bento's arguments (package.py pins them from params' serve
section), validated by ServeConfig, whose defaults fill in whatever a bare `bentoml serve` was not given;
and the API keys, from the environment of the serving process, never from the Bento."""

from __future__ import annotations

import os

import bentoml

from lmforge.serving.auth import api_keys
from lmforge.serving.settings import FOLLOW_VAR, ServeConfig

ARGS = bentoml.use_arguments()
MODEL_TAG = str(getattr(ARGS, "model_tag", None) or os.environ.get("LMFORGE_MODEL_TAG", "lmforge-lm:latest"))
SERVE = ServeConfig.model_validate(
    {name: getattr(ARGS, name) for name in ServeConfig.model_fields if getattr(ARGS, name, None) is not None}
)
CHAT_TEMPLATE: str | None = SERVE.chat_template or None  # the template text itself; overrides the tokenizer's
API_KEYS = api_keys()
FOLLOW_FILE = os.environ.get(FOLLOW_VAR) or None
