"""DVC, driven through its real CLI: add the corpus, reproduce stages, push and pull the remote.

Every call streams the command's output line by line to a callback (the terminal, or Prefect's logger),
through one merged pipe, so heavy stderr can neither deadlock nor be truncated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

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
    except BaseException:
        kill_group(proc)
        raise
    if code != 0:
        raise CommandError(f"`{' '.join(cmd)}` exited with {code}:\n" + "\n".join(tail))
    return tail


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after grace seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def dvc(args: list[str], root: Path, on_line: LineSink = print) -> list[str]:
    return stream_command([str(Path(sys.executable).parent / "dvc"), *args], root, on_line)


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
