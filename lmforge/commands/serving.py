"""The model's commands: packaged as a Bento, served, tried locally, containerized, rolled back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lmforge.commands.common import fail, workspace_and_params


def package() -> None:
    """Package the current model (artifacts/model) as a Bento, if the gate passed it."""
    from infra.dvc import data_md5
    from pipeline.package import package as build

    ws, params = workspace_and_params()
    bento = build(ws, params, data_md5(ws.root))
    typer.echo(f"Bento {bento['bento_tag']} (model {bento['model_tag']})")
    typer.echo(f"Dockerfile {bento['dockerfile']}")


def _champion_bento(ws, params) -> str:
    """The current champion's Bento tag, imported from S3 into the local store if needed."""
    from lmforge.runs.registry import read_champion
    from pipeline.package import ensure_local_bento

    champion = read_champion(params.storage, ws.state)
    if not champion or not champion.bento_tag:
        fail("there is no champion Bento yet: run `lmforge run` first, or give a Bento tag")
    ensure_local_bento(ws, params, champion.bento_tag, champion.bento_url)
    return champion.bento_tag


def serve(
    tag: Annotated[str | None, typer.Argument(help="Bento tag; default: the current champion")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address; default serve.host (127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port; default serve.port (3000)")] = None,
    follow: Annotated[
        bool, typer.Option(help="Switch to each new champion (a promotion, a rollback) without a restart")
    ] = False,
    follow_interval: Annotated[
        float, typer.Option(min=0.5, help="With --follow: seconds between reads of the champion record")
    ] = 5.0,
) -> None:
    """Serve a Bento over HTTP: POST /generate, /v1/completions (OpenAI), GET /v1/models, /metrics."""
    from lmforge.serving.auth import api_keys, exposure_problem, is_loopback, unauthenticated_warning
    from pipeline.package import use_bentoml_home

    if follow and tag:
        fail("--follow serves the champion, whichever it is: give no TAG with it")
    ws, params = workspace_and_params()
    use_bentoml_home(ws.state)
    host, port = host or params.serve.host, port or params.serve.port
    keys = api_keys()
    if problem := exposure_problem(host, keys):
        fail(problem)
    if warning := unauthenticated_warning(host, keys):
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)
    elif not is_loopback(host):
        typer.secho(
            f"serving on {host}: reachable from other machines, with {len(keys)} API key(s)", err=True
        )
    tag = tag or _champion_bento(ws, params)
    import bentoml

    from infra.processes import bin_path, free_port

    try:
        vllm = bentoml.get(tag).info.labels.get("engine") == "vllm"
    except bentoml.exceptions.NotFound:
        fail(f"no Bento {tag} in the local store ({os.environ['BENTOML_HOME']}): see `bentoml list`")
    if follow:
        if vllm:
            fail("--follow switches models in lmforge's own engine: restart `lmforge serve` for a vLLM Bento")
        from lmforge.follow import serve_following

        raise typer.Exit(serve_following(ws, params, host, port, follow_interval, typer.echo))
    typer.echo(f"serving {tag} on http://{host}:{port}")
    bentoml_bin = bin_path("bentoml")
    if vllm:  # vLLM's pins are not the pipeline's: the Bento runs in an environment of its own
        from infra.engine_env import vllm_env

        bentoml_bin = str(vllm_env(ws.state, typer.echo) / "bin" / "bentoml")
        os.environ.setdefault("LMFORGE_VLLM_PORT", str(free_port()))  # vLLM behind BentoML's proxy
    os.execv(bentoml_bin, [bentoml_bin, "serve", tag, "--host", host, "--port", str(port)])  # BentoML owns it


def generate(
    prompt: Annotated[str, typer.Argument(help="The text to continue")],
    model: Annotated[
        Path | None, typer.Option(help="A Hugging Face model dir; default artifacts/model")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Default: serve.default_max_new_tokens, as /generate")
    ] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Default: evaluate.temperature")] = None,
    top_p: Annotated[float, typer.Option(min=0.01, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
) -> None:
    """A quick local check: continue PROMPT with the trained model, in this process."""
    from lmforge.serving.engine import load_engine
    from lmforge.serving.sampling import Delta, SamplingParams

    ws, params = workspace_and_params()
    model_dir = model or ws.model_dir
    if not (model_dir / "config.json").is_file():
        fail(f"{model_dir} holds no model: train one first (`lmforge run` or `dvc repro`)")
    engine = load_engine(model_dir, max_batch_size=1)
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens or params.serve.default_max_new_tokens,
        temperature=params.evaluate.temperature if temperature is None else temperature,
        top_p=top_p,
        seed=seed,
    )
    for event in engine.stream(prompt, sampling):
        if isinstance(event, Delta):
            typer.echo(event.text, nl=False)
    typer.echo()


def containerize(
    tag: Annotated[str | None, typer.Argument(help="Bento tag; default: the current champion")] = None,
) -> None:
    """Build the Bento's container image with `bentoml containerize` (needs a docker engine)."""
    from infra.processes import bin_path, stream_command, venv_env
    from pipeline.package import docker_engine_available, use_bentoml_home

    ws, params = workspace_and_params()
    use_bentoml_home(ws.state)
    tag = tag or _champion_bento(ws, params)
    if not docker_engine_available():
        import bentoml

        dockerfile = Path(bentoml.get(tag).path) / "env" / "docker" / "Dockerfile"
        fail(
            f"no docker engine is reachable here (`docker info` fails), so {tag} cannot be containerized on "
            f"this machine. The container recipe is {dockerfile}; run `bentoml containerize {tag}` where "
            "docker runs (after `bentoml export`/`import`, or from the Bento in S3)."
        )
    stream_command([bin_path("bentoml"), "containerize", tag], ws.root, env=venv_env())


def rollback() -> None:
    """Make the previous champion current again (the registry keeps every promotion)."""
    from lmforge.runs.contracts import record_name
    from lmforge.runs.registry import rollback as roll_back

    ws, params = workspace_and_params()
    record = roll_back(params.storage, ws.state)
    typer.echo(f"champion is now {record_name(record)} (rolled back from {record.rolled_back_from}); "
               "`lmforge serve --follow` switches to it, a plain `lmforge serve` needs a restart")  # fmt: skip
