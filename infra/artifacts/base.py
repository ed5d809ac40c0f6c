"""The contract of the artifact store, and what both backends share.

`ArtifactStore` is what the pipeline uses; `_Store` implements its operations (keys, directories with
manifests, digest checks, verification) on a few primitives each backend writes: `LocalStore`
(infra/artifacts/local.py) and `S3Store` (infra/artifacts/s3.py). Also here: the checked keys (`safe_key`),
sha256 hashing, and the temp files and scratch folders named after their process, so that a killed process's
are found and removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from infra.settings import Settings

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



_HOST = socket.gethostname().replace("~", "-")


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


_URI_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*):[^@\s/]*@", re.I)


def redact_uri_text(text: str) -> str:
    """`text` with the password of every URI in it masked (`http://u:pw@h` -> `http://u:***@h`)."""
    return _URI_PASSWORD.sub(r"\1:***@", text)


