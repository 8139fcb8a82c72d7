"""Processes: one supervisor for every server lmforge starts, and commands streamed line by line.

Every server (SeaweedFS, Prefect, `bentoml serve` in the bench and the tests) goes through Supervisor,
so each gets the same guarantees: its own session, a pidfile whose identity is checked before any
signal is sent, a wait until it is healthy, TERM then KILL for its whole tree, reaping, and a rotated log.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from infra.atomic import write_text_atomic
from infra.errors import LmforgeError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_LOG_BYTES = 5 * 2**20
LineSink = Callable[[str], None]


def is_loopback(host: str | None) -> bool:
    return host in LOOPBACK_HOSTS


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on port (SO_REUSEADDR: a TIME_WAIT leftover does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's local ports for outgoing connections. A server port picked inside it can be taken
    by any client's socket between the check and the server's bind."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


def free_port_block(size: int = 1) -> int:
    """The first of `size` consecutive loopback ports nothing listens on, at a random place in 20000-65535
    outside the ephemeral range (random, so that servers started at once in other processes rarely pick
    the same block). Where that range leaves no room, anywhere in 20000-60000."""
    low, high = ephemeral_port_range()
    spans = [(a, b) for a, b in ((20000, low), (high + 1, 65536)) if b - a > size]  # [a, b) of ports
    spans = spans or [(20000, 60000)]
    rng = random.Random()
    for _ in range(200):
        start, stop = rng.choices(spans, weights=[b - a for a, b in spans])[0]
        base = rng.randrange(start, stop - size + 1)
        if all(port_is_free(base + i) for i in range(size)):
            return base
    where = ", ".join(f"{a}-{b - 1}" for a, b in spans)
    raise LmforgeError(f"no block of {size} free loopback ports found in {where}")


def free_port() -> int:
    return free_port_block(1)


def answers_200(url: str, timeout: float = 2) -> bool:
    """True when a GET of url answers 200: a server's health check."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def bin_path(name: str) -> str:
    """A console script of this interpreter's environment (dvc, bentoml, prefect, weed)."""
    return str(Path(sys.executable).parent / name)


# ---------------------------------------------------------------------------------------------
# process state and termination


def process_alive(pid: int) -> bool:
    """True while any thread of pid runs. The leader of a Go process turns zombie before its other
    threads have exited (and released its ports), so the leader's own state is not enough."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(") ", 1)[1][0] not in "ZX":
                return True
        except (OSError, IndexError):
            continue
    return False


def start_time(pid: int) -> str | None:
    """The kernel's start time of pid (clock ticks since boot): with the pid, it names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def reap_child(pid: int, timeout: float = 2) -> None:
    """Collect the exit status when pid is our own child, so it leaves no zombie."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (`lmforge down` in another process), or reaped
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def descendants(pid: int) -> list[int]:
    """Every process below pid, children first found first. torchrun puts each rank in a session of
    its own, so a process group does not reach them: walk the parent links instead."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(pid: int, grace: float = 3.0) -> list[int]:
    """SIGTERM pid, its process group and everything below it; SIGKILL what is left after grace seconds.

    The tree is listed before anything is signalled: once a parent dies its children are re-parented
    and could no longer be found. A stopped (^Z) process only acts on SIGTERM once continued.
    Returns what survived SIGKILL (nothing, unless a process is stuck in the kernel).
    """
    tree = [pid, *descendants(pid)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
            os.killpg(pid, signal.SIGCONT)
        for p in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
                os.kill(p, signal.SIGCONT)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(process_alive(p) for p in tree):
            reap_child(pid, 0)
            time.sleep(0.05)
        reap_child(pid)
        tree = [p for p in tree if process_alive(p)]
        if not tree:
            break
    return tree


# ---------------------------------------------------------------------------------------------
# the supervisor


class Supervisor:
    """One long-lived server process with its pidfile and log under dir.

    The pidfile holds the pid and the kernel's start time of that process, so a pid reused by another
    program (after a reboot or a crash) is never taken for ours and never signalled. `recognise`, when
    given, finds our server again by its command line if the pidfile was lost.
    """

    def __init__(
        self,
        dir: Path,
        name: str,
        recognise: Callable[[list[bytes]], bool] | None = None,
        max_log_bytes: int = MAX_LOG_BYTES,
    ):
        self.dir, self.name, self.recognise, self.max_log_bytes = dir, name, recognise, max_log_bytes
        self.pidfile, self.log = dir / f"{name}.pid", dir / f"{name}.log"

    def pid(self) -> int | None:
        """Our live server's pid, or None (a stale pidfile is removed)."""
        try:
            pid_text, started = self.pidfile.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            pid, started = None, None
        if pid is not None and start_time(pid) == started and process_alive(pid):
            return pid
        self.pidfile.unlink(missing_ok=True)
        if self.recognise is None:
            return None
        pid = next((int(p.name) for p in Path("/proc").glob("[0-9]*") if self._is_ours(int(p.name))), None)
        if pid is not None:
            self._write_pidfile(pid)
        return pid

    def _is_ours(self, pid: int) -> bool:
        line = cmdline(pid)
        return bool(line) and self.recognise(line) and process_alive(pid)

    def _write_pidfile(self, pid: int) -> None:
        write_text_atomic(self.pidfile, f"{pid} {start_time(pid)}\n")

    def spawn(
        self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen:
        """Start cmd in a session of its own (so a Ctrl-C in the terminal does not reach it, and stop()
        reaches all of it), appending to the log, which is rotated once past max_log_bytes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.log.is_file() and self.log.stat().st_size > self.max_log_bytes:
            os.replace(self.log, self.log.with_suffix(".log.1"))
        with self.log.open("ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                start_new_session=True,
            )  # fmt: skip
        self._write_pidfile(proc.pid)
        return proc

    def wait_healthy(
        self, healthy: Callable[[], bool], proc: subprocess.Popen | None, timeout: float
    ) -> bool:
        """Poll healthy() until it holds; False once proc exits or timeout passes."""
        deadline = time.monotonic() + timeout
        while not healthy():
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self, grace: float = 10) -> int | None:
        """TERM the server's tree, KILL it after grace seconds; returns the pid it stopped, or None."""
        pid = self.pid()
        if pid is None:
            return None
        if survivors := kill_tree(pid, grace):
            raise LmforgeError(
                f"{self.name} pid {pid} (its tree: {survivors}) survived SIGKILL; see {self.log}"
            )
        self.pidfile.unlink(missing_ok=True)
        return pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Two starts at once must not both spawn a server and lose each other's pid."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / f".{self.name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield


# ---------------------------------------------------------------------------------------------
# commands


class CommandError(LmforgeError):
    """A subprocess (dvc, torchrun) that exited non-zero; the message carries its last lines."""


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with this interpreter's bin dir first, so `python` in dvc.yaml is the venv's."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def stream_command(
    cmd: list[str], cwd: Path, on_line: LineSink = print, env: dict | None = None
) -> list[str]:
    """Run cmd in its own process group, forward each output line, raise CommandError on failure.

    One merged pipe, read line by line, so heavy stderr can neither deadlock nor be truncated. Its own
    process group lets an interrupt (Ctrl-C, a cancelled flow) take down the whole tree.
    """
    tail: list[str] = []
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env or venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1, start_new_session=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            on_line(line)
            tail = (tail + [line])[-30:]
        code = proc.wait()
    except BaseException:  # Ctrl-C, a cancelled flow run (Prefect's SIGTERM), a failing log sink
        kill_tree(proc.pid)
        proc.wait()
        raise
    if code != 0:
        raise CommandError(f"`{' '.join(cmd)}` exited with {code}:\n" + "\n".join(tail))
    return tail
