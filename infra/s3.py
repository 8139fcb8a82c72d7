"""S3: the client, credentials, errors that say what to do, and small object helpers.

Nothing here assumes the embedded server: with `storage.embedded: false` the same code talks to AWS
or any S3 endpoint, with credentials from the environment. boto3 is imported inside the functions
that use it, so that `lmforge --help` stays fast.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from infra.errors import LmforgeError

PROBE_KEY = ".lmforge-probe"  # the embedded server's write check; never part of a download


class S3Settings(Protocol):
    """What this module needs to know of the storage params (lmforge.config.StorageConfig)."""

    bucket: str
    endpoint_url: str | None
    region: str
    embedded: bool


class StorageError(LmforgeError):
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


def resolve_credentials_with_source(cfg: S3Settings, state: Path) -> tuple[Credentials | None, str]:
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        env = os.environ
        creds = Credentials(
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN")
        )
        return creds, "environment"
    if cfg.embedded and credentials_file(state).is_file():
        return ensure_embedded_credentials(state), "embedded"
    return None, "default chain"


def resolve_credentials(cfg: S3Settings, state: Path) -> Credentials | None:
    """AWS_* variables win; then the embedded server's keys; None leaves it to boto3's chain (~/.aws)."""
    return resolve_credentials_with_source(cfg, state)[0]


def credential_source(cfg: S3Settings, state: Path) -> str:
    """'environment', 'embedded' or 'default chain': where resolve_credentials gets its keys."""
    return resolve_credentials_with_source(cfg, state)[1]


def s3_client(
    cfg: S3Settings,
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


def arrow_filesystem(cfg: S3Settings, state: Path, creds: Credentials | None = None):
    """The same endpoint and credentials as a pyarrow S3FileSystem: what Ray's read tasks open files with
    (it pickles, so each task gets it, and no task needs this workspace's state directory)."""
    from urllib.parse import urlparse

    from pyarrow.fs import S3FileSystem

    creds = creds or resolve_credentials(cfg, state)
    keys = {}
    if creds:
        keys = {
            "access_key": creds.access_key,
            "secret_key": creds.secret_key,
            "session_token": creds.session_token,
        }
    endpoint = {}
    if cfg.endpoint_url:
        url = urlparse(cfg.endpoint_url)
        endpoint = {
            "endpoint_override": url.netloc,
            "scheme": url.scheme or "http",
            "force_virtual_addressing": False,
        }
    return S3FileSystem(region=cfg.region, connect_timeout=3, request_timeout=60, **endpoint, **keys)


def error_code(exc: Exception) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


def describe_error(exc: Exception, cfg: S3Settings, what: str) -> StorageError:
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
        code = error_code(exc)
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


def botocore_errors() -> tuple[type[Exception], ...]:
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


def ensure_bucket(cfg: S3Settings, state: Path, creds: Credentials | None = None) -> bool:
    """Create the bucket if it is missing (DVC will not); True when it was created."""
    client = s3_client(cfg, state, creds)
    try:
        client.head_bucket(Bucket=cfg.bucket)
        return False
    except botocore_errors() as exc:
        if error_code(exc) not in ("404", "NoSuchBucket"):
            raise describe_error(exc, cfg, f"bucket {cfg.bucket}") from None
    try:
        client.create_bucket(Bucket=cfg.bucket)
    except botocore_errors() as exc:
        if error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False  # created concurrently
        raise describe_error(exc, cfg, f"create bucket {cfg.bucket}") from None
    return True


def check_storage(cfg: S3Settings, state: Path) -> None:
    """Fail fast, with the reason, when the endpoint is down, the keys are wrong or the bucket is missing.

    One attempt with short timeouts: this runs before anything is ingested, so a dead server costs
    seconds and leaves data/ untouched. The embedded server's bucket is created when missing.
    """
    client = s3_client(cfg, state, attempts=1, read_timeout=10)
    try:
        client.head_bucket(Bucket=cfg.bucket)
        return
    except botocore_errors() as exc:
        if error_code(exc) not in ("404", "NoSuchBucket"):
            raise describe_error(exc, cfg, f"bucket {cfg.bucket}") from None
    if not cfg.embedded:
        endpoint = cfg.endpoint_url or f"AWS S3 ({cfg.region})"
        raise StorageError(
            f"bucket {cfg.bucket}: no such bucket at {endpoint}; create it, or set storage.bucket"
        )
    ensure_bucket(cfg, state)


def download_prefix(uri: str, dest: Path, cfg: S3Settings, state: Path) -> list[Path]:
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
    except botocore_errors() as exc:
        raise describe_error(exc, cfg, f"download {uri}") from None
    if not written:
        raise StorageError(f"download {uri}: no objects under that prefix at {cfg.endpoint_url or 'AWS S3'}")
    return written


def list_keys(cfg: S3Settings, state: Path, prefix: str) -> list[str]:
    """Every key under prefix in the configured bucket, sorted."""
    keys: list[str] = []
    try:
        pages = (
            s3_client(cfg, state).get_paginator("list_objects_v2").paginate(Bucket=cfg.bucket, Prefix=prefix)
        )
        for page in pages:
            keys += [obj["Key"] for obj in page.get("Contents", [])]
    except botocore_errors() as exc:
        raise describe_error(exc, cfg, f"list s3://{cfg.bucket}/{prefix}") from None
    return sorted(keys)


def upload_file(cfg: S3Settings, state: Path, key: str, path: Path) -> str:
    """Upload a local file to s3://<bucket>/<key>; returns that URI."""
    try:
        s3_client(cfg, state).upload_file(str(path), cfg.bucket, key)
    except botocore_errors() as exc:
        raise describe_error(exc, cfg, f"upload {path} to s3://{cfg.bucket}/{key}") from None
    return f"s3://{cfg.bucket}/{key}"


def put_json(
    cfg: S3Settings,
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
    except botocore_errors() as exc:
        if error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            raise ConflictError(
                f"write s3://{cfg.bucket}/{key}: it changed since it was read (another writer won)"
            ) from None
        raise describe_error(exc, cfg, f"write s3://{cfg.bucket}/{key}") from None
    return response["ETag"]


def get_json_versioned(cfg: S3Settings, state: Path, key: str) -> tuple[dict | None, str | None]:
    """(the JSON object at key, its ETag), or (None, None) when there is none; a missing bucket is an error."""
    try:
        response = s3_client(cfg, state).get_object(Bucket=cfg.bucket, Key=key)
        body = response["Body"].read()
    except botocore_errors() as exc:
        if error_code(exc) == "NoSuchKey":
            return None, None
        raise describe_error(exc, cfg, f"read s3://{cfg.bucket}/{key}") from None
    try:
        return json.loads(body), response["ETag"]
    except ValueError:
        raise StorageError(f"s3://{cfg.bucket}/{key} is not valid JSON") from None


def get_json(cfg: S3Settings, state: Path, key: str) -> dict | None:
    """The JSON object at key, or None when there is none (a missing bucket is still an error)."""
    return get_json_versioned(cfg, state, key)[0]
