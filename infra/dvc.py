"""DVC: its real CLI (add, repro, status, push, pull), its S3 remote, and the files it records.

Every call streams the command's output line by line to a callback (the terminal, or Prefect's logger).
The run lock lives here too: one run per workspace, because DVC's own lock fails instead of waiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

from infra.errors import LmforgeError
from infra.processes import CommandError, LineSink, bin_path, stream_command, venv_env
from infra.s3 import S3Settings, StorageError, resolve_credentials_with_source


class RemoteSettings(S3Settings):
    dvc_remote_url: str  # s3://bucket/prefix


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


class WorkspaceBusy(LmforgeError):
    """Another run holds the workspace lock."""


def dvc(
    args: list[str], root: Path, on_line: LineSink = print, env: dict[str, str] | None = None
) -> list[str]:
    """`dvc ARGS` in root, each output line to on_line; its last lines, or CommandError."""
    return stream_command([bin_path("dvc"), *args], root, on_line, env=env)


def stale_stages(root: Path) -> set[str]:
    """The stages `dvc status` says would run now (an always_changed stage is always among them)."""
    out = subprocess.run(
        [bin_path("dvc"), "status", "--json"],
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


def configure_dvc_remote(root: Path, cfg: RemoteSettings, state: Path) -> None:
    """Point the `s3` remote at cfg in .dvc/config.local (git-ignored), never in the committed config.

    Only embedded credentials are written there; credentials from the environment or ~/.aws stay
    where they are (DVC reads them itself), and keys written earlier for the embedded server are
    removed so they cannot shadow them.
    """
    from dvc.config import Config, ConfigError

    if not (root / ".dvc").is_dir():
        raise StorageError(f"{root} is not a DVC repository (no .dvc/); run `dvc init` there first")
    creds, origin = resolve_credentials_with_source(cfg, state)
    try:
        config = Config(dvc_dir=root / ".dvc", validate=False)
        with config.edit("local") as local:
            local.setdefault("core", {})["remote"] = "s3"
            remote = local.setdefault("remote", {}).setdefault("s3", {})
            remote.pop("access_key_id", None)
            remote.pop("secret_access_key", None)
            remote["url"] = cfg.dvc_remote_url
            remote["region"] = cfg.region
            # Local config can only override keys, never unset the committed endpoint, so AWS gets
            # its regional endpoint spelled out.
            remote["endpointurl"] = cfg.endpoint_url or f"https://s3.{cfg.region}.amazonaws.com"
            if origin == "embedded":
                remote["access_key_id"] = creds.access_key
                remote["secret_access_key"] = creds.secret_key
    except ConfigError as exc:
        raise StorageError(f"{root}/.dvc/config.local: {exc}") from None
    os.chmod(root / ".dvc" / "config.local", 0o600)  # it may hold the secret


def pull_directory(md5: str, dest: Path, cfg: RemoteSettings, state: Path, on_line: LineSink = print) -> Path:
    """The directory DVC stored in the remote as md5 (a `.dir` hash from dvc.lock), checked out at dest.

    `dvc pull` does it, in a throwaway DVC repository that names only that out, so DVC checks every
    file's hash; dest appears whole or not at all. A fresh clone runs the same code."""
    import tempfile

    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    repo = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        dvc(["init", "--no-scm", "--quiet"], repo, on_line)
        configure_dvc_remote(repo, cfg, state)
        out = {"md5": md5, "path": "out", "hash": "md5"}
        (repo / "out.dvc").write_text(yaml.safe_dump({"outs": [out]}))
        dvc(["pull", "out.dvc"], repo, on_line)
        try:
            os.replace(repo / "out", dest)
        except OSError:
            if not dest.is_dir():  # another process (a parallel experiment) may have put its copy first
                raise
    except CommandError as exc:
        raise StorageError(f"could not pull {md5} from {cfg.dvc_remote_url}: {exc}") from None
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    return dest
