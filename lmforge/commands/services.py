"""The workspace's services: the embedded S3 server and the Prefect server, started, listed, stopped."""

from __future__ import annotations

from typing import Annotated

import typer

from lmforge.commands.common import workspace_and_params


def up(
    prefect: Annotated[bool, typer.Option("--prefect", help="Also start the Prefect server and UI")] = False,
) -> None:
    """Start the embedded S3 server (idempotent), create the bucket, and point DVC's remote at it."""
    from infra.dvc import configure_dvc_remote
    from infra.embedded_s3 import EmbeddedS3

    ws, params = workspace_and_params()
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


def prefect_server() -> None:
    """Start the local Prefect server (API and UI on 127.0.0.1:4200); `lmforge run` then reports to it."""
    from infra.prefect_server import PrefectServer

    ws, params = workspace_and_params()
    server = PrefectServer(params.prefect, ws.state)
    typer.echo(server.start())
    typer.echo(f"open the UI at {server.url}; flows from this workspace report to {server.api_url}")


def down() -> None:
    """Stop the servers lmforge started (S3 and Prefect)."""
    from infra.embedded_s3 import EmbeddedS3
    from infra.prefect_server import PrefectServer

    ws, params = workspace_and_params()
    typer.echo(PrefectServer(params.prefect, ws.state).stop())
    typer.echo(EmbeddedS3(params.storage, ws.state).stop())


def status() -> None:
    """Show what runs: the S3 server, the dataset version and the remote."""
    from infra.dvc import data_md5
    from infra.embedded_s3 import EmbeddedS3

    ws, params = workspace_and_params()
    info = EmbeddedS3(params.storage, ws.state).status() if params.storage.embedded else {}
    typer.echo(f"workspace   {ws.root}  (profile {params.profile})")
    for key, value in info.items():
        typer.echo(f"s3.{key:<10}{value}")
    from infra.prefect_server import PrefectServer

    for key, value in PrefectServer(params.prefect, ws.state).status().items():
        typer.echo(f"prefect.{key:<8}{value}")
    typer.echo(f"dvc remote  {params.storage.dvc_remote_url} at {params.storage.endpoint_url or 'AWS S3'}")
    typer.echo(f"data md5    {data_md5(ws.root) or '(nothing ingested yet)'}")
