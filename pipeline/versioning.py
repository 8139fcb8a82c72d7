"""DVC, driven through its real CLI: add the corpus, reproduce stages, push and pull the remote.

Every call streams the command's output line by line to a callback (the terminal, or Prefect's logger),
through one merged pipe, so heavy stderr can neither deadlock nor be truncated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from pipeline.storage import process_alive

LineSink = Callable[[str], None]


class CommandError(RuntimeError):
    """A subprocess (dvc, torchrun) that exited non-zero; the message carries its last lines."""


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with this interpreter's bin dir first, so `python` in dvc.yaml is the venv's."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def stream_command(
    cmd: list[str], cwd: Path, on_line: LineSink = print, env: dict | None = None
) -> list[str]:
    """Run cmd in its own process group, forward each output line, raise CommandError on failure.

    Its own process group lets an interrupt (Ctrl-C, a cancelled flow) take down the whole tree.
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


def kill_tree(pid: int, grace: float = 3.0) -> None:
    """SIGTERM pid and everything below it, then SIGKILL whatever is left after grace seconds.

    The tree is listed before anything is signalled: once a parent dies its children are re-parented
    and could no longer be found.
    """
    tree = [pid, *descendants(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(process_alive(p) for p in tree):
            time.sleep(0.05)
        tree = [p for p in tree if process_alive(p)]
        if not tree:
            return


@contextlib.contextmanager
def workspace_lock(state: Path, on_wait: LineSink = print, wait: bool = True) -> Iterator[None]:
    """One run per workspace: a second one waits for the first (or fails at once with wait=False)."""
    import fcntl

    state.mkdir(parents=True, exist_ok=True)
    path = state / "run.lock"
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            if not wait:
                raise WorkspaceBusy(f"another lmforge run ({holder}) is using this workspace") from None
            on_wait(f"another lmforge run ({holder}) is using this workspace: waiting for it to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


class WorkspaceBusy(RuntimeError):
    """Another run holds the workspace lock."""


def dvc(args: list[str], root: Path, on_line: LineSink = print) -> list[str]:
    return stream_command([str(Path(sys.executable).parent / "dvc"), *args], root, on_line)


def stale_stages(root: Path) -> set[str]:
    """The stages `dvc status` says would run now (an always_changed stage is always among them)."""
    import json

    out = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "status", "--json"],
        cwd=root, env=venv_env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise CommandError(f"`dvc status` exited with {out.returncode}:\n{out.stderr[-2000:]}")
    return {name.split(":")[-1] for name in json.loads(out.stdout or "{}")}


def data_md5(root: Path) -> str | None:
    """The dataset version: the md5 that data.dvc records for data/ (None before the first ingest)."""
    path = root / "data.dvc"
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def remote_object_url(remote_url: str, md5: str) -> str:
    """Where DVC 3 stores an object in an S3 remote: <remote>/files/md5/<2 chars>/<rest>."""
    return f"{remote_url.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


def stage_out_md5(root: Path, stage: str, path: str) -> str:
    """The md5 that dvc.lock records for one of a stage's outs (a directory's ends in .dir)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    for out in lock["stages"][stage]["outs"]:
        if out["path"] == path:
            return out["md5"]
    raise KeyError(f"dvc.lock has no out {path} for stage {stage}")


# A run's record in git: the data's pointer, the lock and the small outputs. A new workspace made from
# the project starts without them, so its first run records its own.
RUN_RECORD = ("data.dvc", "dvc.lock", "artifacts/")


def copy_project(src: Path, dest: Path) -> None:
    """The project's files (git's view of src) into dest, without the record of src's last run."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=src, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for rel in files:
        if (src / rel).is_file() and not rel.startswith(RUN_RECORD):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
