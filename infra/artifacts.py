"""Artifact store: a local directory or an S3-compatible bucket; URIs in, sha256-checked bytes out.

    store = open_store(settings.artifact_root, settings)      # checks the root is reachable
    ref = store.put_file(path, safe_key(model_id, "svd-init", "model.safetensors"))
    store.get_file(ref.uri, tmp / "model.safetensors", sha256=ref.sha256)

- URIs: `file:///abs/root/KEY` (LocalStore) or `s3://bucket/prefix/KEY` (S3Store). A store reads
  only URIs under its own root.
- Keys are relative `/`-joined names checked by `safe_key`; user-supplied names (model ids, run
  names) cannot leave the root or bucket prefix.
- Writes are atomic and write-once: a key is either absent or holds its complete bytes, and a key that
  holds other bytes is never replaced (`ArtifactConflictError`; writing the same bytes again is a no-op).
  Local: a temp file under `ROOT/.tmp/`, fsynced, then hard-linked to its key (`link` fails if the key
  exists, so two writers cannot clobber each other). A crash leaves its temp file in `.tmp/`, never in a
  published folder; `check()` removes the temp files of dead processes of this host. S3, below
  `Settings.s3_multipart_mb`: one PUT with `If-None-Match: *` (atomic write-once, as locally). Above it:
  multipart upload to a temp key under `PREFIX/.tmp/`, check its size, server-side copy to the final key
  unless it exists (checked, not atomic), delete the temp key. A crash can leave `.tmp/` objects behind;
  expire them with a bucket lifecycle rule.
- Every read given a digest verifies it and raises `DigestMismatchError` on a mismatch.
- A directory (a `save_pretrained` output) is stored as its files plus `KEY/_manifest.json`
  mapping each relative path to its sha256 and size; the directory's digest is the manifest's.
  The manifest is written last, so a directory exists only once it is complete.
- Nothing here unpickles: JSON is parsed with `json`, files are returned as paths.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, runtime_checkable

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
from pydantic import BaseModel, ConfigDict, Field

from infra.settings import ENV_PREFIX, Settings, redact_uri

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
TMP_DIR = ".tmp"  # under the root: in-flight writes (no key can start with a dot)
_CHUNK = 1 << 20  # bytes per read while hashing or copying
_MIB = 1 << 20
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*")
_MAX_SEGMENT = 255
_MAX_KEY = 1024  # S3's key limit, in UTF-8 bytes


class DigestMismatchError(ValueError):
    """Stored bytes do not hash to the expected sha256 (corrupt or replaced artifact)."""

    def __init__(self, message: str, *, uri: str = "", expected: str = "", actual: str = ""):
        super().__init__(message)
        self.uri, self.expected, self.actual = uri, expected, actual


class UnsafeKeyError(ValueError):
    """A key or URI would address something outside the store root."""


class StoreCheckError(RuntimeError):
    """The store root cannot be used (unreachable endpoint, missing bucket, no access)."""


class ArtifactConflictError(ValueError):
    """A key already holds other bytes; stored artifacts are write-once."""


class StoreWriteError(OSError):
    """A write to the store failed for good (after the client's retries); the message names where and the fix.

    The S3 error is its `__cause__`, so `is_transient` still sees a 5xx or a dropped connection."""


class ArtifactRef(BaseModel):
    """Where an artifact lives and what it must hash to. Small, frozen, JSON-serialisable."""

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)  # bytes; for a directory, the sum over its files
    kind: Literal["file", "dir"] = "file"


@runtime_checkable
class ArtifactStore(Protocol):
    """What the tasks use; `LocalStore` and `S3Store` implement it."""

    root: str

    def uri(self, key: str) -> str: ...
    def key_of(self, uri: str) -> str: ...
    def check(self) -> None: ...
    def put_file(self, path: str | Path, key: str) -> ArtifactRef: ...
    def put_bytes(self, data: bytes, key: str) -> ArtifactRef: ...
    def put_json(self, obj: Any, key: str) -> ArtifactRef: ...
    def put_dir(self, directory: str | Path, key: str, *, move: bool = False) -> ArtifactRef: ...
    def get_file(self, uri: str, dest: str | Path, sha256: str | None = None) -> Path: ...
    def get_dir(self, uri: str, dest: str | Path, sha256: str | None = None) -> Path: ...
    def get_bytes(self, uri: str, sha256: str | None = None) -> bytes: ...
    def get_json(self, uri: str, sha256: str | None = None) -> Any: ...
    def exists(self, uri: str) -> bool: ...
    def verify(self, ref: ArtifactRef) -> bool: ...


def safe_key(*parts: str) -> str:
    """Join user-supplied names into a relative key that cannot leave the store root.

    A part may hold `/`-separated segments (`"HuggingFaceTB/SmolLM2-135M"` gives two). Every
    segment must match `[A-Za-z0-9_][A-Za-z0-9._=+-]*` (at most 255 characters), so `..`, `.`,
    empty segments (`a//b`, a leading `/`), backslashes, NUL, spaces, `:` and non-ASCII are
    rejected rather than rewritten: two different names never map to one key.
    """
    segments = []
    for part in parts:
        if not isinstance(part, str):
            raise UnsafeKeyError(f"key part {part!r} is a {type(part).__name__}, not a str")
        for segment in part.split("/"):
            if len(segment) > _MAX_SEGMENT or not _SEGMENT.fullmatch(segment):
                raise UnsafeKeyError(
                    f"unsafe key part {part!r}: segment {segment!r} must match "
                    f"{_SEGMENT.pattern} (at most {_MAX_SEGMENT} chars); rename it"
                )
            segments.append(segment)
    key = "/".join(segments)
    if not key or len(key.encode()) > _MAX_KEY:
        raise UnsafeKeyError(f"key {key!r} must be 1..{_MAX_KEY} bytes long")
    return key


def sha256_file(path: str | Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a local file, read in 1 MiB chunks."""
    with open(path, "rb") as fh:
        return _hash_chunks(iter(lambda: fh.read(_CHUNK), b""))


def _hash_chunks(chunks: Iterator[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _check_digest(uri: str, expected: str, actual: str) -> None:
    if expected != actual:
        raise DigestMismatchError(
            f"digest mismatch for {uri}: expected sha256 {expected}, got {actual}; the stored "
            "artifact is corrupt or was replaced; rerun the stage that writes it",
            uri=uri,
            expected=expected,
            actual=actual,
        )


def _json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys), so equal objects have equal digests."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


class _Store(ABC):
    """The operations shared by both stores, built on the abstract primitives at the end
    (which take keys already checked by `safe_key`)."""

    root: str

    def uri(self, key: str) -> str:
        """The URI that `key` (checked by `safe_key`) has in this store."""
        return f"{self.root}/{safe_key(key)}"

    def key_of(self, uri: str) -> str:
        """Inverse of `uri`: the checked key of a URI under this store's root."""
        prefix = self.root + "/"
        if not uri.startswith(prefix):
            raise UnsafeKeyError(f"{uri!r} is not under this store's root {self.root!r}")
        return safe_key(uri[len(prefix) :])

    def put_file(self, path: str | Path, key: str) -> ArtifactRef:
        """Store a local file under `key` atomically."""
        with open(path, "rb") as fh:
            return self._put_stream(fh, safe_key(key))

    def put_bytes(self, data: bytes, key: str) -> ArtifactRef:
        """Store bytes under `key` atomically."""
        return self._put_stream(io.BytesIO(data), safe_key(key))

    def put_json(self, obj: Any, key: str) -> ArtifactRef:
        """Store `obj` as canonical JSON (sorted keys) under `key`."""
        return self.put_bytes(_json_bytes(obj), key)

    def put_dir(self, directory: str | Path, key: str, *, move: bool = False) -> ArtifactRef:
        """Store every file under `directory`, then its manifest; the digest is the manifest's.

        `move=True`: the files may be moved rather than copied (a scratch directory the caller drops next).
        """
        directory, key = Path(directory), safe_key(key)
        files, put = {}, self._move_file if move else self.put_file
        for rel in _list_files(directory):
            ref = put(directory / rel, f"{key}/{rel}")
            files[rel] = {"sha256": ref.sha256, "size": ref.size}
        manifest = self.put_json({"files": files}, f"{key}/{MANIFEST_NAME}")
        size = sum(entry["size"] for entry in files.values())
        log.debug("stored %d files (%d bytes) at %s", len(files), size, self.uri(key))
        return ArtifactRef(uri=self.uri(key), sha256=manifest.sha256, size=size, kind="dir")

    def _move_file(self, path: Path, key: str) -> ArtifactRef:
        """Store `path` under `key`, leaving `path` in any state; a copy unless a store can do better."""
        return self.put_file(path, key)

    def get_file(self, uri: str, dest: str | Path, sha256: str | None = None) -> Path:
        """Download `uri` to `dest`; `dest` appears only once its digest has been checked."""
        key, dest = self.key_of(uri), Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        os.close(fd)
        try:
            self._fetch(key, Path(tmp))
            if sha256 is not None:
                _check_digest(uri, sha256, sha256_file(tmp)[0])
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dest

    def get_bytes(self, uri: str, sha256: str | None = None) -> bytes:
        """The bytes at `uri`, checked against `sha256` when given."""
        data = self._read(self.key_of(uri))
        if sha256 is not None:
            _check_digest(uri, sha256, hashlib.sha256(data).hexdigest())
        return data

    def get_json(self, uri: str, sha256: str | None = None) -> Any:
        """The JSON document at `uri`, checked against `sha256` when given."""
        return json.loads(self.get_bytes(uri, sha256))

    def get_dir(self, uri: str, dest: str | Path, sha256: str | None = None) -> Path:
        """Download the directory at `uri` into `dest` (absent or empty), every file verified.

        Files land in a temp sibling directory that is renamed to `dest` once all are verified.
        """
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise FileExistsError(f"{dest} is not empty; get_dir needs a new or empty directory")
        files = self._manifest(uri, sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
        tmp.chmod(0o755)
        try:
            for rel, entry in files.items():
                self.get_file(f"{uri}/{rel}", tmp / rel, sha256=entry["sha256"])
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def exists(self, uri: str) -> bool:
        """True if a file, or a complete directory (its manifest), is stored at `uri`."""
        key = self.key_of(uri)
        return self._exists(key) or self._exists(f"{key}/{MANIFEST_NAME}")

    def verify(self, ref: ArtifactRef) -> bool:
        """Re-hash the stored artifact (every file of a directory); False if missing or changed."""
        try:
            if ref.kind == "dir":
                for rel, entry in self._manifest(ref.uri, ref.sha256).items():
                    self._verify_one(f"{ref.uri}/{rel}", entry["sha256"])
            else:
                self._verify_one(ref.uri, ref.sha256)
        except (FileNotFoundError, DigestMismatchError) as exc:
            log.info("artifact %s failed verification: %s", ref.uri, exc)
            return False
        return True

    def _verify_one(self, uri: str, sha256: str) -> None:
        _check_digest(uri, sha256, self._digest(self.key_of(uri)))

    def _manifest(self, uri: str, sha256: str | None) -> dict[str, dict[str, Any]]:
        """The manifest's files, each path re-checked so a tampered manifest cannot escape."""
        files = self.get_json(f"{uri}/{MANIFEST_NAME}", sha256)["files"]
        return {safe_key(rel): entry for rel, entry in files.items()}

    @abstractmethod
    def check(self) -> None:
        """Raise `StoreCheckError`, naming the fix, if the root cannot be used."""

    @abstractmethod
    def _put_stream(self, fh: BinaryIO, key: str) -> ArtifactRef:
        """Write `fh` to `key` atomically and return its ref."""

    @abstractmethod
    def _fetch(self, key: str, dest: Path) -> None:
        """Copy `key` to the local file `dest`; FileNotFoundError if absent."""

    @abstractmethod
    def _read(self, key: str) -> bytes:
        """The bytes at `key`; FileNotFoundError if absent."""

    @abstractmethod
    def _digest(self, key: str) -> str:
        """The sha256 of the bytes at `key`, streamed; FileNotFoundError if absent."""

    @abstractmethod
    def _exists(self, key: str) -> bool:
        """True if an object is stored at `key`."""


def _list_files(directory: Path) -> list[str]:
    """Sorted relative POSIX paths of the regular files under `directory`, each key-checked."""
    if not directory.is_dir():
        raise NotADirectoryError(f"put_dir needs a directory; {directory} is not one")
    rels = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    if MANIFEST_NAME in rels:
        raise UnsafeKeyError(f"{directory} contains {MANIFEST_NAME}, a name the store reserves")
    return [safe_key(rel) for rel in rels]


class LocalStore(_Store):
    """Artifacts in a local directory; URIs are `file://` URIs under it."""

    def __init__(self, root: str | Path):
        self._dir = Path(root).resolve()
        self.root = self._dir.as_uri()

    def check(self) -> None:
        """Create the root directory if needed and check it is writable."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreCheckError(
                f"cannot create artifact root {self._dir}: {exc}; "
                f"set {ENV_PREFIX}ARTIFACT_ROOT to a writable directory"
            ) from exc
        if not os.access(self._dir, os.W_OK):
            raise StoreCheckError(
                f"artifact root {self._dir} is not writable; "
                f"set {ENV_PREFIX}ARTIFACT_ROOT to a writable directory"
            )
        for path in self.remove_stale_temps():
            log.info("removed %s, left by a process that was killed mid-write", path)

    def _path(self, key: str) -> Path:
        path = self._dir / key
        if not path.resolve().is_relative_to(self._dir):  # a symlink inside the root
            raise UnsafeKeyError(f"key {key!r} resolves outside {self._dir} through a symlink")
        return path

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no artifact at {self.uri(key)}")
        return path

    def _put_stream(self, fh: BinaryIO, key: str) -> ArtifactRef:
        dest = self._path(key)
        tmp_dir = self._dir / TMP_DIR
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=_tmp_prefix())
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o644)
                sha, size = _hash_chunks(_tee(fh, out))
                out.flush()
                os.fsync(out.fileno())
            self._publish(Path(tmp), dest, sha)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return ArtifactRef(uri=self.uri(key), sha256=sha, size=size)

    def _move_file(self, path: Path, key: str) -> ArtifactRef:
        """Hash and fsync `path` in place, then link it into the store: one read, no second copy of a
        checkpoint. Across file systems (EXDEV) it is copied as `put_file` does."""
        dest = self._path(safe_key(key))
        with open(path, "rb+") as fh:
            sha, size = _hash_chunks(iter(lambda: fh.read(_CHUNK), b""))
            os.fchmod(fh.fileno(), 0o644)
            os.fsync(fh.fileno())
        try:
            self._publish(path, dest, sha)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return self.put_file(path, key)
        return ArtifactRef(uri=self.uri(key), sha256=sha, size=size)

    def _publish(self, src: Path, dest: Path, sha: str) -> None:
        """Hard-link the complete file `src` to `dest`, which must not hold other bytes (write-once)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        uri = self.uri(dest.relative_to(self._dir).as_posix())
        try:
            os.link(src, dest)  # atomic, and fails if dest exists: a concurrent writer cannot be clobbered
        except FileExistsError:
            _check_same(uri, sha, sha256_file(dest)[0])
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            if dest.exists():  # a file system without hard links: check, then rename (not atomic between writers)
                _check_same(uri, sha, sha256_file(dest)[0])
            else:
                os.replace(src, dest)

    def remove_stale_temps(self) -> list[Path]:
        """Delete the temp files that processes of this host which are no longer running left in `.tmp/`."""
        return remove_orphans(self._dir / TMP_DIR)

    def _fetch(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._existing(key), dest)

    def _read(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def _digest(self, key: str) -> str:
        return sha256_file(self._existing(key))[0]

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()


_HOST = socket.gethostname().replace("~", "-")
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def _tmp_prefix() -> str:
    """`HOST~PID~`: whose temp file it is, so that the files of a killed process can be found and removed."""
    return f"{_HOST}~{os.getpid()}~"


def scratch_root(settings: Settings) -> Path:
    """Where stage calls keep scratch folders: `<prefect_home>/../scratch/HOST~PID~*`, so that the folders of a
    killed process are found and removed (`remove_orphans`), not left in the system's temp directory."""
    return Path(settings.prefect_home).resolve().parent / "scratch"


def owned_temp_dir(parent: Path) -> tempfile.TemporaryDirectory:
    """A temporary directory in `parent` named after this process (`remove_orphans` finds it if we are killed)."""
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=_tmp_prefix(), dir=parent)


def remove_orphans(directory: Path, *, include_own: bool = False) -> list[Path]:
    """Delete what processes of this host that no longer run (and, with `include_own`, this one) left in
    `directory` under their `HOST~PID~` names."""
    removed = []
    for path in directory.glob(f"{_HOST}~*~*"):
        pid = path.name.split("~")[1]
        if not pid.isdigit() or (_alive(int(pid)) and not (include_own and int(pid) == os.getpid())):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _check_same(uri: str, sha: str, stored: str) -> None:
    """Writing bytes to a key that holds them already is a no-op; other bytes are a conflict."""
    if stored != sha:
        raise ArtifactConflictError(
            f"{uri} already holds other bytes (sha256 {stored}, not {sha}); stored artifacts are write-once, "
            "so write to a new key"
        )


def _tee(src: BinaryIO, out: BinaryIO) -> Iterator[bytes]:
    """Yield `src` in chunks, writing each to `out` first."""
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        out.write(chunk)
        yield chunk


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


_URI_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*):[^@\s/]*@", re.I)


def redact_uri_text(text: str) -> str:
    """`text` with the password of every URI in it masked (`http://u:pw@h` -> `http://u:***@h`)."""
    return _URI_PASSWORD.sub(r"\1:***@", text)


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


def open_store(root: str, settings: Settings) -> ArtifactStore:
    """The store for `root` (a directory or s3://bucket/prefix), checked before it is returned."""
    if root.startswith("s3://"):
        bucket, _, prefix = root.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"artifact root {root!r} names no bucket; use s3://BUCKET/PREFIX")
        store: _Store = S3Store(
            bucket, prefix.strip("/"), s3_client(settings), transfer_config(settings)
        )
    elif "://" in root:
        raise ValueError(f"artifact root {root!r}: use a local directory or s3://BUCKET/PREFIX")
    else:
        store = LocalStore(root)
    store.check()
    return store


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
