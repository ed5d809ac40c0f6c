"""Artifact store: a local directory or an S3-compatible bucket; URIs in, sha256-checked bytes out.

One contract (`ArtifactStore`, base.py) and two backends: `LocalStore` (local.py) and `S3Store` (s3.py).

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

from infra.artifacts.base import (
    MANIFEST_NAME,
    ArtifactConflictError,
    ArtifactRef,
    ArtifactStore,
    DigestMismatchError,
    StoreCheckError,
    StoreWriteError,
    UnsafeKeyError,
    owned_temp_dir,
    redact_uri_text,
    remove_orphans,
    safe_key,
    scratch_root,
    sha256_file,
)
from infra.artifacts.local import LocalStore
from infra.artifacts.s3 import S3Store, is_transient, s3_client, transfer_config
from infra.settings import Settings

__all__ = [
    "MANIFEST_NAME", "ArtifactConflictError", "ArtifactRef", "ArtifactStore", "DigestMismatchError", "LocalStore",
    "S3Store", "StoreCheckError", "StoreWriteError", "UnsafeKeyError", "is_transient", "open_store", "owned_temp_dir",
    "redact_uri_text", "remove_orphans", "s3_client", "safe_key", "scratch_root", "sha256_file", "store_root",
]  # fmt: skip


def open_store(root: str, settings: Settings) -> ArtifactStore:
    """The store for `root` (a directory or s3://bucket/prefix), checked before it is returned."""
    if root.startswith("s3://"):
        bucket, _, prefix = root.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"artifact root {root!r} names no bucket; use s3://BUCKET/PREFIX")
        store: ArtifactStore = S3Store(
            bucket, prefix.strip("/"), s3_client(settings), transfer_config(settings)
        )
    elif "://" in root:
        raise ValueError(f"artifact root {root!r}: use a local directory or s3://BUCKET/PREFIX")
    else:
        store = LocalStore(root)
    store.check()
    return store


def store_root(root: str) -> str:
    """The URI prefix of the artifacts of the store at `root` (`ArtifactStore.root`), without opening it."""
    if root.startswith("s3://"):
        bucket, _, prefix = root.removeprefix("s3://").partition("/")
        return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
    return LocalStore.root_of(root)
