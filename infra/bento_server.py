"""`bentoml serve` of one Bento on a loopback port, supervised: for the bench and the tests.

(`lmforge serve` execs bentoml in the foreground instead: BentoML owns that process.)
"""

from __future__ import annotations

from pathlib import Path

from infra.errors import LmforgeError
from infra.processes import Supervisor, answers_200, bin_path, free_port


class BentoServerError(LmforgeError):
    """The Bento did not come up; the message carries the end of its log."""


class BentoServer:
    """Logs to a file: an unread pipe fills up under many requests and stalls the server."""

    def __init__(self, tag: str, dir: Path, port: int | None = None, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", bentoml: str | None = None, timeout: float = 180):  # fmt: skip
        """bentoml: the bentoml to serve with (a vLLM Bento's is in vLLM's environment); timeout: the
        seconds it may take to become ready."""
        self.timeout = timeout
        self.tag, self.port, self.env, self.host = tag, port or free_port(), env, host
        self.bentoml = bentoml or bin_path("bentoml")
        self.process = Supervisor(dir, "bentoml-serve")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    @property
    def log(self) -> Path:
        return self.process.log

    def ready(self) -> bool:
        return answers_200(f"{self.url}/readyz")

    def start(self, timeout: float | None = None) -> BentoServer:
        timeout = timeout or self.timeout
        cmd = [self.bentoml, "serve", self.tag, "--host", self.host, "--port", str(self.port)]
        self.proc = self.process.spawn(cmd, env=self.env)
        if not self.process.wait_healthy(self.ready, self.proc, timeout):
            exited = self.proc.poll()
            self.process.stop(20)
            why = f"exited with {exited}" if exited is not None else f"was not ready in {timeout:.0f} s"
            raise BentoServerError(f"bentoml serve {self.tag} {why}:\n{self.process.log_tail()}")
        return self

    def stop(self) -> None:
        self.process.stop(20)

    def __enter__(self) -> BentoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
