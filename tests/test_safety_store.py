"""What a shared store cannot do to a run: execute code through a cache record, or change the bytes that a result
or a registered version points at (tiny seeded Llama; local store and moto's S3 server over HTTP)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, PickleSerializer

from infra.artifacts import ArtifactRef, DigestMismatchError

pytest_plugins = ["pipeline_fixtures"]

RESULTS = "prefect-results"


class CreatesMarker:
    """Unpickling this opens (creates) the marker file: code chosen by whoever wrote the record."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@contextmanager
def warnings_of(name: str) -> Iterator[list[str]]:
    """The WARNING messages logged to logger `name` meanwhile (a handler of its own: Prefect's logging set-up
    replaces the root logger's handlers, caplog's included)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def stage_result():
    from infra.stage import StageResult

    return StageResult(stage="svd-init", output=ArtifactRef(uri="file:///s/m", sha256="0" * 64, size=1))


def record(result, serializer=None) -> bytes:
    metadata = ResultRecordMetadata(serializer=serializer or JSONSerializer(), storage_key="k")
    return ResultRecord(metadata=metadata, result=result).serialize()


def test_parse_record_reads_only_json_records_of_stage_results(tmp_path):
    from infra.stage import UnsafeRecordError, parse_record

    good = record(stage_result())
    assert parse_record(good) == stage_result()
    marker = tmp_path / "marker"
    pickled = record(CreatesMarker(marker), PickleSerializer())
    hooked = json.loads(good)
    hooked["metadata"]["serializer"]["object_decoder"] = "builtins.print"  # any callable, run on every object
    nested = json.loads(good)
    nested["result"] = nested["result"].replace('"params": {}', '"params": {"x": {"__class__": "os.getcwd", "data": 1}}')
    other = record({"__class__": "pathlib.Path", "data": "/etc"})
    refused = {"pickle": pickled, "object_decoder": json.dumps(hooked).encode(), "__class__": json.dumps(nested).encode(),
               "pathlib.Path": other, "not a JSON": b"\x80\x04K\x01."}  # fmt: skip
    for reason, content in refused.items():
        with pytest.raises(UnsafeRecordError, match=reason.replace(".", r"\.")):
            parse_record(content)
    assert not marker.exists()


def test_a_record_names_its_artifacts_relative_to_its_store(tmp_path):
    from infra.artifacts import LocalStore
    from infra.stage import STORE_URI, StageResult, in_store, parse_record, relocate

    old, new = LocalStore(tmp_path / "old"), LocalStore(tmp_path / "new")
    result = StageResult(stage="svd-init", output=ArtifactRef(uri=old.uri("stages/m/model"), sha256="0" * 64, size=1),
                         files={"plot.png": ArtifactRef(uri=old.uri("stages/m/plot.png"), sha256="1" * 64, size=2)})  # fmt: skip
    stored = relocate(record(result), old.root + "/", STORE_URI)
    assert old.root not in stored.decode()
    moved = parse_record(in_store(stored, new))  # the same record, read in a copy of the store
    assert moved.uri == new.uri("stages/m/model") and moved.files["plot.png"].uri == new.uri("stages/m/plot.png")
    assert parse_record(in_store(record(result), new)) == result  # a record written before keeps its URIs
    assert in_store(b"\x80\x04K\x01.", new) == b"\x80\x04K\x01."  # not JSON: left for parse_record to refuse


def _poison_records(store, marker_dir: Path) -> int:
    """Replace every cache record in the store by a pickle record whose loading creates a marker file."""
    listing = [store.key_of(uri) for uri in _record_uris(store)]
    for i, key in enumerate(listing):
        content = record(CreatesMarker(marker_dir / f"marker-{i}"), PickleSerializer())
        if hasattr(store, "client"):  # behind the write-once store's back, as an attacker with bucket access would
            store.client.put_object(Bucket=store.bucket, Key=store._object(key), Body=content)
        else:
            (store._dir / key).write_bytes(content)
    return len(listing)


def _record_uris(store) -> list[str]:
    if hasattr(store, "client"):
        listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store._prefix}{RESULTS}/")
        return [f"s3://{store.bucket}/{obj['Key']}" for obj in listing.get("Contents", [])]
    return [path.as_uri() for path in (store._dir / RESULTS).iterdir()]


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_pickle_cache_record_runs_no_code_and_is_a_cache_miss(where, request, tiny_source, tiny_params, tmp_path):
    from flows.convert import convert
    from infra.stage import context

    request.getfixturevalue("local_env" if where == "local" else "s3_env")
    stages = len(convert(tiny_params(tiny_source)).cache)
    markers = tmp_path / "markers"
    markers.mkdir()
    assert _poison_records(context().store, markers) == stages

    with warnings_of("infra.stage") as warnings:
        outcome = convert(tiny_params(tiny_source))
    assert list(markers.iterdir()) == []  # nothing was unpickled
    assert set(outcome.cache.values()) == {"miss"}
    assert sum("was refused: it names serializer 'pickle'" in message for message in warnings) == stages
    assert set(convert(tiny_params(tiny_source)).cache.values()) == {"hit"}  # the new records are used


def _registered_bytes(model_version: str) -> bytes:
    from flows.convert import registered_checkpoint

    ref = registered_checkpoint(model_version)
    return (Path(ref.uri.removeprefix("file://")) / "model.safetensors").read_bytes()


@pytest.mark.services
@pytest.mark.slow
def test_uncached_stages_never_overwrite_a_registered_checkpoint(local_env, tiny_source, tiny_params, monkeypatch):
    """Cache lookups that fail (S3 GETs that keep failing, too many stale records) leave the stages uncached; two
    configs run that way must still write their checkpoints to paths of their own."""
    from flows.convert import convert
    from infra import stage as common

    def lookup_fails(key, store):
        raise OSError("GET prefect-results/... failed 3 times")

    monkeypatch.setattr(common, "record_problem", lookup_fails)
    with warnings_of("infra.stage") as warnings:
        first = convert(tiny_params(tiny_source, name="shared-name"))
    assert "svd-init: cannot read its cache records (OSError: GET prefect-results/... failed 3 times); the stage " \
           "runs uncached" in warnings
    registered = _registered_bytes(first.model_version)
    second = convert(tiny_params(tiny_source, name="shared-name", kv_rank=2))
    assert second.checkpoint.uri != first.checkpoint.uri and second.model_version != first.model_version
    assert _registered_bytes(first.model_version) == registered
    assert "uncached" in first.checkpoint.uri and "uncached" in second.checkpoint.uri


@pytest.mark.services
@pytest.mark.slow
def test_a_registered_version_found_corrupt_is_pointed_at_the_good_copy(local_env, tiny_source, tiny_params):
    from flows.convert import convert, registered_checkpoint

    first = convert(tiny_params(tiny_source, name="tiny-mla"))
    weights = Path(first.checkpoint.uri.removeprefix("file://")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"bit rot!")
    with pytest.raises(DigestMismatchError, match="no longer hash"):
        registered_checkpoint(first.model_version)  # a registered version's bytes are checked on load
    marked = MlflowClient().get_model_version("tiny-mla", "1").tags["mha2mla.integrity"]
    assert marked.startswith(f"corrupt: {first.checkpoint.uri}")

    second = convert(tiny_params(tiny_source, name="tiny-mla"))  # svd-init is found stale and runs again
    assert second.cache["svd-init"] == "miss" and second.checkpoint.uri != first.checkpoint.uri
    assert second.model_version == first.model_version == "tiny-mla/1"  # the same bytes: the same version
    version = MlflowClient().get_model_version("tiny-mla", "1")
    assert "mha2mla.integrity" not in version.tags
    assert version.tags["mha2mla.repointed_from"] == first.checkpoint.uri
    assert registered_checkpoint("tiny-mla/1").uri == second.checkpoint.uri


@pytest.mark.services
@pytest.mark.slow
def test_a_version_marked_corrupt_is_superseded_by_the_next_one(local_env, tiny_source, tiny_params):
    from flows.convert import convert, registered_checkpoint
    from infra.tracking import mark_registered

    first = convert(tiny_params(tiny_source, name="tiny-mla"))
    assert mark_registered(first.checkpoint.uri, "corrupt: found by hand") == ["tiny-mla/1"]
    second = convert(tiny_params(tiny_source, name="tiny-mla", kv_rank=2))
    assert second.model_version == "tiny-mla/2"
    assert MlflowClient().get_model_version("tiny-mla", "1").tags["mha2mla.superseded_by"] == "tiny-mla/2"
    with pytest.raises(DigestMismatchError, match="use the version registered in its place: tiny-mla/2"):
        registered_checkpoint("tiny-mla/1")
