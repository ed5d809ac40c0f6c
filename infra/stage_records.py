"""What a stage returns (`StageResult`) and how its cache record is stored: JSON only, read safely, and relative to
the store that holds it.

Result records are JSON (Prefect's JSON serializer, never pickle). Anyone who can write to the store can write a
record, so a record reaches Prefect's deserializer only if it is exactly a JSON record of a `StageResult`
(`parse_record`): one naming another serializer (pickle runs code as it loads), other decoder hooks or another
class is refused. A stored record names its artifacts relative to its store (`STORE_URI`), so that a store copied
or moved elsewhere still serves its cache from its own place (`relocate`, `in_store`).
"""

from __future__ import annotations

import json
from typing import Any

from prefect.serializers import JSONSerializer
from pydantic import BaseModel, ConfigDict, ValidationError

from infra.artifacts import ArtifactRef, ArtifactStore


class DatasetInput(BaseModel):
    """A dataset a stage read, as MLflow's `log_input` records it."""

    model_config = ConfigDict(frozen=True)

    name: str
    digest: str  # sha256 of the content the stage used
    source: str  # where it came from: package file, local path, s3:// URI or hub id
    context: str = "training"


class StageResult(BaseModel):
    """What a stage returns through Prefect: small, frozen, JSON."""

    model_config = ConfigDict(frozen=True)

    stage: str
    output: ArtifactRef  # the primary artifact (safetensors, a model directory, or JSON)
    files: dict[str, ArtifactRef] = {}  # side artifacts (plots, tables), logged to MLflow by name
    metrics: dict[str, float] = {}
    params: dict[str, Any] = {}  # the stage's resolved config
    datasets: tuple[DatasetInput, ...] = ()

    @property
    def uri(self) -> str:
        return self.output.uri

    @property
    def sha256(self) -> str:
        return self.output.sha256

    def cache_token(self) -> str:
        return self.output.sha256

    def refs(self) -> list[ArtifactRef]:
        return [self.output, *self.files.values()]


class UnsafeRecordError(ValueError):
    """A result record that is not a JSON record of a StageResult; it never reaches Prefect's deserializer."""


_RECORD_SERIALIZER = JSONSerializer().model_dump(mode="json")  # the only serializer a record may name
_RESULT_CLASS = f"{StageResult.__module__}.{StageResult.__qualname__}"
_DECODER_KEYS = ("__class__", "__exc_type__")  # keys that make Prefect's JSON decoder import and build a type


def parse_record(content: bytes) -> StageResult:
    """The StageResult of a result record, read with plain `json` (nothing imported, nothing run); raise
    UnsafeRecordError for anything else: another serializer (pickle), other decoder hooks, another class."""
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UnsafeRecordError(f"not a JSON result record ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(serializer, dict) or serializer.get("type") != _RECORD_SERIALIZER["type"]:
        named = serializer.get("type") if isinstance(serializer, dict) else serializer
        raise UnsafeRecordError(f"it names serializer {str(named)[:40]!r}, not {_RECORD_SERIALIZER['type']!r}")
    if serializer != _RECORD_SERIALIZER:
        changed = sorted(k for k in {*serializer, *_RECORD_SERIALIZER} if serializer.get(k) != _RECORD_SERIALIZER.get(k))
        raise UnsafeRecordError(f"its JSON serializer has other settings: {', '.join(changed)[:120]}")
    try:
        payload = json.loads(record["result"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UnsafeRecordError(f"its result is not JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(payload, dict) or set(payload) != {"__class__", "data"} or payload["__class__"] != _RESULT_CLASS:
        named = payload.get("__class__") if isinstance(payload, dict) else type(payload).__name__
        raise UnsafeRecordError(f"its result is {str(named)[:80]!r}, not a {_RESULT_CLASS}")
    if _names_a_type(payload["data"]):
        raise UnsafeRecordError(f"its {_RESULT_CLASS} holds objects with {' or '.join(_DECODER_KEYS)} (a Python type)")
    try:
        return StageResult.model_validate(payload["data"])
    except ValidationError as exc:
        raise UnsafeRecordError(f"its result is not a valid StageResult ({exc.error_count()} errors)") from None


STORE_URI = "mha2mla-store:"  # what a stored record writes for the root of the store that holds it


def relocate(content: bytes, old: str, new: str) -> bytes:
    """A result record with each artifact URI that starts with `old` starting with `new` instead; other content
    as it is (`parse_record` judges it). Records are stored with their URIs relative to the store (`STORE_URI`),
    so that a store copied or moved elsewhere still serves its cache from its own place."""
    try:
        record = json.loads(content)
        record["result"] = json.dumps(_moved_uris(json.loads(record["result"]), old, new))
    except (ValueError, KeyError, TypeError):
        return content
    return json.dumps(record).encode()


def in_store(content: bytes, store: ArtifactStore) -> bytes:
    """A stored record with its artifact URIs resolved against `store`'s root."""
    return relocate(content, STORE_URI, store.root + "/")


def _moved_uris(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: new + v.removeprefix(old) if k == "uri" and isinstance(v, str) and v.startswith(old)
                else _moved_uris(v, old, new) for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_moved_uris(v, old, new) for v in value]
    return value


def _names_a_type(value: Any) -> bool:
    if isinstance(value, dict):
        return any(key in value for key in _DECODER_KEYS) or any(_names_a_type(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_a_type(v) for v in value)
    return False
