"""vLLM's OpenAI server for a stored model: the one command that the vLLM Bento starts behind BentoML's
proxy (and the bench runs bare), and the names the model is served under."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from lmforge.serving.chat_template import resolve_template
from lmforge.serving.settings import ADAPTER_DIR, ServeConfig


def base_name(tag: str) -> str:
    """The base's name beside an adapter served under the model's own tag."""
    return f"{tag}-base"


def api_server_env(serve: ServeConfig) -> dict[str, str]:
    """The environment vLLM's server runs with: its CPU KV cache (where there is no GPU), no usage stats."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(serve.vllm.cpu_kvcache_space_gb), "VLLM_NO_USAGE_STATS": "1"}


def api_server_command(
    path: Path, tag: str, port: int, serve: ServeConfig, python: str = sys.executable
) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` CLI cannot find its own
    distribution) on loopback, with the builtin engine's chat template and serve.vllm's settings. A
    stored model with an adapter (package.py's layout) is served as that adapter on its base."""
    from transformers import AutoTokenizer

    template = resolve_template(AutoTokenizer.from_pretrained(path), serve.chat_template or None)
    with tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False) as file:
        file.write(template)
    adapter = path / ADAPTER_DIR
    names = [base_name(tag), "--lora-modules", f"{tag}={adapter}"] if adapter.is_dir() else [tag]
    return [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--served-model-name", *names,
        "--host", "127.0.0.1", "--port", str(port), "--chat-template", file.name,
        "--max-logprobs", str(serve.max_logprobs), "--disable-uvicorn-access-log", *serve.vllm.flags(),
    ]  # fmt: skip
