"""Secrets and exposure: no credentials in the repository, per-install keys in ignored files, and every
server lmforge starts listening on 127.0.0.1 unless told otherwise (with a warning)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.params_file import write_overrides

from .conftest import listening_in_tree
from .test_train import _launch

REPO = Path(__file__).resolve().parents[1]

# What a leaked credential looks like. The patterns are assembled from pieces, so this file does not
# match itself.
KEY = "KEY"
SECRET_PATTERNS = {
    "aws_access_key_id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "aws_secret_access_key": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}\b"),
    "private_key": re.compile(rf"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP |ENCRYPTED )?PRIVATE {KEY}-----"),
    "github_token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "slack_token": re.compile(r"\bxox[baprs]-[0-9A-Za-z-]{10,}"),
    "password_assignment": re.compile(r"(?i)\b(?:password|passwd)\s*[=:]\s*['\"][^'\"\s{}$]{6,}['\"]"),
}


def leaks(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / rel for rel in out.decode().split("\0") if rel and (REPO / rel).is_file()]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout: no tracked files to scan")
def test_no_credentials_in_tracked_files():
    files = tracked_files()
    assert len(files) > 30  # the scan really saw the repository
    found = {
        str(path.relative_to(REPO)): names
        for path in files
        if (names := leaks(path.read_bytes().decode("utf-8", errors="replace")))
    }
    assert found == {}


@pytest.mark.parametrize(
    "text",
    [
        "key = " + "AKIA" + "Z7QWERTYUIOPASDF",
        "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY",
        "-----BEGIN OPENSSH PRIVATE " + "KEY-----\nb3Blbn",
        "token: " + "ghp_" + "x" * 36,
        "SLACK=" + "xoxb-" + "1234567890-abcdef",
        "password = " + "'hunter2hunter2'",
    ],
)
def test_the_scanner_finds_each_kind_of_secret(text):
    assert leaks(text), text  # the repository scan above can fail


def test_per_install_keys_and_local_config_are_git_ignored():
    """The embedded S3 keys live in the state dir and DVC's config.local: both ignored by git."""
    ignored = [".lmforge/s3/credentials.json", ".dvc/config.local", ".env", "artifacts/model/x"]
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *ignored], cwd=REPO, capture_output=True, text=True
    )
    assert sorted(result.stdout.split()) == sorted(ignored)


@pytest.mark.slow
def test_training_listens_on_loopback_only(tiny_workspace):
    """torchrun's rendezvous stores and gloo's sockets: none of them reachable from the network."""
    ws, _ = tiny_workspace
    write_overrides(ws.root, ["train.nproc_per_node=2", "train.max_steps=200", "train.eval_every=100"])
    proc = _launch(ws, start_new_session=True)
    seen: set[str] = set()
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            seen |= listening_in_tree(proc.pid)
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert len(seen) >= 2, seen  # the agent's stores, at least, were seen
    assert all(addr.startswith("127.0.0.1:") for addr in seen), seen


def test_exposure_is_explicit_and_warned(tmp_path):
    """Binding elsewhere takes an explicit flag and an API key (or an explicit, warned opt-out); the
    embedded S3 refuses outright."""
    from infra.embedded_s3 import EmbeddedS3
    from infra.s3 import StorageError
    from lmforge.config import StorageConfig

    with pytest.raises(StorageError, match="only runs on http://127.0.0.1"):
        EmbeddedS3(StorageConfig(endpoint_url="http://0.0.0.0:18333"), tmp_path)

    def serve(**env):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_A")}
        return subprocess.run(
            [Path(sys.executable).parent / "lmforge", "serve", "no-such-bento:x", "--host", "0.0.0.0"],
            cwd=tmp_path, env=dict(clean, LMFORGE_ROOT=str(REPO), **env), capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip

    refused = serve()
    assert refused.returncode == 1
    assert "refusing to serve on 0.0.0.0, which other machines can reach, without an API key" in refused.stderr
    assert "no Bento no-such-bento:x" not in refused.stderr  # refused before the Bento was looked up
    # the opt-out is explicit and warned; a key is enough. Then the unknown Bento is refused before
    # anything binds: nothing was exposed here (a real Bento on 0.0.0.0, with a key and without, is
    # test_serving's test_a_server_on_0_0_0_0_serves_with_a_key_and_refuses_to_start_without)
    opted_out = serve(LMFORGE_ALLOW_UNAUTHENTICATED="1")
    assert "warning: serving on 0.0.0.0 without API keys" in opted_out.stderr
    keyed = serve(LMFORGE_API_KEYS="k-1")
    assert "serving on 0.0.0.0: reachable from other machines, with 1 API key(s)" in keyed.stderr
    for result in (opted_out, keyed):
        assert result.returncode == 1, result.stderr
        assert "error: no Bento no-such-bento:x in the local store" in result.stderr
