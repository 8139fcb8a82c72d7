"""The embedded SeaweedFS server, the S3 helpers and the DVC remote, against the real server (no mocks)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.dvc import configure_dvc_remote
from infra.embedded_s3 import PORT_OFFSETS, EmbeddedS3
from infra.processes import free_port_block, start_time
from infra.s3 import (
    StorageError,
    credential_source,
    download_prefix,
    ensure_embedded_credentials,
    get_json,
    parse_s3_uri,
    put_json,
    resolve_credentials,
    s3_client,
    upload_file,
)
from lmforge.config import StorageConfig

from .conftest import start_embedded_s3

DVC = Path(sys.executable).parent / "dvc"


def listening(pid: int) -> list[str]:
    """host:port of every TCP socket the process listens on."""
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split()[3] for line in lines if f"pid={pid}," in line]


def test_start_is_idempotent_and_status_reports(s3_server):
    pid = s3_server.server.pid()
    t0 = time.monotonic()
    assert "already running" in s3_server.server.start()
    assert time.monotonic() - t0 < 5 and s3_server.server.pid() == pid  # no restart, no wait for one
    put_json(s3_server.cfg, s3_server.state, "status/one.json", {"n": 1})
    status = s3_server.server.status()
    assert status["running"] and status["pid"] == pid and status["endpoint"] == s3_server.cfg.endpoint_url
    assert status["bucket_ok"] is True and status["objects"] >= 1
    buckets = [b["Name"] for b in s3_client(s3_server.cfg, s3_server.state).list_buckets()["Buckets"]]
    assert s3_server.cfg.bucket in buckets


def test_server_listens_on_its_ten_ports_on_loopback_only(s3_server):
    ours = listening(s3_server.server.pid())
    assert all(addr.startswith("127.0.0.1:") for addr in ours), ours
    assert {int(addr.rsplit(":", 1)[1]) for addr in ours} == set(s3_server.server.ports.values())


def test_credentials_are_per_install_and_private(s3_server, tmp_path):
    assert ensure_embedded_credentials(s3_server.state) == s3_server.creds
    assert resolve_credentials(s3_server.cfg, s3_server.state) == s3_server.creds
    assert credential_source(s3_server.cfg, s3_server.state) == "embedded"
    assert ensure_embedded_credentials(tmp_path) != s3_server.creds  # another install gets other keys
    s3_dir = s3_server.state / "s3"
    assert (s3_dir / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert (s3_dir / "s3.json").stat().st_mode & 0o777 == 0o600
    assert s3_dir.stat().st_mode & 0o777 == 0o700
    assert s3_server.creds.secret_key not in repr(s3_server.creds)
    # not embedded and no env: boto3's own chain (~/.aws) decides
    aws = StorageConfig(endpoint_url=None, embedded=False)
    assert resolve_credentials(aws, s3_server.state) is None


def test_wrong_credentials_are_refused(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "WRONGKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    assert credential_source(s3_server.cfg, s3_server.state) == "environment"
    with pytest.raises(StorageError, match=r"refused the credentials \(InvalidAccessKeyId\)"):
        get_json(s3_server.cfg, s3_server.state, "anything.json")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.creds.access_key)  # right key, wrong secret
    with pytest.raises(StorageError, match=r"refused the credentials \(SignatureDoesNotMatch\)"):
        download_prefix(
            f"s3://{s3_server.cfg.bucket}/x", Path("/nonexistent"), s3_server.cfg, s3_server.state
        )
    # the server keeps answering with its own keys, whatever the environment holds
    assert "already running" in s3_server.server.start()


def test_json_and_prefix_round_trip(s3_server, tmp_path):
    cfg, state = s3_server.cfg, s3_server.state
    put_json(cfg, state, "t/record.json", {"a": 1, "b": [1, 2]})
    assert get_json(cfg, state, "t/record.json") == {"a": 1, "b": [1, 2]}
    assert get_json(cfg, state, "t/missing.json") is None
    payload = os.urandom(300_000)
    (tmp_path / "a.bin").write_bytes(payload)
    assert (
        upload_file(cfg, state, "corpus/v1/a.bin", tmp_path / "a.bin") == f"s3://{cfg.bucket}/corpus/v1/a.bin"
    )
    client = s3_client(cfg, state)
    client.put_object(Bucket=cfg.bucket, Key="corpus/v1/sub/b.txt", Body=b"hello")
    client.put_object(Bucket=cfg.bucket, Key="corpus/v10/not-this.txt", Body=b"sibling")
    out = tmp_path / "out"
    files = download_prefix(f"s3://{cfg.bucket}/corpus/v1", out, cfg, state)
    assert sorted(p.relative_to(out).as_posix() for p in files) == ["a.bin", "sub/b.txt"]
    assert (out / "a.bin").read_bytes() == payload and (out / "sub" / "b.txt").read_bytes() == b"hello"
    one = download_prefix(f"s3://{cfg.bucket}/corpus/v1/sub/b.txt", tmp_path / "one", cfg, state)
    assert [p.read_bytes() for p in one] == [b"hello"]

    with pytest.raises(StorageError, match="no objects under that prefix"):
        download_prefix(f"s3://{cfg.bucket}/nothing/here", tmp_path / "x", cfg, state)
    with pytest.raises(StorageError, match="no such bucket no-such-bucket-x"):
        download_prefix("s3://no-such-bucket-x/p", tmp_path / "y", cfg, state)
    for bad in ("http://bucket/x", "s3:///x", "bucket/x"):
        with pytest.raises(ValueError, match="not an s3://bucket/prefix"):
            parse_s3_uri(bad)
    assert parse_s3_uri("s3://b/some/prefix/") == ("b", "some/prefix/")


def test_lifecycle_stop_start_keeps_data_and_handles_stale_pidfiles(tmp_path, monkeypatch):
    # Keys in the environment must neither break the health check nor become a server identity.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    server = start_embedded_s3(tmp_path, bucket="life")
    cfg = server.cfg
    try:
        with pytest.raises(StorageError, match="InvalidAccessKeyId"):
            get_json(cfg, tmp_path, "k.json")
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        put_json(cfg, tmp_path, "k.json", {"v": 1})
        pid = server.pid()

        t0 = time.monotonic()
        assert "stopped" in server.stop()
        assert time.monotonic() - t0 < 8
        assert not Path(f"/proc/{pid}").exists()  # gone and reaped, no zombie
        assert not server.pidfile.exists() and server.stop() == "S3 not running"
        assert server.status()["running"] is False
        for port in server.ports.values():  # weed's unix sockets in /tmp are cleaned up too
            assert not list(Path("/tmp").glob(f"seaweedfs-*-{port}.sock"))
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=r"http://127.0.0.1:\d+ is not reachable.*lmforge up"):
            get_json(cfg, tmp_path, "k.json")
        assert time.monotonic() - t0 < 10

        # stale pidfiles: a dead pid, a live pid reused by another program (its start time differs), and
        # a pid alone; none is signalled
        dead = subprocess.Popen(["true"])
        dead.wait()
        for stale in (f"{dead.pid} {start_time(os.getpid())}", f"{os.getpid()} 1", str(os.getpid())):
            server.pidfile.write_text(stale)
            assert server.pid() is None and not server.pidfile.exists()
            server.pidfile.write_text(stale)
            assert server.stop() == "S3 not running"

        server.pidfile.write_text(f"{os.getpid()} 1")
        assert "started" in server.start()
        pid = server.pid()
        assert pid != os.getpid()
        assert get_json(cfg, tmp_path, "k.json") == {"v": 1}  # data survived the restart

        server.pidfile.unlink()  # a lost pidfile: the server is found again by its data dir
        assert server.pid() == pid and server.pidfile.read_text().split() == [str(pid), start_time(pid)]

        # storage.endpoint_url moved: start() restarts the same data on the new port
        moved = EmbeddedS3(
            cfg.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port_block(len(PORT_OFFSETS))}"}), tmp_path
        )
        assert "started" in moved.start()
        assert not Path(f"/proc/{pid}").exists() and moved.pid() not in (None, pid)
        assert get_json(moved.cfg, tmp_path, "k.json") == {"v": 1}
    finally:
        server.stop()
    assert server.pid() is None and not weed_processes(server.data)


def weed_processes(data_dir: Path) -> list[int]:
    """Pids of live weed processes serving data_dir."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"-dir={data_dir}".encode() in proc.joinpath("cmdline").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_server_ports_are_picked_outside_the_ephemeral_range():
    """A client socket takes its local port from the ephemeral range at any moment, so a server port
    picked there can be gone by the time the server binds it: weed mini's admin port once was, after
    weed's own check of its ports, and weed exited 2 minutes later with S3 in use."""
    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if not range_file.is_file():
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range on this system")
    low, high = map(int, range_file.read_text().split())  # read here, not through the code under test
    for _ in range(100):
        base = free_port_block(len(PORT_OFFSETS))
        assert not any(low <= base + i <= high for i in range(len(PORT_OFFSETS))), (base, low, high)


def test_failed_start_leaves_nothing_and_a_frozen_server_still_stops(tmp_path):
    server = EmbeddedS3(StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port_block(len(PORT_OFFSETS))}"), tmp_path)
    try:
        # weed reads data/mini.options at startup: an invalid value there makes it exit at once
        server.data.mkdir(parents=True)
        (server.data / "mini.options").write_text("master.volumeSizeLimitMB=999999999\n")
        with pytest.raises(
            StorageError, match=r"did not come up \(it exited with code \d+\); from .*weed.log"
        ) as err:
            server.start()
        assert "volumeSizeLimitMB should not exceed" in str(err.value)  # the fatal line, not a stack trace
        assert "goroutine" not in str(err.value)
        assert not weed_processes(server.data) and not server.pidfile.exists()

        (server.data / "mini.options").unlink()
        assert "started" in server.start()
        pid = server.pid()
        os.kill(pid, signal.SIGSTOP)  # wedged: accepts connections, never answers
        t0 = time.monotonic()
        status = server.status()
        assert status["running"] is False and status["pid"] == pid
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        assert "stopped" in server.stop()  # SIGTERM reaches it: stop() also sends SIGCONT
        assert time.monotonic() - t0 < 8
    finally:
        server.stop()
    assert not weed_processes(server.data) and server.pid() is None


def test_busy_port_is_named(tmp_path):
    base = free_port_block(len(PORT_OFFSETS))
    server = EmbeddedS3(StorageConfig(endpoint_url=f"http://127.0.0.1:{base}"), tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", server.ports["filer"]))
        squatter.listen()
        with pytest.raises(
            StorageError, match=rf"filer port {base + 6} already in use.*storage.endpoint_url"
        ):
            server.start()
    assert server.pid() is None and not server.pidfile.exists()


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:8333", "http://0.0.0.0:8333", "https://127.0.0.1:8333", "http://127.0.0.1"]
)
def test_embedded_endpoint_must_be_loopback_http_with_port(tmp_path, url):
    with pytest.raises(StorageError, match=r"only runs on http://127.0.0.1:PORT"):
        EmbeddedS3(StorageConfig(endpoint_url=url), tmp_path)


@pytest.mark.slow
def test_dvc_remote_push_and_pull_for_real(s3_server, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True)
    committed = (repo / ".dvc" / "config").read_text()

    def no_process(*args, **kwargs):
        raise AssertionError(f"configure_dvc_remote started a process: {args[:1]}")

    with monkeypatch.context() as patched:  # DVC's config API in this process, never the dvc CLI
        patched.setattr(subprocess.Popen, "__init__", no_process)
        configure_dvc_remote(repo, s3_server.cfg, s3_server.state)
    assert (repo / ".dvc" / "config").read_text() == committed  # the committed file is untouched
    assert (repo / ".dvc" / "config.local").stat().st_mode & 0o777 == 0o600

    def run(*args: str) -> str:
        return subprocess.run([DVC, *args], cwd=repo, check=True, capture_output=True, text=True).stdout

    assert run("remote", "list", "--local").split() == ["s3", s3_server.cfg.dvc_remote_url, "(default)"]
    shown = run("config", "-l", "--local")
    assert "core.remote=s3" in shown
    assert f"remote.s3.endpointurl={s3_server.cfg.endpoint_url}" in shown
    assert f"remote.s3.access_key_id={s3_server.creds.access_key}" in shown
    ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local"], cwd=repo, capture_output=True)
    assert ignored.returncode == 0

    payload = os.urandom(100_000)
    (repo / "blob.bin").write_bytes(payload)
    run("add", "blob.bin")
    run("push")
    (repo / "blob.bin").unlink()
    subprocess.run(["rm", "-rf", str(repo / ".dvc" / "cache")], check=True)
    run("pull")
    assert (repo / "blob.bin").read_bytes() == payload
    for path in (repo / ".dvc" / "config", repo / "blob.bin.dvc"):
        text = path.read_text()
        assert s3_server.creds.secret_key not in text and s3_server.creds.access_key not in text


def test_dvc_remote_for_aws_keeps_credentials_out(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    embedded = StorageConfig(endpoint_url="http://127.0.0.1:8333")
    creds = ensure_embedded_credentials(tmp_path)
    configure_dvc_remote(repo, embedded, tmp_path)
    assert creds.secret_key in (repo / ".dvc" / "config.local").read_text()

    # switching to AWS with keys in the environment: nothing secret written, the old keys removed
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA_FROM_ENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env")
    aws = StorageConfig(endpoint_url=None, embedded=False, bucket="team-bucket", region="eu-west-1")
    configure_dvc_remote(repo, aws, tmp_path)
    local = (repo / ".dvc" / "config.local").read_text()
    assert "s3://team-bucket/dvc" in local and "https://s3.eu-west-1.amazonaws.com" in local
    for secret in ("from-env", "AKIA_FROM_ENV", creds.access_key, creds.secret_key):
        assert secret not in local

    with pytest.raises(StorageError, match="not a DVC repository"):
        configure_dvc_remote(tmp_path / "nowhere", aws, tmp_path)
