"""API keys: who may call the service, and where it may listen without them.

Keys come from the environment only, never from params or git: `LMFORGE_API_KEYS` (comma-separated) and
the file `LMFORGE_API_KEYS_FILE` names (one key a line; blank lines and `#` comments skipped). With keys
set, every route but the health probes needs `Authorization: Bearer <key>`, as OpenAI clients send it.

A service that listens on anything but loopback without a key refuses to start; the explicit opt-out is
`LMFORGE_ALLOW_UNAUTHENTICATED=1`, which is warned about. `lmforge serve` checks the same before it starts the server.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from lmforge.serving.errors import ServingError

logger = logging.getLogger("bentoml.lmforge")  # BentoML shows its own loggers at INFO

KEYS_VAR, KEYS_FILE_VAR, ALLOW_VAR = (
    "LMFORGE_API_KEYS",
    "LMFORGE_API_KEYS_FILE",
    "LMFORGE_ALLOW_UNAUTHENTICATED",
)
OPEN_PATHS = ("/health", "/livez", "/readyz")  # what an orchestrator probes without credentials


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach host: localhost, 127.0.0.0/8 or ::1."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve to anything
        return False


class AuthError(ServingError):
    """Keys that cannot be read, or a network-facing service without any."""


def api_keys(env: dict[str, str] | None = None) -> list[str]:
    """The keys the environment sets (both variables may be used at once)."""
    env = os.environ if env is None else env
    keys = env.get(KEYS_VAR, "").split(",")
    if path := env.get(KEYS_FILE_VAR):
        try:
            keys += Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise AuthError(f"{KEYS_FILE_VAR}: cannot read {path} ({exc.strerror or exc})") from None
    return [k.strip() for k in keys if k.strip() and not k.strip().startswith("#")]


def authorized(header: bytes | None, keys: list[str]) -> bool:
    """Whether an Authorization header carries one of the keys; each comparison takes the same time
    whatever the key's content (hmac.compare_digest), and every key is compared."""
    scheme, _, given = (header or b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        return False
    matches = [hmac.compare_digest(given.strip().encode(), key.encode()) for key in keys]
    return any(matches)


def exposure_problem(host: str, keys: list[str], env: dict[str, str] | None = None) -> str | None:
    """Why serving on host is refused (reachable from other machines, and no key), or None."""
    env = os.environ if env is None else env
    if keys or is_loopback(host) or env.get(ALLOW_VAR) == "1":
        return None
    return (
        f"refusing to serve on {host}, which other machines can reach, without an API key: set {KEYS_VAR} "
        f"(comma-separated) or {KEYS_FILE_VAR} (a file, one key a line), or bind 127.0.0.1; "
        f"{ALLOW_VAR}=1 serves without keys anyway"
    )


def unauthenticated_warning(host: str, keys: list[str]) -> str | None:
    if keys or is_loopback(host):
        return None
    return f"warning: serving on {host} without API keys ({ALLOW_VAR}=1): anyone who can reach it may use it"


def bound_host() -> str | None:
    """The address this worker listens on: BentoML hands each worker its socket as `--fd N`."""
    if "--fd" not in sys.argv:
        return None
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockname()[0]


def refuse_exposure(keys: list[str]) -> None:
    """A worker whose socket other machines can reach starts only with API keys (or the explicit opt-out):
    this covers `bentoml serve` and the container, which bind 0.0.0.0 unless told otherwise."""
    host = bound_host()
    if host is None:
        return
    if problem := exposure_problem(host, keys):
        logger.error(problem)
        os.kill(os.getppid(), signal.SIGTERM)  # stop the whole server, not one worker circus would restart
        raise SystemExit(problem)
    if warning := unauthenticated_warning(host, keys):
        logger.warning(warning)
