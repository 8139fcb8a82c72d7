"""The local Prefect server (API and UI) that `lmforge up --prefect` starts.

It is a `prefect server start` subprocess in its own session, with its SQLite database under the
workspace state dir and analytics off; this module only manages the process and does not import prefect.
Flows report to it through PREFECT_API_URL, which the lmforge CLI sets while it runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

from pipeline.config import PrefectConfig
from pipeline.storage import port_is_free, process_alive, reap_child
from pipeline.versioning import kill_tree


class PrefectServerError(RuntimeError):
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
    def __init__(self, cfg: PrefectConfig, state: Path):
        self.cfg = cfg
        self.dir = state / "prefect"
        self.state = state
        self.pidfile, self.log = self.dir / "server.pid", self.dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def pid(self) -> int | None:
        """Our server's pid, or None (a stale pidfile is removed)."""
        try:
            pid = int(self.pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            self.pidfile.unlink(missing_ok=True)
            return None
        if b"prefect" not in cmdline or not process_alive(pid):
            self.pidfile.unlink(missing_ok=True)
            return None
        return pid

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 90) -> str:
        if self.pid() and self.healthy():
            return f"Prefect already running at {self.url} (pid {self.pid()})"
        if not port_is_free(self.cfg.port, self.cfg.host):
            raise PrefectServerError(
                f"cannot start Prefect on {self.url}: port {self.cfg.port} is in use "
                "(move it with -p prefect.port=<port>)"
            )
        if self.cfg.host not in ("127.0.0.1", "localhost"):
            print(
                f"warning: the Prefect server on {self.cfg.host} is reachable from other machines",
                file=sys.stderr,
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        prefect = str(Path(sys.executable).parent / "prefect")
        cmd = [prefect, "server", "start", "--host", self.cfg.host, "--port", str(self.cfg.port)]
        # The UI asks the server where its API is; without this it would look on the default port 4200.
        ui = {"PREFECT_UI_API_URL": self.api_url, "PREFECT_SERVER_API_HOST": self.cfg.host,
              "PREFECT_SERVER_API_PORT": str(self.cfg.port)}  # fmt: skip
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                cmd, env=prefect_env(self.state) | os.environ | ui, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.pidfile.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise PrefectServerError(f"Prefect did not start on {self.url}; log {self.log}:\n{tail}")
            time.sleep(0.5)
        return f"Prefect started at {self.url} (pid {proc.pid}); UI at {self.url}"

    def stop(self) -> str:
        pid = self.pid()
        if pid is None:
            return "Prefect not running"
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while process_alive(pid) and time.monotonic() < deadline:
            reap_child(pid, 0.1)
            time.sleep(0.1)
        if process_alive(pid):
            kill_tree(pid, grace=2)
        self.pidfile.unlink(missing_ok=True)
        return f"Prefect stopped (pid {pid})"

    def status(self) -> dict:
        pid = self.pid()
        return {"running": bool(pid and self.healthy()), "pid": pid, "ui": self.url, "log": str(self.log)}
