"""The local Prefect server (API and UI) that `lmforge up --prefect` starts.

It is a `prefect server start` subprocess in its own session, with its SQLite database under the
workspace state dir and analytics off; this module only manages the process and does not import prefect.
Flows report to it through PREFECT_API_URL, which the lmforge CLI sets while it runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Protocol

from infra.errors import LmforgeError
from infra.processes import Supervisor, answers_200, bin_path, is_loopback, port_is_free


class PrefectSettings(Protocol):
    """What the server needs of the prefect params (lmforge.config.PrefectConfig)."""

    host: str
    port: int


class PrefectServerError(LmforgeError):
    """The server could not start or stop; the message says why and where its log is."""


def prefect_env(state: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Prefect's settings for this workspace: its home under the state dir, and no telemetry."""
    env = {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # Prefect counts only its own sleeps against its 20 s default: on a busy 2-core machine the
        # ephemeral server can take longer than that to answer.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    return env | (extra or {})


class PrefectServer:
    def __init__(self, cfg: PrefectSettings, state: Path):
        self.cfg = cfg
        self.dir = state / "prefect"
        self.state = state
        self.process = Supervisor(self.dir, "server")
        self.pidfile, self.log = self.process.pidfile, self.process.log

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def pid(self) -> int | None:
        """Our server's pid, or None (a stale pidfile is removed)."""
        return self.process.pid()

    def healthy(self) -> bool:
        return answers_200(f"{self.api_url}/health")

    def start(self, timeout: float = 90) -> str:
        with self.process.lock():
            if self.pid() and self.healthy():
                return f"Prefect already running at {self.url} (pid {self.pid()})"
            if not port_is_free(self.cfg.port, self.cfg.host):
                raise PrefectServerError(
                    f"cannot start Prefect on {self.url}: port {self.cfg.port} is in use "
                    "(move it with -p prefect.port=<port>)"
                )
            if not is_loopback(self.cfg.host):
                print(
                    f"warning: the Prefect server on {self.cfg.host} is reachable from other machines",
                    file=sys.stderr,
                )
            cmd = [
                bin_path("prefect"),
                "server",
                "start",
                "--host",
                self.cfg.host,
                "--port",
                str(self.cfg.port),
            ]
            # The UI asks the server where its API is; without this it would look on the default port 4200.
            ui = {"PREFECT_UI_API_URL": self.api_url, "PREFECT_SERVER_API_HOST": self.cfg.host,
                  "PREFECT_SERVER_API_PORT": str(self.cfg.port)}  # fmt: skip
            proc = self.process.spawn(cmd, env=prefect_env(self.state) | os.environ | ui)
            if not self.process.wait_healthy(self.healthy, proc, timeout):
                self.process.stop(15)
                raise PrefectServerError(
                    f"Prefect did not start on {self.url}; log {self.log}:\n{self.process.log_tail(2000)}"
                )
        return f"Prefect started at {self.url} (pid {proc.pid}); UI at {self.url}"

    def stop(self) -> str:
        with self.process.lock():
            pid = self.process.stop(15)
        return "Prefect not running" if pid is None else f"Prefect stopped (pid {pid})"

    def status(self) -> dict:
        pid = self.pid()
        return {"running": bool(pid and self.healthy()), "pid": pid, "ui": self.url, "log": str(self.log)}
