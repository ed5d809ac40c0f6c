"""A lock between processes of one host: an exclusive `flock` on a file beside what it guards.

    with file_lock(db_path.with_name(db_path.name + ".lock")):
        ...  # create or migrate the database: one process at a time

The lock is the kernel's, so it is released when its holder exits, however it exits (SIGKILL included).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent) for the duration of the `with`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
