"""The S3 backend of the artifact store (any S3-compatible bucket), its client, and which S3 faults are transient."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
)

from infra.artifacts.base import (
    _CHUNK,
    _MIB,
    TMP_DIR,
    ArtifactRef,
    StoreCheckError,
    StoreWriteError,
    _check_same,
    _hash_chunks,
    _Store,
    redact_uri_text,
    safe_key,
)
from infra.settings import ENV_PREFIX, Settings, redact_uri

log = logging.getLogger(__name__)


class S3Store(_Store):
    """Artifacts in an S3-compatible bucket under `prefix`; URIs are `s3://bucket/prefix/KEY`."""

    def __init__(self, bucket: str, prefix: str, client: BaseClient, transfer: TransferConfig):
        self.bucket, self.client, self._transfer = bucket, client, transfer
        self._prefix = safe_key(prefix) + "/" if prefix else ""
        self.root = f"s3://{bucket}/{self._prefix}".rstrip("/")

    def check(self) -> None:
        """One HEAD on the bucket; raise StoreCheckError naming endpoint, bucket and the fix."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StoreCheckError(self._check_message(exc)) from exc

    def _check_message(self, exc: Exception) -> str:
        where = f"bucket {self.bucket!r} at {self.client.meta.endpoint_url}"
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return (
                f"S3 endpoint {self.client.meta.endpoint_url} is unreachable ({exc}); start it "
                f"(infra/docker-compose.yml) or set {ENV_PREFIX}S3_ENDPOINT_URL"
            )
        if isinstance(exc, NoCredentialsError):
            return (
                f"no S3 credentials for {where}; set {ENV_PREFIX}AWS_ACCESS_KEY_ID and "
                f"{ENV_PREFIX}AWS_SECRET_ACCESS_KEY"
            )
        if _error_code(exc) in {"404", "NoSuchBucket", "NotFound"}:
            return (
                f"{where} does not exist; create it (e.g. `mc mb`) or set "
                f"{ENV_PREFIX}ARTIFACT_ROOT=s3://BUCKET/PREFIX to an existing one"
            )
        if _error_code(exc) in {"403", "AccessDenied", "Forbidden"}:
            return (
                f"access denied to {where}; check {ENV_PREFIX}AWS_ACCESS_KEY_ID and "
                f"{ENV_PREFIX}AWS_SECRET_ACCESS_KEY"
            )
        return f"cannot use {where}: {exc}"

    def _object(self, key: str) -> str:
        return self._prefix + key

    def _put_stream(self, fh: BinaryIO, key: str) -> ArtifactRef:
        sha, size = _hash_chunks(iter(lambda: fh.read(_CHUNK), b""))
        fh.seek(0)
        ref = ArtifactRef(uri=self.uri(key), sha256=sha, size=size)
        if size < self._transfer.multipart_threshold:
            with self._writing(key):
                self._put_once(fh.read(), key, ref)
            return ref
        tmp = f"{self._prefix}{TMP_DIR}/{uuid.uuid4().hex}"
        try:
            with self._writing(key):
                if self._exists(key):  # write-once (checked, not atomic: per-call keys keep writers apart)
                    _check_same(ref.uri, sha, self._digest(key))
                    return ref
                self.client.upload_fileobj(fh, self.bucket, tmp, Config=self._transfer)
                self._publish(tmp, self._object(key), size)
        finally:
            self._discard(tmp)
        return ref

    def _put_once(self, data: bytes, key: str, ref: ArtifactRef) -> None:
        """One conditional PUT (`If-None-Match: *`): atomic and write-once, so of two writers of a key the second
        finds the first's bytes. A store that does not implement the condition gets a checked plain PUT."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if _error_code(exc) in {"PreconditionFailed", "412"}:
                _check_same(ref.uri, ref.sha256, self._digest(key))
            elif _error_code(exc) in {"NotImplemented", "501"}:
                if self._exists(key):
                    _check_same(ref.uri, ref.sha256, self._digest(key))
                else:
                    self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data)
            else:
                raise

    def _publish(self, tmp: str, final: str, size: int) -> None:
        """Check the temp object is complete, then copy it (server-side) to its final key."""
        stored = self.client.head_object(Bucket=self.bucket, Key=tmp)["ContentLength"]
        if stored != size:
            raise OSError(f"upload of s3://{self.bucket}/{final} is {stored} bytes, not {size}")
        source = {"Bucket": self.bucket, "Key": tmp}
        self.client.copy(source, self.bucket, final, Config=self._transfer)

    @contextmanager
    def _writing(self, key: str) -> Iterator[None]:
        """Turn a write that failed for good into a StoreWriteError naming the object, the endpoint and the fix."""
        try:
            yield
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            endpoint = redact_uri(self.client.meta.endpoint_url)
            attempts = self.client.meta.config.retries.get("total_max_attempts", "?")
            raise StoreWriteError(
                f"cannot write {self.uri(key)} at {endpoint} ({attempts} attempts): {_short(exc)}; check that the "
                f"endpoint is up and {ENV_PREFIX}S3_ENDPOINT_URL / {ENV_PREFIX}AWS_* are right, then run again "
                "(finished stages are cached)"
            ) from exc

    def _discard(self, tmp: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=tmp)
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not delete temp object s3://%s/%s: %s", self.bucket, tmp, exc)

    def _fetch(self, key: str, dest: Path) -> None:
        with self._not_found(key):
            obj = self._object(key)
            self.client.download_file(self.bucket, obj, str(dest), Config=self._transfer)

    def _read(self, key: str) -> bytes:
        with self._not_found(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()

    def _digest(self, key: str) -> str:
        with self._not_found(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"]
            return _hash_chunks(body.iter_chunks(_CHUNK))[0]

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if _error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise
        return True

    @contextmanager
    def _not_found(self, key: str) -> Iterator[None]:
        """Turn S3's 404 into FileNotFoundError naming the URI."""
        try:
            yield
        except ClientError as exc:
            if _error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
                raise FileNotFoundError(f"no artifact at {self.uri(key)}") from exc
            raise


def _short(exc: BaseException) -> str:
    """The first line of an S3 error, URI passwords masked."""
    return redact_uri_text(f"{type(exc).__name__}: {exc}".splitlines()[0])


def _error_code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def s3_client(settings: Settings) -> BaseClient:
    """A boto3 S3 client from `settings`: standard retry mode, path-style for custom endpoints."""
    config = Config(
        retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    key_id, secret = settings.aws_access_key_id, settings.aws_secret_access_key
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=key_id.get_secret_value() if key_id else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=config,
    )


def transfer_config(settings: Settings) -> TransferConfig:
    """Multipart above `s3_multipart_mb`, in parts of that size."""
    part = settings.s3_multipart_mb * _MIB
    return TransferConfig(multipart_threshold=part, multipart_chunksize=part)


_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
    }
)


def is_transient(exc: BaseException, *, retry_unreachable: bool = False) -> bool:
    """True for a fault worth retrying: S3 5xx / 429 / throttling codes, dropped connections,
    timeouts; looking through `__cause__` / `__context__` (boto3 wraps upload errors).

    An unreachable endpoint (connection refused, DNS failure) is usually a configuration error,
    so it counts only with `retry_unreachable=True`. Bad input (digest mismatch, unsafe key,
    missing object, 4xx) is never transient.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _is_transient_one(exc, retry_unreachable):
            return True
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "last_exception", None)
    return False


def _is_transient_one(exc: BaseException, retry_unreachable: bool) -> bool:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or _error_code(exc) in _TRANSIENT_CODES
    if isinstance(exc, (HTTPClientError, ConnectTimeoutError)):  # resets, read/connect timeouts
        return True
    if isinstance(exc, (EndpointConnectionError, ConnectionRefusedError)):
        return retry_unreachable
    dropped = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError)
    return isinstance(exc, dropped)
