"""What every command shares: the -p/--profile options, the error exit, the workspace and its params."""

from __future__ import annotations

import os
from typing import Annotated

import typer

Overrides = Annotated[
    list[str] | None, typer.Option("-p", "--param", help="Override a param: section.key=value")
]
Profile = Annotated[
    str | None, typer.Option("--profile", help="Params profile: demo (this CPU), chat, gpu or gpu-adapt")
]


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def workspace_and_params(overrides: list[str] | None = None, profile: str | None = None):
    from lmforge.params_file import load_params
    from lmforge.workspace import Workspace

    ws = Workspace.find()
    return ws, load_params(ws.root, overrides or [], profile)


def report_to_prefect(ws, params) -> None:
    """Before a flow runs or is deployed: Prefect keeps its database under the workspace's state dir and
    never phones home, and flows report to the workspace's Prefect server when `lmforge up --prefect`
    started one."""
    from infra.prefect_server import PrefectServer, prefect_env

    for key, value in prefect_env(ws.state).items():
        os.environ.setdefault(key, value)
    server = PrefectServer(params.prefect, ws.state)
    if "PREFECT_API_URL" not in os.environ and server.pid():
        os.environ["PREFECT_API_URL"] = server.api_url
