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
DVC versions the data (data.dvc) and stage outputs in S3; Prefect runs the chain as a flow;
params.yaml holds every knob (`-p section.key=value` overrides, `--profile demo|gpu`).

Typical session:

\b
  lmforge up                     start the embedded S3 server (SeaweedFS, 127.0.0.1)
  lmforge validate PATH          check a corpus before ingesting it (exit 0/1)
  lmforge ingest --source SRC    builtin | file or dir (.txt .md .jsonl) | s3://b/prefix
  lmforge run                    the whole flow: ingest, dvc repro (validate, preprocess,
                                 train, evaluate, gate), dvc push, promote
  lmforge status | down          what runs | stop it
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None)

Overrides = Annotated[
    list[str] | None, typer.Option("-p", "--param", help="Override a param: section.key=value")
]
Profile = Annotated[str | None, typer.Option("--profile", help="Params profile: demo (this CPU) or gpu")]


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _workspace_and_params(overrides: list[str] | None = None, profile: str | None = None):
    """The workspace and its params, with the process environment set up for Prefect and friends."""
    from pipeline.config import ConfigError, Workspace, load_params

    try:
        ws = Workspace.find()
        params = load_params(ws.root, overrides or [], profile)
    except ConfigError as exc:
        _fail(str(exc), 2)
    # Prefect keeps its database under the project's state dir, and never phones home.
    os.environ.setdefault("PREFECT_HOME", str(ws.state / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    return ws, params


@app.command()
def up() -> None:
    """Start the embedded S3 server (idempotent), create the bucket, and point DVC's remote at it."""
    from pipeline.storage import EmbeddedS3, StorageError, configure_dvc_remote

    ws, params = _workspace_and_params()
    if not params.storage.embedded:
        configure_dvc_remote(ws.root, params.storage, ws.state)
        typer.echo(
            f"storage.embedded is false: using {params.storage.endpoint_url or 'AWS S3'}; nothing to start"
        )
        return
    try:
        typer.echo(EmbeddedS3(params.storage, ws.state).start())
        configure_dvc_remote(ws.root, params.storage, ws.state)
    except StorageError as exc:
        _fail(str(exc))
    typer.echo(f"DVC remote: {params.storage.dvc_remote_url} at {params.storage.endpoint_url}")


@app.command()
def down() -> None:
    """Stop the servers lmforge started."""
    from pipeline.storage import EmbeddedS3

    ws, params = _workspace_and_params()
    typer.echo(EmbeddedS3(params.storage, ws.state).stop())


@app.command()
def status() -> None:
    """Show what runs: the S3 server, the dataset version and the remote."""
    from pipeline.storage import EmbeddedS3
    from pipeline.versioning import data_md5

    ws, params = _workspace_and_params()
    info = EmbeddedS3(params.storage, ws.state).status() if params.storage.embedded else {}
    typer.echo(f"workspace   {ws.root}  (profile {params.profile})")
    for key, value in info.items():
        typer.echo(f"s3.{key:<10}{value}")
    typer.echo(f"dvc remote  {params.storage.dvc_remote_url} at {params.storage.endpoint_url or 'AWS S3'}")
    typer.echo(f"data md5    {data_md5(ws.root) or '(nothing ingested yet)'}")


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="A corpus file or directory; data/ is not touched")],
    overrides: Overrides = None,
    report_dir: Annotated[Path | None, typer.Option(help="Also write report.json and report.md here")] = None,
) -> None:
    """Run the validation suite on any corpus. Exit 0 when it is valid, 1 when it is not."""
    from pipeline.ingest import CorpusError
    from pipeline.validate import format_failure, validate_corpus, write_report

    _, params = _workspace_and_params(overrides)
    try:
        report = validate_corpus(path, params)
    except CorpusError as exc:
        _fail(str(exc))
    if report_dir:
        write_report(report, report_dir)
    stats = report.stats
    typer.echo(f"{path}: {stats['documents']:,} documents, {stats['total_chars']:,} chars")
    if not report.success:
        _fail(format_failure(report))
    typer.secho("valid", fg=typer.colors.GREEN)


@app.command()
def ingest(
    source: Annotated[
        str | None, typer.Option(help="builtin | a local file or dir | s3://bucket/prefix")
    ] = None,
    overrides: Overrides = None,
    push: Annotated[bool, typer.Option(help="dvc push the new dataset version")] = True,
) -> None:
    """Write a corpus into data/ (validated first), version it with `dvc add data`, and push it."""
    from pipeline.ingest import CorpusError
    from pipeline.ingest import ingest as run_ingest
    from pipeline.storage import StorageError, configure_dvc_remote
    from pipeline.versioning import CommandError, dvc, remote_object_url

    ws, params = _workspace_and_params(overrides)
    try:
        md5 = run_ingest(source or params.ingest.source, ws, params)
        if push:
            configure_dvc_remote(ws.root, params.storage, ws.state)
            dvc(["push", "data.dvc"], ws.root)
    except (CorpusError, StorageError, CommandError) as exc:
        _fail(str(exc))
    typer.echo(f"dataset md5 {md5}")
    if push:
        typer.echo(f"in S3 at    {remote_object_url(params.storage.dvc_remote_url, md5)}")


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
    from pipeline.config import ConfigError, write_overrides

    ws, _ = _workspace_and_params(overrides, profile)
    try:
        for change in write_overrides(ws.root, overrides or [], profile):
            typer.echo(f"params.yaml: {change}")
    except ConfigError as exc:
        _fail(str(exc), 2)
    from flows.retrain import retrain

    try:
        summary = retrain(source=source, root=str(ws.root))
    except Exception as exc:  # noqa: BLE001 - the flow already logged the traceback; end with the cause
        _fail(f"the flow failed: {exc}")
    tokens = ", ".join(f"{k} {v:,}" for k, v in summary["tokens"].items())
    m = summary["metrics"]
    typer.secho("\nlmforge run finished", bold=True)
    typer.echo(f"  dataset md5   {summary['data_md5']}")
    typer.echo(f"  tokens        {tokens} (vocab {summary['vocab_size']:,})")
    typer.echo(f"  data in S3    {summary['data_url']}")
    typer.echo(
        f"  val ppl       {m['val_perplexity']:.2f}  (bigram {m['bigram_val_perplexity']:.2f}, unigram {m['unigram_val_perplexity']:.2f})"
    )
    typer.echo(f"  test ppl      {m['test_perplexity']:.2f}")
    typer.echo(f"  training      {m['train_tokens_per_s']:,} tokens/s on {m['train_world_size']} processes")
    typer.echo(f"  gate          {'PROMOTED' if summary['promoted'] else 'REJECTED'}")
    for reason in summary["reasons"]:
        typer.echo(f"                {reason}")
    if summary["model_url"]:
        typer.echo(f"  model in S3   {summary['model_url']}")


def main() -> None:
    app(prog_name="lmforge")


if __name__ == "__main__":
    sys.exit(main())
