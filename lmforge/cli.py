"""`lmforge`: the command line. Imports stay inside the commands so that `lmforge --help` is instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

HELP = """\
lmforge trains and ships small language models, retrained on schedule and shipped safely.

The chain: ingest -> validate -> preprocess -> train -> evaluate -> gate -> package -> publish.
The product is a BentoML Bento serving POST /generate and OpenAI-compatible /v1/completions.
DVC versions the data (data.dvc) and stage outputs in S3; Prefect runs the chain as a flow;
params.yaml holds every knob (`-p section.key=value` overrides, `--profile demo|chat|gpu|gpu-adapt`).

Typical session:

\b
  lmforge up                     start the embedded S3 server (SeaweedFS, 127.0.0.1)
  lmforge validate SRC           what a corpus keeps and drops, and why (exit 0/1)
  lmforge ingest --source SRC    builtin | builtin-chat | file or dir | s3://b/prefix (.txt .md .jsonl,
                                 their .gz/.zst, .parquet)
  lmforge run                    the whole flow: ingest, dvc repro (validate, preprocess,
                                 train, evaluate, gate), package, dvc push, publish
  lmforge up --prefect           also start the Prefect server and UI (127.0.0.1:4200)
  lmforge schedule --cron "0 3 * * *"   retrain nightly (a Prefect deployment)
  lmforge serve [TAG]            serve the champion Bento (or TAG) on 127.0.0.1:3000
  lmforge serve --follow         ... and switch to each new champion without a restart
  lmforge generate "PROMPT"      a quick local check of the trained model
  lmforge rollback               make the previous champion current again
  lmforge containerize [TAG]     the Bento as a container image (needs docker)
  lmforge status | down          what runs | stop it
  lmforge bench [--quick]        throughput against the bare libraries, as ratios
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None)

Overrides = Annotated[
    list[str] | None, typer.Option("-p", "--param", help="Override a param: section.key=value")
]
Profile = Annotated[
    str | None, typer.Option("--profile", help="Params profile: demo (this CPU), chat, gpu or gpu-adapt")
]


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _workspace_and_params(overrides: list[str] | None = None, profile: str | None = None):
    from lmforge.params_file import load_params
    from lmforge.workspace import Workspace

    ws = Workspace.find()
    return ws, load_params(ws.root, overrides or [], profile)


def _report_to_prefect(ws, params) -> None:
    """Before a flow runs or is deployed: Prefect keeps its database under the workspace's state dir and
    never phones home, and flows report to the workspace's Prefect server when `lmforge up --prefect`
    started one."""
    from infra.prefect_server import PrefectServer, prefect_env

    for key, value in prefect_env(ws.state).items():
        os.environ.setdefault(key, value)
    server = PrefectServer(params.prefect, ws.state)
    if "PREFECT_API_URL" not in os.environ and server.pid():
        os.environ["PREFECT_API_URL"] = server.api_url


@app.command()
def up(
    prefect: Annotated[bool, typer.Option("--prefect", help="Also start the Prefect server and UI")] = False,
) -> None:
    """Start the embedded S3 server (idempotent), create the bucket, and point DVC's remote at it."""
    from infra.dvc import configure_dvc_remote
    from infra.embedded_s3 import EmbeddedS3

    ws, params = _workspace_and_params()
    if prefect:
        prefect_server()
    if not params.storage.embedded:
        configure_dvc_remote(ws.root, params.storage, ws.state)
        typer.echo(
            f"storage.embedded is false: using {params.storage.endpoint_url or 'AWS S3'}; nothing to start"
        )
        _restore_data(ws)
        return
    typer.echo(EmbeddedS3(params.storage, ws.state).start())
    configure_dvc_remote(ws.root, params.storage, ws.state)
    typer.echo(f"DVC remote: {params.storage.dvc_remote_url} at {params.storage.endpoint_url}")
    _restore_data(ws)


def _restore_data(ws) -> None:
    """data/ for a fresh clone, so that `dvc repro` has its input."""
    from pipeline.ingest import restore_data

    how = restore_data(ws, on_line=lambda line: None)
    if how:
        typer.echo(f"data/: {how}")


@app.command("prefect-server")
def prefect_server() -> None:
    """Start the local Prefect server (API and UI on 127.0.0.1:4200); `lmforge run` then reports to it."""
    from infra.prefect_server import PrefectServer

    ws, params = _workspace_and_params()
    server = PrefectServer(params.prefect, ws.state)
    typer.echo(server.start())
    typer.echo(f"open the UI at {server.url}; flows from this workspace report to {server.api_url}")


@app.command()
def down() -> None:
    """Stop the servers lmforge started (S3 and Prefect)."""
    from infra.embedded_s3 import EmbeddedS3
    from infra.prefect_server import PrefectServer

    ws, params = _workspace_and_params()
    typer.echo(PrefectServer(params.prefect, ws.state).stop())
    typer.echo(EmbeddedS3(params.storage, ws.state).stop())


@app.command()
def status() -> None:
    """Show what runs: the S3 server, the dataset version and the remote."""
    from infra.dvc import data_md5
    from infra.embedded_s3 import EmbeddedS3

    ws, params = _workspace_and_params()
    info = EmbeddedS3(params.storage, ws.state).status() if params.storage.embedded else {}
    typer.echo(f"workspace   {ws.root}  (profile {params.profile})")
    for key, value in info.items():
        typer.echo(f"s3.{key:<10}{value}")
    from infra.prefect_server import PrefectServer

    for key, value in PrefectServer(params.prefect, ws.state).status().items():
        typer.echo(f"prefect.{key:<8}{value}")
    typer.echo(f"dvc remote  {params.storage.dvc_remote_url} at {params.storage.endpoint_url or 'AWS S3'}")
    typer.echo(f"data md5    {data_md5(ws.root) or '(nothing ingested yet)'}")


@app.command()
def validate(
    source: Annotated[
        str, typer.Argument(help="A corpus file or directory, or s3://bucket/prefix; data/ is not touched")
    ],
    overrides: Overrides = None,
    report_dir: Annotated[
        Path | None, typer.Option(help="Also write report.json, report.md and dropped.jsonl here")
    ] = None,
) -> None:
    """Filter and check any corpus: kept and dropped documents by reason, with examples.

    Exit 0 when the corpus passes after filtering, 1 when it does not (or cannot be read)."""
    from lmforge.data.validation_report import format_failure, format_summary, write_report
    from pipeline.ingest import readable_source
    from pipeline.validate import validate_corpus

    ws, params = _workspace_and_params(overrides)
    with readable_source(source, params, ws.state) as corpus:
        report = validate_corpus(corpus, params, name=source)
    if report_dir:
        write_report(report, report_dir)
    typer.echo(format_summary(report))
    if not report.success:
        _fail(format_failure(report))
    typer.secho("valid", fg=typer.colors.GREEN)


@app.command()
def ingest(
    source: Annotated[
        str | None, typer.Option(help="builtin | builtin-chat | a local file or dir | s3://bucket/prefix")
    ] = None,
    overrides: Overrides = None,
    push: Annotated[bool, typer.Option(help="dvc push the new dataset version")] = True,
) -> None:
    """Write a corpus into data/ (validated first), version it with `dvc add data`, and push it."""
    from infra.dvc import configure_dvc_remote, dvc, remote_object_url
    from pipeline.ingest import ingest as run_ingest

    ws, params = _workspace_and_params(overrides)
    md5 = run_ingest(source or params.ingest.source, ws, params)
    if push:
        configure_dvc_remote(ws.root, params.storage, ws.state)
        dvc(["push", "data.dvc"], ws.root)
    typer.echo(f"dataset md5 {md5}")
    if push:
        typer.echo(f"in S3 at    {remote_object_url(params.storage.dvc_remote_url, md5)}")


@app.command()
def sweep(
    grid: Annotated[
        list[str], typer.Option("-p", "--param", help="A param and its values: section.key=v1,v2,...")
    ],
    jobs: Annotated[int, typer.Option(min=1, help="Experiments run at once by DVC's queue")] = 1,
) -> None:
    """One DVC experiment per point of the grid (`dvc exp run --queue -S`, then `dvc queue start`), and a
    table of their results. Nothing is promoted: `dvc exp apply NAME`, then `lmforge run` gates it."""
    from lmforge.runs.experiments import experiments, ranked, sweep, table

    ws, _ = _workspace_and_params()
    names = sweep(ws, grid, jobs, on_line=typer.echo)
    found = [e for e in experiments(ws) if e["name"] in names]
    typer.echo("\n" + table(found, grid))
    if found:
        best = ranked(found)[0]["name"]
        typer.echo(f"\nto ship the best through the gate: dvc exp apply {best} && lmforge run")


@app.command()
def params(overrides: Overrides = None, profile: Profile = None) -> None:
    """Print the resolved params (profile and overrides applied) as YAML."""
    import yaml

    _, resolved = _workspace_and_params(overrides, profile)
    typer.echo(yaml.safe_dump(resolved.model_dump(), sort_keys=False))


@app.command()
def run(
    source: Annotated[str | None, typer.Option(help="Corpus source; default: params ingest.source")] = None,
    overrides: Overrides = None,
    profile: Profile = None,
) -> None:
    """Run the retraining flow (Prefect; ephemeral, or the server in PREFECT_API_URL).

    -p/--profile are written into params.yaml first, as `dvc exp run -S` does, so that DVC sees them
    and dvc.lock records what ran.
    """
    from lmforge.params_file import write_overrides

    ws, params = _workspace_and_params(overrides, profile)
    for change in write_overrides(ws.root, overrides or [], profile):
        typer.echo(f"params.yaml: {change}")
    _report_to_prefect(ws, params)
    from flows.retrain import retrain

    try:
        summary = retrain(source=source, root=str(ws.root))
    except Exception as exc:  # noqa: BLE001 - the flow already logged the traceback; end with the cause
        _fail(f"the flow failed: {exc}")
    if os.environ.get("PREFECT_API_URL"):
        typer.echo(f"flow run in the Prefect UI: {os.environ['PREFECT_API_URL'].removesuffix('/api')}/runs")
    print_summary(summary)


def print_summary(summary) -> None:
    """What `lmforge run` ends with: the data, the model's figures and the gate's verdict."""
    m = summary.metrics
    typer.secho("\nlmforge run finished", bold=True)
    typer.echo(f"  dataset md5   {summary.data_md5}")
    docs = summary.documents
    if docs.get("documents") is not None:
        dropped = ", ".join(f"{k} {v:,}" for k, v in (docs["dropped_by_reason"] or {}).items()) or "none"
        typer.echo(
            f"  documents     {docs['kept_documents']:,} kept of {docs['documents']:,} (dropped: {dropped})"
        )
    tokens = ", ".join(f"{k} {v:,}" for k, v in summary.tokens.items())
    typer.echo(f"  tokens        {tokens} (vocab {summary.vocab_size:,})")
    typer.echo(f"  data in S3    {summary.data_url}")
    typer.echo(
        f"  val           {m['val_bits_per_byte']:.4f} bits/byte  (bigram {m['bigram_val_bits_per_byte']:.4f}, "
        f"unigram {m['unigram_val_bits_per_byte']:.4f})"
    )
    typer.echo(f"  test          {m['test_bits_per_byte']:.4f} bits/byte")
    for against, by_split in summary.head_to_head.items():
        c = by_split["val"]
        low, high = c["interval"]
        typer.echo(
            f"  vs {against:<10} {c['other_bits_per_byte']:.4f} bits/byte on the same val text: "
            f"{c['relative_difference']:+.2%} ({c['confidence']:.0%} interval {low:+.2%} to {high:+.2%})"
        )
    typer.echo(
        f"  per token     val ppl {m['val_perplexity']:.2f} (bigram {m['bigram_val_perplexity']:.2f}), "
        f"test ppl {m['test_perplexity']:.2f}: this tokenizer's only"
    )
    if (leak := summary.contamination) is not None:
        typer.echo(
            f"  contamination {leak['val']:.2%} of val, {leak['test']:.2%} of test word {leak['ngram']}-grams also in train"
        )
    typer.echo(f"  training      {m['train_tokens_per_s']:,} tokens/s on {m['train_world_size']} processes")
    verdict = {"No change": "no change (the champion is this same model)", "Promoted": "PROMOTED",
               "Rejected": "REJECTED"}[summary.outcome]  # fmt: skip
    typer.echo(f"  gate          {verdict}")
    for reason in summary.reasons:
        typer.echo(f"                {reason}")
    if summary.model_url:
        typer.echo(f"  model in S3   {summary.model_url}")
    if summary.bento_tag:
        typer.echo(f"  Bento         {summary.bento_tag}  ({summary.bento_url})")
        typer.echo(
            "  serve it      lmforge serve   (then POST /generate, /v1/completions or /v1/chat/completions)"
        )


@app.command()
def schedule(
    cron: Annotated[
        str, typer.Option(help='When to retrain, as a cron line, e.g. "0 3 * * *" (03:00 daily)')
    ],
    source: Annotated[
        str | None, typer.Option(help="Corpus source each run ingests; default ingest.source")
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(help="Deploy to this Prefect work pool for remote workers instead of serving here"),
    ] = None,
) -> None:
    """Retrain on a cron schedule: a Prefect deployment of the retraining flow.

    Without --pool this process serves the deployment (`flow.serve`) until stopped, running each
    scheduled run here. With --pool it registers the deployment to a work pool and returns; a
    `prefect worker start --pool POOL` on any machine with this workspace runs the runs.
    """
    ws, params = _workspace_and_params()
    _report_to_prefect(ws, params)
    if "PREFECT_API_URL" not in os.environ:
        _fail("a schedule needs a Prefect server: run `lmforge up --prefect`, or set PREFECT_API_URL")
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError as exc:
        _fail(f"--cron {cron!r}: {exc}", 2)
    from flows.retrain import retrain

    name, parameters = params.prefect.deployment, {"source": source, "root": str(ws.root)}
    if pool:
        deployment_id = retrain.from_source(
            source=str(ws.root), entrypoint="flows/retrain.py:retrain"
        ).deploy(name=name, work_pool_name=pool, cron=cron, parameters=parameters, build=False, push=False)
        typer.echo(f"deployment lmforge-retrain/{name} ({deployment_id}) on pool {pool}, cron {cron!r}")
        typer.echo(f"start a worker where this workspace is: prefect worker start --pool {pool}")
        return
    typer.echo(f"serving lmforge-retrain/{name} on cron {cron!r}; Ctrl-C stops it")
    retrain.serve(name=name, cron=cron, parameters=parameters)


@app.command()
def package() -> None:
    """Package the current model (artifacts/model) as a Bento, if the gate passed it."""
    from infra.dvc import data_md5
    from pipeline.package import package as build

    ws, params = _workspace_and_params()
    bento = build(ws, params, data_md5(ws.root))
    typer.echo(f"Bento {bento['bento_tag']} (model {bento['model_tag']})")
    typer.echo(f"Dockerfile {bento['dockerfile']}")


def _champion_bento(ws, params) -> str:
    """The current champion's Bento tag, imported from S3 into the local store if needed."""
    from lmforge.runs.registry import read_champion
    from pipeline.package import ensure_local_bento

    champion = read_champion(params.storage, ws.state)
    if not champion or not champion.bento_tag:
        _fail("there is no champion Bento yet: run `lmforge run` first, or give a Bento tag")
    ensure_local_bento(ws, params, champion.bento_tag, champion.bento_url)
    return champion.bento_tag


@app.command()
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
        _fail("--follow serves the champion, whichever it is: give no TAG with it")
    ws, params = _workspace_and_params()
    use_bentoml_home(ws.state)
    host, port = host or params.serve.host, port or params.serve.port
    keys = api_keys()
    if problem := exposure_problem(host, keys):
        _fail(problem)
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
        _fail(f"no Bento {tag} in the local store ({os.environ['BENTOML_HOME']}): see `bentoml list`")
    if follow:
        if vllm:
            _fail(
                "--follow switches models in lmforge's own engine: restart `lmforge serve` for a vLLM Bento"
            )
        from lmforge.follow import serve_following

        raise typer.Exit(serve_following(ws, params, host, port, follow_interval, typer.echo))
    typer.echo(f"serving {tag} on http://{host}:{port}")
    bentoml_bin = bin_path("bentoml")
    if vllm:  # vLLM's pins are not the pipeline's: the Bento runs in an environment of its own
        from infra.engine_env import vllm_env

        bentoml_bin = str(vllm_env(ws.state, typer.echo) / "bin" / "bentoml")
        os.environ.setdefault("LMFORGE_VLLM_PORT", str(free_port()))  # vLLM behind BentoML's proxy
    os.execv(bentoml_bin, [bentoml_bin, "serve", tag, "--host", host, "--port", str(port)])  # BentoML owns it


@app.command()
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

    ws, params = _workspace_and_params()
    model_dir = model or ws.model_dir
    if not (model_dir / "config.json").is_file():
        _fail(f"{model_dir} holds no model: train one first (`lmforge run` or `dvc repro`)")
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


@app.command()
def containerize(
    tag: Annotated[str | None, typer.Argument(help="Bento tag; default: the current champion")] = None,
) -> None:
    """Build the Bento's container image with `bentoml containerize` (needs a docker engine)."""
    from infra.processes import bin_path, stream_command, venv_env
    from pipeline.package import docker_engine_available, use_bentoml_home

    ws, params = _workspace_and_params()
    use_bentoml_home(ws.state)
    tag = tag or _champion_bento(ws, params)
    if not docker_engine_available():
        import bentoml

        dockerfile = Path(bentoml.get(tag).path) / "env" / "docker" / "Dockerfile"
        _fail(
            f"no docker engine is reachable here (`docker info` fails), so {tag} cannot be containerized on "
            f"this machine. The container recipe is {dockerfile}; run `bentoml containerize {tag}` where "
            "docker runs (after `bentoml export`/`import`, or from the Bento in S3)."
        )
    stream_command([bin_path("bentoml"), "containerize", tag], ws.root, env=venv_env())


@app.command()
def rollback() -> None:
    """Make the previous champion current again (the registry keeps every promotion)."""
    from lmforge.runs.contracts import record_name
    from lmforge.runs.registry import rollback as roll_back

    ws, params = _workspace_and_params()
    record = roll_back(params.storage, ws.state)
    typer.echo(f"champion is now {record_name(record)} (rolled back from {record.rolled_back_from}); "
               "`lmforge serve --follow` switches to it, a plain `lmforge serve` needs a restart")  # fmt: skip


@app.command()
def bench(
    quick: Annotated[
        bool, typer.Option("--quick", help="A tiny model and short runs (a few minutes)")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Where results.json and results.md go; default: bench/ in the workspace"),
    ] = None,
    corpus: Annotated[
        Path | None, typer.Option(help="A corpus file or dir; default: the builtin corpus")
    ] = None,
    skip_pipeline: Annotated[
        bool, typer.Option("--skip-pipeline", help="Skip the pipeline section (it starts its own S3)")
    ] = False,
    sections: Annotated[
        str, typer.Option(help="Comma-separated: validate,preprocess,train,adapt,serve,vllm,pipeline")
    ] = "validate,preprocess,train,adapt,serve,vllm,pipeline",
    demo_seconds: Annotated[
        float | None, typer.Option(help="Record this `make demo` wall time (timed outside the bench)")
    ] = None,
    profile: Profile = None,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 if a figure misses its target, naming each one")
    ] = False,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target", help="Replace a target's value for this run: NAME=VALUE (benchmarks/targets.py)"
        ),
    ] = None,
) -> None:
    """Measure each stage against the bare library doing the same work; write a table of ratios.

    Runs in a temporary workspace of its own: data/, artifacts/, the BentoML store and S3 of this
    workspace are not touched. With --check it exits 1 when a figure misses its target in
    benchmarks/targets.py, with one line per missed target: the figure, its value, the target.
    """
    from benchmarks import SECTIONS, run_bench
    from benchmarks.targets import missed, with_values

    ws, _ = _workspace_and_params()
    chosen = [s.strip() for s in sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        _fail(f"--sections: unknown {', '.join(unknown)}; choose from {','.join(SECTIONS)}", 2)
    overrides = {}
    for item in target or []:
        name, _, value = item.partition("=")
        try:
            overrides[name.strip()] = float(value)
        except ValueError:
            _fail(f"--target {item}: expected NAME=NUMBER, e.g. train.overhead=0.95", 2)
    try:
        targets = with_values(overrides)
    except KeyError as exc:
        _fail(f"--target: {exc.args[0]}", 2)
    skipped = {}
    if skip_pipeline and "pipeline" in chosen:
        chosen.remove("pipeline")
        skipped["pipeline"] = "--skip-pipeline"
    if quick and "vllm" in chosen:
        chosen.remove("vllm")
        skipped["vllm"] = "full mode only (vLLM's servers start in about a minute each)"
    results = run_bench(
        quick,
        out or ws.root / "bench",
        ws.root,
        corpus,
        [s for s in SECTIONS if s in chosen],
        skipped,
        demo_seconds,
        profile,
        targets=targets,
    )
    if check:
        lines = missed(results)
        if lines:
            typer.secho(f"bench --check: {len(lines)} target(s) missed", fg=typer.colors.RED, err=True)
            for line in lines:
                typer.echo(f"  missed {line}", err=True)
            raise typer.Exit(1)
        typer.echo("bench --check: every judged figure met its target")


def main() -> int:
    """Every expected failure (an LmforgeError, or the serving package's own ServingError) ends with its
    message and exit code, never a traceback."""
    from infra.errors import LmforgeError
    from lmforge.serving.errors import ServingError

    try:
        app(prog_name="lmforge")
    except (LmforgeError, ServingError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
