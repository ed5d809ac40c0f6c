"""Artifact store: round trips, atomic writes, digests, key safety; S3 through moto over HTTP."""

import collections
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from infra.artifacts import (
    MANIFEST_NAME,
    ArtifactConflictError,
    ArtifactRef,
    ArtifactStore,
    DigestMismatchError,
    LocalStore,
    S3Store,
    StoreCheckError,
    StoreWriteError,
    UnsafeKeyError,
    is_transient,
    open_store,
    owned_temp_dir,
    remove_orphans,
    safe_key,
)
from infra.settings import Settings

MODEL_ID = "HuggingFaceTB/SmolLM2-135M"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return open_store(str(tmp_path / "store"), Settings(_env_file=None))
    settings = request.getfixturevalue("s3_settings")
    return open_store(settings.artifact_root, settings)


def _corrupt(store, uri: str) -> None:
    """Overwrite the stored bytes behind the store's back."""
    key = store.key_of(uri)
    if isinstance(store, LocalStore):
        (store._dir / key).write_bytes(b"bit rot")
    else:
        store.client.put_object(Bucket=store.bucket, Key=store._object(key), Body=b"bit rot")


def _checkpoint_dir(root):
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(os.urandom(3000))
    (root / "sub" / "tokenizer.json").write_text("{}")
    return root


def test_round_trips(store, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(5000))
    ref = store.put_file(src, safe_key(MODEL_ID, "svd-init", "weights.bin"))
    assert ref == ArtifactRef(
        uri=f"{store.root}/{MODEL_ID}/svd-init/weights.bin",
        sha256=hashlib.sha256(src.read_bytes()).hexdigest(),
        size=5000,
    )
    out = store.get_file(ref.uri, tmp_path / "out" / "weights.bin", sha256=ref.sha256)
    assert out.read_bytes() == src.read_bytes()

    raw = store.put_bytes(b"abc", "x/raw.bin")
    assert store.get_bytes(raw.uri, sha256=hashlib.sha256(b"abc").hexdigest()) == b"abc"
    doc = store.put_json({"b": [1, 2], "a": 0.5}, "x/metrics.json")
    assert store.get_json(doc.uri, sha256=doc.sha256) == {"a": 0.5, "b": [1, 2]}
    assert store.put_json({"a": 0.5, "b": [1, 2]}, "x/again.json").sha256 == doc.sha256
    assert store.exists(ref.uri) and store.verify(ref)
    assert not store.exists(store.uri("x/absent.bin"))


def test_dir_round_trip(store, tmp_path):
    ckpt = _checkpoint_dir(tmp_path / "ckpt")
    ref = store.put_dir(ckpt, "smollm2/mla")
    manifest = store.get_bytes(f"{ref.uri}/{MANIFEST_NAME}")
    assert ref.kind == "dir" and ref.sha256 == hashlib.sha256(manifest).hexdigest()
    assert ref.size == sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert store.exists(ref.uri) and store.verify(ref)

    out = store.get_dir(ref.uri, tmp_path / "out", sha256=ref.sha256)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "config.json",
        "model.safetensors",
        "sub/tokenizer.json",
    ]
    assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()


def test_dir_moved_in_stores_what_a_copy_stores(store, tmp_path):
    source = _checkpoint_dir(tmp_path / "a")
    copied = store.put_dir(source, "m/copied")
    moved = store.put_dir(shutil.copytree(source, tmp_path / "b"), "m/moved", move=True)
    assert (moved.sha256, moved.size) == (copied.sha256, copied.size) and store.verify(moved)
    out = store.get_dir(moved.uri, tmp_path / "out", sha256=moved.sha256)
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_corrupt_file_is_detected(store, tmp_path):
    ref = store.put_bytes(b"weights", "m/w.bin")
    _corrupt(store, ref.uri)
    with pytest.raises(DigestMismatchError) as err:
        store.get_bytes(ref.uri, sha256=ref.sha256)
    assert err.value.uri == ref.uri and err.value.expected == ref.sha256
    assert ref.uri in str(err.value) and err.value.actual in str(err.value)
    with pytest.raises(DigestMismatchError):
        store.get_file(ref.uri, tmp_path / "w.bin", sha256=ref.sha256)
    assert not (tmp_path / "w.bin").exists() and not list(tmp_path.glob(".tmp-*"))
    assert not store.verify(ref)


def test_corrupt_dir_file_is_detected(store, tmp_path):
    ref = store.put_dir(_checkpoint_dir(tmp_path / "ckpt"), "m/ckpt")
    _corrupt(store, f"{ref.uri}/sub/tokenizer.json")
    with pytest.raises(DigestMismatchError, match="sub/tokenizer.json"):
        store.get_dir(ref.uri, tmp_path / "out", sha256=ref.sha256)
    assert not (tmp_path / "out").exists()
    assert not store.verify(ref)


def test_missing_artifact(store):
    uri = store.uri("nothing/here.bin")
    with pytest.raises(FileNotFoundError, match="nothing/here.bin"):
        store.get_bytes(uri)
    assert not store.verify(ArtifactRef(uri=uri, sha256="0" * 64, size=0))


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "s3://other-bucket/x", "{root}/a/../../x"])
def test_uris_outside_the_root_are_refused(store, uri):
    with pytest.raises(UnsafeKeyError):
        store.get_bytes(uri.format(root=store.root))


def test_tampered_manifest_cannot_escape_dest(tmp_path):
    store = LocalStore(tmp_path / "store")
    ref = store.put_dir(_checkpoint_dir(tmp_path / "ckpt"), "m/ckpt")
    manifest = {"files": {"../../evil.sh": {"sha256": "0" * 64, "size": 1}}}
    evil = json.dumps(manifest).encode()
    (tmp_path / "store" / "m" / "ckpt" / MANIFEST_NAME).write_bytes(evil)  # behind the write-once store's back
    with pytest.raises(UnsafeKeyError, match="evil"):
        store.get_dir(ref.uri, tmp_path / "out", sha256=hashlib.sha256(evil).hexdigest())


@pytest.mark.parametrize(
    "parts, key",
    [
        ((MODEL_ID, "run-1", "model.safetensors"), f"{MODEL_ID}/run-1/model.safetensors"),
        (("Qwen/Qwen2.5-0.5B", "rank=64+q8", "_manifest.json"), None),
    ],
)
def test_safe_key_accepts_model_ids(parts, key):
    assert safe_key(*parts) == (key or "/".join(parts))


@pytest.mark.parametrize(
    "bad",
    ["", "..", "../x", "a/../b", "a/./b", "/abs", "a//b", "a/", "a\\b", "a\x00b", "C:x", "a b",
     ".hidden", "~user", "modèle", "x" * 256, "$(rm)"],
)
def test_safe_key_rejects(bad):
    with pytest.raises(UnsafeKeyError):
        safe_key("runs", bad)


def test_store_ops_check_keys(tmp_path):
    store = open_store(str(tmp_path / "store"), Settings(_env_file=None))
    with pytest.raises(UnsafeKeyError):
        store.put_bytes(b"x", "../escape.bin")
    (tmp_path / "outside").mkdir()
    (tmp_path / "store" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafeKeyError, match="symlink"):
        store.put_bytes(b"x", "link/f.bin")
    assert list((tmp_path / "outside").iterdir()) == []


def test_local_write_is_atomic(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    old = store.put_bytes(b"old", "a/w.bin")

    def crash(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "link", crash)
    with pytest.raises(OSError, match="disk vanished"):
        store.put_bytes(os.urandom(3 << 20), "a/new.bin")
    monkeypatch.undo()
    assert store.get_bytes(old.uri, sha256=old.sha256) == b"old"
    assert os.listdir(tmp_path / "store" / "a") == ["w.bin"]  # no temp file left behind
    assert os.listdir(tmp_path / "store" / ".tmp") == []


def test_a_file_system_without_hard_links_still_stores_write_once(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")

    def unsupported(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", unsupported)
    ref = store.put_bytes(b"first", "m/w.bin")
    assert store.put_bytes(b"first", "m/w.bin") == ref and store.verify(ref)
    with pytest.raises(ArtifactConflictError):
        store.put_bytes(b"other", "m/w.bin")
    assert os.listdir(tmp_path / "store" / ".tmp") == []


def test_stored_bytes_are_write_once(store, tmp_path):
    ref = store.put_bytes(b"first", "m/w.bin")
    assert store.put_bytes(b"first", "m/w.bin") == ref  # the same bytes again: a no-op
    with pytest.raises(ArtifactConflictError, match="m/w.bin already holds other bytes"):
        store.put_bytes(b"other", "m/w.bin")
    src = tmp_path / "other.bin"
    src.write_bytes(b"other")
    with pytest.raises(ArtifactConflictError):
        store.put_file(src, "m/w.bin")
    ckpt = _checkpoint_dir(tmp_path / "ckpt")
    first = store.put_dir(ckpt, "m/ckpt")
    (ckpt / "model.safetensors").write_bytes(os.urandom(3000))
    with pytest.raises(ArtifactConflictError, match="model.safetensors"):
        store.put_dir(ckpt, "m/ckpt", move=True)
    assert store.get_bytes(ref.uri, sha256=ref.sha256) == b"first" and store.verify(first)


def test_temp_file_of_a_killed_writer_is_never_in_a_published_folder(tmp_path):
    """A writer killed mid-copy leaves its temp file in ROOT/.tmp/, which the next check() removes."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from infra.artifacts import LocalStore
        store = LocalStore(sys.argv[1])
        store.put_bytes(b"done", "m/ckpt/config.json")

        class Killed:
            def __init__(self):
                self.sent = 0
            def read(self, n):
                if self.sent:
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-copy
                self.sent += 1
                return b"x" * n

        store._put_stream(Killed(), "m/ckpt/model.safetensors")
        """
    )
    root = tmp_path / "store"
    done = subprocess.run([sys.executable, "-c", script, str(root)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -signal.SIGKILL
    assert os.listdir(root / "m" / "ckpt") == ["config.json"]
    [left] = os.listdir(root / ".tmp")
    assert os.path.getsize(root / ".tmp" / left) >= 1 << 20
    open_store(str(root), Settings(_env_file=None))  # check() removes what dead writers of this host left
    assert os.listdir(root / ".tmp") == []


def test_local_check_names_the_fix(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreCheckError, match="MHA2MLA_ARTIFACT_ROOT"):
        open_store(str(tmp_path / "file" / "store"), Settings(_env_file=None))


def _client_error(code: str, status: int) -> ClientError:
    response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "Op")


@pytest.mark.parametrize(
    "exc, transient",
    [
        (_client_error("InternalError", 500), True),
        (_client_error("SlowDown", 503), True),
        (_client_error("Throttling", 400), True),
        (_client_error("NoSuchKey", 404), False),
        (_client_error("AccessDenied", 403), False),
        (ReadTimeoutError(endpoint_url="http://s3"), True),
        (ConnectTimeoutError(endpoint_url="http://s3"), True),
        (ConnectionResetError(), True),
        (EndpointConnectionError(endpoint_url="http://s3"), False),
        (DigestMismatchError("bad"), False),
        (UnsafeKeyError("bad"), False),
        (FileNotFoundError(), False),
    ],
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_is_transient_looks_through_wrappers_and_opt_in_unreachable():
    try:
        try:
            raise ClientError({"Error": {"Code": "SlowDown"}}, "UploadPart")
        except ClientError:
            raise RuntimeError("Failed to upload")  # what boto3's S3UploadFailedError does
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    unreachable = EndpointConnectionError(endpoint_url="http://s3")
    assert is_transient(unreachable, retry_unreachable=True)


class _Body:
    def __init__(self, data: bytes):
        self._data = data

    def stream(self, **kwargs):
        yield self._data


def _inject_500s(client, operations, times=1) -> collections.Counter:
    """Answer the first `times` requests of each operation with an S3 500, before sending."""
    injected = collections.Counter()
    body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"

    def fail(request, event_name, **kwargs):
        operation = event_name.rsplit(".", 1)[-1]
        if injected[operation] < times:
            injected[operation] += 1
            return AWSResponse(request.url, 500, {}, _Body(body))
        return None

    for operation in operations:
        client.meta.events.register(f"before-send.s3.{operation}", fail)
    return injected


def _temp_objects(store: S3Store) -> list:
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store._prefix + ".tmp/")
    return listing.get("Contents", [])


@pytest.mark.services
def test_s3_multipart_upload(s3_settings, tmp_path):
    store = open_store(s3_settings.artifact_root, s3_settings)
    counted = collections.Counter()
    store.client.meta.events.register("before-send.s3.UploadPart", lambda **_: counted.update("p"))
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(11 << 20))
    ref = store.put_file(big, "m/big.safetensors")
    assert counted["p"] == 3  # 11 MiB in 5 MiB parts
    assert ref.sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    out = store.get_file(ref.uri, tmp_path / "back.safetensors", sha256=ref.sha256)
    assert out.read_bytes() == big.read_bytes()
    assert _temp_objects(store) == []


@pytest.mark.services
def test_s3_transient_500s_are_retried(s3_settings, tmp_path):
    store = open_store(s3_settings.artifact_root, s3_settings)
    operations = ["PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload",
                  "HeadObject", "CopyObject", "UploadPartCopy", "GetObject", "DeleteObject"]
    injected = _inject_500s(store.client, operations)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 << 20))
    refs = [store.put_file(big, "m/big.bin"), store.put_json({"ppl": 12.5}, "m/eval.json")]
    assert all(store.verify(ref) for ref in refs)
    assert store.get_json(refs[1].uri, sha256=refs[1].sha256) == {"ppl": 12.5}
    assert {"PutObject", "UploadPart", "UploadPartCopy", "GetObject"} <= set(injected)
    assert _temp_objects(store) == []


@pytest.mark.services
def test_s3_failed_upload_leaves_nothing(s3_settings):
    settings = s3_settings.model_copy(update={"s3_max_attempts": 2})
    store = open_store(settings.artifact_root, settings)
    _inject_500s(store.client, ["PutObject"], times=2)
    with pytest.raises(StoreWriteError) as err:
        store.put_bytes(b"w", "m/w.bin")
    assert is_transient(err.value) and isinstance(err.value.__cause__, ClientError)
    message = str(err.value)  # one line: the object, the endpoint, the attempts and the fix
    assert f"{store.root}/m/w.bin at {settings.s3_endpoint_url} (2 attempts)" in message
    assert "MHA2MLA_S3_ENDPOINT_URL" in message and "\n" not in message
    assert not store.exists(store.uri("m/w.bin")) and _temp_objects(store) == []


@pytest.mark.services
def test_s3_writers_of_one_key_at_once_never_clobber(s3_settings):
    """Small objects (records, results) go up in one conditional PUT: of writers racing on one key, exactly one
    wins, the others get ArtifactConflictError, and the key holds the winner's bytes."""
    from concurrent.futures import ThreadPoolExecutor

    stores = [open_store(s3_settings.artifact_root, s3_settings) for _ in range(4)]
    conditions = []
    stores[0].client.meta.events.register("before-send.s3.PutObject", lambda request, **_: conditions.append(request.headers.get("If-None-Match")))  # fmt: skip

    def write(i):
        try:
            return stores[i].put_bytes(f"writer {i}".encode() * 100, "prefect-results/key")
        except ArtifactConflictError:
            return None

    with ThreadPoolExecutor(4) as pool:
        refs = list(pool.map(write, range(4)))
    [winner] = [ref for ref in refs if ref is not None]
    assert stores[0].verify(winner) and conditions == [b"*"]


@pytest.mark.services
def test_s3_missing_bucket_is_a_clear_error(s3_settings):
    with pytest.raises(StoreCheckError, match="no-such-bucket.*does not exist.*ARTIFACT_ROOT"):
        open_store("s3://no-such-bucket/x", s3_settings)


@pytest.mark.services
def test_s3_unreachable_endpoint_is_a_clear_error(s3_settings, free_port):
    endpoint = f"http://127.0.0.1:{free_port}"
    settings = s3_settings.model_copy(update={"s3_endpoint_url": endpoint, "s3_max_attempts": 1})
    with pytest.raises(StoreCheckError, match=f"{endpoint}.*unreachable.*MHA2MLA_S3_ENDPOINT_URL"):
        open_store(settings.artifact_root, settings)


@pytest.mark.services
def test_s3_objects_hold_what_the_refs_say(s3_settings, tmp_path):
    store = open_store(s3_settings.artifact_root, s3_settings)
    ref = store.put_dir(_checkpoint_dir(tmp_path / "ckpt"), MODEL_ID)
    manifest = json.loads(store.get_bytes(f"{ref.uri}/{MANIFEST_NAME}", sha256=ref.sha256))
    for rel, entry in manifest["files"].items():
        key = f"artifacts/{MODEL_ID}/{rel}"
        body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]


def test_scratch_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    with owned_temp_dir(tmp_path) as mine:
        host = Path(mine).name.split("~")[0]
        orphan = tmp_path / f"{host}~{pid}~abc"
        (orphan / "model").mkdir(parents=True)
        (orphan / "model" / "model.safetensors").write_bytes(os.urandom(1000))
        other_host = tmp_path / f"elsewhere~{pid}~abc"
        other_host.mkdir()
        assert remove_orphans(tmp_path) == [orphan]
        assert Path(mine).is_dir() and other_host.is_dir()  # alive, or not ours to judge
        assert remove_orphans(tmp_path, include_own=True) == [Path(mine)]
