"""The local backend of the artifact store: a directory, written through hard links (atomic, write-once)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from infra.artifacts.base import (
    _CHUNK,
    TMP_DIR,
    ArtifactRef,
    StoreCheckError,
    UnsafeKeyError,
    _check_same,
    _hash_chunks,
    _Store,
    _tee,
    _tmp_prefix,
    remove_orphans,
    safe_key,
    sha256_file,
)
from infra.settings import ENV_PREFIX

log = logging.getLogger(__name__)

_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


class LocalStore(_Store):
    """Artifacts in a local directory; URIs are `file://` URIs under it."""

    def __init__(self, root: str | Path):
        self._dir = Path(root).resolve()
        self.root = self.root_of(root)

    @staticmethod
    def root_of(root: str | Path) -> str:
        return Path(root).resolve().as_uri()

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
