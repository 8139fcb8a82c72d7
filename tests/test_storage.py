"""The embedded SeaweedFS server, the S3 helpers and the DVC remote, against the real server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import StorageConfig
from pipeline.storage import (
    EmbeddedS3,
    StorageError,
    configure_dvc_remote,
    download_prefix,
    ensure_embedded_credentials,
    get_json,
    parse_s3_uri,
    put_json,
    resolve_credentials,
    s3_client,
)

from .conftest import free_port_block

DVC = Path(sys.executable).parent / "dvc"


def test_start_is_idempotent_and_status_reports(s3_server):
    assert "already running" in s3_server.server.start()
    status = s3_server.server.status()
    assert status["running"] and status["pid"] and status["endpoint"] == s3_server.cfg.endpoint_url
    buckets = [b["Name"] for b in s3_client(s3_server.cfg, s3_server.state).list_buckets()["Buckets"]]
    assert s3_server.cfg.bucket in buckets


def test_server_listens_on_loopback_only(s3_server):
    pid = s3_server.server.pid()
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ours = [line.split()[3] for line in listening if f"pid={pid}," in line]
    assert len(ours) >= 8
    assert all(addr.startswith("127.0.0.1:") for addr in ours), ours
    ports = {int(addr.rsplit(":", 1)[1]) for addr in ours}
    assert ports <= set(s3_server.server.ports.values())


def test_credentials_are_per_install_and_private(s3_server, tmp_path):
    creds = ensure_embedded_credentials(s3_server.state)
    assert ensure_embedded_credentials(s3_server.state) == creds
    assert ensure_embedded_credentials(tmp_path) != creds  # another install gets other keys
    mode = (s3_server.state / "s3" / "credentials.json").stat().st_mode & 0o777
    assert mode == 0o600


def test_wrong_credentials_are_refused(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "WRONGKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    assert resolve_credentials(s3_server.cfg, s3_server.state)[1] == "environment"
    with pytest.raises(StorageError, match="refused the credentials"):
        get_json(s3_server.cfg, s3_server.state, "anything.json")


def test_json_and_prefix_round_trip(s3_server, tmp_path):
    put_json(s3_server.cfg, s3_server.state, "t/record.json", {"a": 1, "b": [1, 2]})
    assert get_json(s3_server.cfg, s3_server.state, "t/record.json") == {"a": 1, "b": [1, 2]}
    assert get_json(s3_server.cfg, s3_server.state, "t/missing.json") is None
    client = s3_client(s3_server.cfg, s3_server.state)
    payload = os.urandom(300_000)
    client.put_object(Bucket=s3_server.cfg.bucket, Key="corpus/v1/a.bin", Body=payload)
    client.put_object(Bucket=s3_server.cfg.bucket, Key="corpus/v1/sub/b.txt", Body=b"hello")
    files = download_prefix(
        f"s3://{s3_server.cfg.bucket}/corpus/v1", tmp_path / "out", s3_server.cfg, s3_server.state
    )
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == ["a.bin", "sub/b.txt"]
    assert (tmp_path / "out" / "a.bin").read_bytes() == payload
    with pytest.raises(StorageError, match="no objects under that prefix"):
        download_prefix(
            f"s3://{s3_server.cfg.bucket}/nothing/here", tmp_path / "x", s3_server.cfg, s3_server.state
        )
    with pytest.raises(StorageError, match="no such bucket"):
        download_prefix("s3://no-such-bucket-x/p", tmp_path / "y", s3_server.cfg, s3_server.state)
    with pytest.raises(ValueError, match="not an s3://bucket/prefix"):
        parse_s3_uri("http://bucket/x")


def test_lifecycle_stop_start_keeps_data_and_handles_faults(tmp_path):
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port_block()}", bucket="life")
    server = EmbeddedS3(cfg, tmp_path)
    try:
        assert "started" in server.start()
        put_json(cfg, tmp_path, "k.json", {"v": 1})
        assert "stopped" in server.stop()
        assert server.stop() == "S3 not running"
        assert not server.status()["running"]
        with pytest.raises(StorageError, match="not reachable.*lmforge up"):
            get_json(cfg, tmp_path, "k.json")
        # a stale pidfile pointing at some other live process is ignored, not killed
        server.pidfile.write_text(str(os.getpid()))
        assert server.pid() is None and not server.pidfile.exists()
        assert "started" in server.start()
        assert get_json(cfg, tmp_path, "k.json") == {"v": 1}
        # a second server on the same ports fails clearly
        other = EmbeddedS3(cfg, tmp_path / "other")
        with pytest.raises(StorageError, match=r"port\(s\) in use: s3 \d+"):
            other.start()
    finally:
        server.stop()
    assert server.pid() is None


def test_embedded_endpoint_must_be_loopback(tmp_path):
    with pytest.raises(StorageError, match="runs on http://127.0.0.1:PORT"):
        EmbeddedS3(StorageConfig(endpoint_url="http://10.0.0.5:8333"), tmp_path)


def test_dvc_remote_push_and_pull_for_real(s3_server, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True)
    configure_dvc_remote(repo, s3_server.cfg, s3_server.state)
    local = (repo / ".dvc" / "config.local").read_text()
    assert s3_server.cfg.endpoint_url in local and "access_key_id" in local
    assert "secret" not in (repo / ".dvc" / "config").read_text()
    payload = os.urandom(100_000)
    (repo / "blob.bin").write_bytes(payload)
    run = lambda *a: subprocess.run([DVC, *a], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    run("add", "blob.bin")
    run("push")
    (repo / "blob.bin").unlink()
    subprocess.run(["rm", "-rf", str(repo / ".dvc" / "cache")], check=True)
    run("pull")
    assert (repo / "blob.bin").read_bytes() == payload


def test_dvc_remote_for_aws_keeps_credentials_out(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA_FROM_ENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env")
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    cfg = StorageConfig(endpoint_url=None, embedded=False, bucket="team-bucket", region="eu-west-1")
    configure_dvc_remote(repo, cfg, tmp_path)
    local = (repo / ".dvc" / "config.local").read_text()
    assert "s3://team-bucket/dvc" in local and "https://s3.eu-west-1.amazonaws.com" in local
    assert "from-env" not in local and "AKIA_FROM_ENV" not in local
    assert json.dumps(local)  # plain text config
