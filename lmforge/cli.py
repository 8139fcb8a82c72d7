"""`lmforge`: the command line, its commands (lmforge/commands/) registered on one Typer app. Imports stay
inside the commands so that `lmforge --help` is instant."""

from __future__ import annotations

import sys

import typer

from lmforge.commands.bench import bench
from lmforge.commands.pipeline import ingest, params, run, schedule, sweep, validate
from lmforge.commands.services import down, prefect_server, status, up
from lmforge.commands.serving import containerize, generate, package, rollback, serve

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


# in the order `lmforge --help` lists them
app.command()(up)
app.command("prefect-server")(prefect_server)
app.command()(down)
app.command()(status)
app.command()(validate)
app.command()(ingest)
app.command()(sweep)
app.command()(params)
app.command()(run)
app.command()(schedule)
app.command()(package)
app.command()(serve)
app.command()(generate)
app.command()(containerize)
app.command()(rollback)
app.command()(bench)


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
