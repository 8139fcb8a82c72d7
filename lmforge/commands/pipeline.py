"""The pipeline's commands: a corpus validated or ingested, the whole run (and its summary), a sweep,
the params, and the schedule."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lmforge.commands.common import Overrides, Profile, fail, report_to_prefect, workspace_and_params


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

    ws, params = workspace_and_params(overrides)
    with readable_source(source, params, ws.state) as corpus:
        report = validate_corpus(corpus, params, name=source)
    if report_dir:
        write_report(report, report_dir)
    typer.echo(format_summary(report))
    if not report.success:
        fail(format_failure(report))
    typer.secho("valid", fg=typer.colors.GREEN)


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

    ws, params = workspace_and_params(overrides)
    md5 = run_ingest(source or params.ingest.source, ws, params)
    if push:
        configure_dvc_remote(ws.root, params.storage, ws.state)
        dvc(["push", "data.dvc"], ws.root)
    typer.echo(f"dataset md5 {md5}")
    if push:
        typer.echo(f"in S3 at    {remote_object_url(params.storage.dvc_remote_url, md5)}")


def sweep(
    grid: Annotated[
        list[str], typer.Option("-p", "--param", help="A param and its values: section.key=v1,v2,...")
    ],
    jobs: Annotated[int, typer.Option(min=1, help="Experiments run at once by DVC's queue")] = 1,
) -> None:
    """One DVC experiment per point of the grid (`dvc exp run --queue -S`, then `dvc queue start`), and a
    table of their results. Nothing is promoted: `dvc exp apply NAME`, then `lmforge run` gates it."""
    from lmforge.runs.experiments import experiments, ranked, sweep, table

    ws, _ = workspace_and_params()
    names = sweep(ws, grid, jobs, on_line=typer.echo)
    found = [e for e in experiments(ws) if e["name"] in names]
    typer.echo("\n" + table(found, grid))
    if found:
        best = ranked(found)[0]["name"]
        typer.echo(f"\nto ship the best through the gate: dvc exp apply {best} && lmforge run")


def params(overrides: Overrides = None, profile: Profile = None) -> None:
    """Print the resolved params (profile and overrides applied) as YAML."""
    import yaml

    _, resolved = workspace_and_params(overrides, profile)
    typer.echo(yaml.safe_dump(resolved.model_dump(), sort_keys=False))


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

    ws, params = workspace_and_params(overrides, profile)
    for change in write_overrides(ws.root, overrides or [], profile):
        typer.echo(f"params.yaml: {change}")
    report_to_prefect(ws, params)
    from flows.retrain import retrain

    try:
        summary = retrain(source=source, root=str(ws.root))
    except Exception as exc:  # noqa: BLE001 - the flow already logged the traceback; end with the cause
        fail(f"the flow failed: {exc}")
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
    ws, params = workspace_and_params()
    report_to_prefect(ws, params)
    if "PREFECT_API_URL" not in os.environ:
        fail("a schedule needs a Prefect server: run `lmforge up --prefect`, or set PREFECT_API_URL")
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError as exc:
        fail(f"--cron {cron!r}: {exc}", 2)
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
