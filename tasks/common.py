"""What every stage task shares: the typed result, the content-hash cache policy, retries, result storage.

A stage task loads its inputs by URI, calls one core function, writes its outputs to the artifact store and
returns a `StageResult` (URIs, sha256 digests, metrics): never a model or a tensor.

Cache key of a stage call = sha256 of
- its inputs' digests: a `StageResult` counts as its output's sha256, a `ModelSource` / `DataSource` as its
  content digest, a config as its canonical JSON; the `RunLink` (where to log) does not count;
- the stage's code: the source bytes of the task module, of the core modules it names, and of every
  `mha2mla_core` module those import (followed transitively, lazy imports inside functions too), plus the versions
  of the installed third-party distributions the core modules import (torch, transformers, lm_eval, ...).

A cached result is reused only if every artifact it names still hashes to its recorded digest. A record whose
artifacts are missing or changed is skipped: the key is re-derived from it, so the stage runs again and its
new record lives beside the stale one (a later run finds the stale record, re-derives, and hits the new one).
Registered model versions that point at a corrupt artifact are tagged `mha2mla.integrity`.

Result records are JSON (Prefect's JSON serializer, never pickle), kept in the artifact store itself under
`prefect-results/`, so every process and every worker that shares the store shares the cache. Anyone who can
write to the store can write a record, so a record reaches Prefect's deserializer only if it is exactly a JSON
record of a `StageResult` (`parse_record`): one naming another serializer (pickle runs code as it loads), other
decoder hooks or another class is refused, with a warning, as a cache miss. Records are write-once: of two
writers of one key, the first one's record stays (both are valid).

Every stage call (each attempt) writes its artifacts to a folder of its own, `stages/SLUG/STAGE/KEY16/RUN`, so no
path ever holds two contents: two runs of one key at once, a retry, or an uncached call cannot overwrite what
another result, or a registered version, points at.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import anyio.to_thread
from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from prefect.serializers import JSONSerializer
from prefect.tasks import exponential_backoff
from prefect.transactions import get_transaction
from pydantic import BaseModel, ConfigDict, ValidationError

from infra import tracking
from infra.tracking import CACHE_TAG, INTEGRITY_TAG, mark_registered
from infra.artifacts import (
    ArtifactConflictError,
    ArtifactRef,
    ArtifactStore,
    is_transient,
    open_store,
    owned_temp_dir,
    remove_orphans,
    safe_key,
    scratch_root,
)
from infra.settings import Settings

logger = logging.getLogger(__name__)

RESULTS_PREFIX = "prefect-results"
STAGES_PREFIX = "stages"
_REKEY_LIMIT = 8  # stale records skipped per key before the stage gives up caching
_CORE = "mha2mla_core"


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


class RunLink(BaseModel):
    """Where a stage logs (its MLflow parent run) and under which label; not part of any cache key."""

    model_config = ConfigDict(frozen=True)

    parent_run_id: str
    label: str = ""  # e.g. "original" / "mla" for the two evaluate calls

    def run_name(self, stage: str) -> str:
        return f"{stage}[{self.label}]" if self.label else stage


@dataclass(frozen=True)
class StageContext:
    """The process's deployment settings and the artifact store they point at."""

    settings: Settings
    store: ArtifactStore


@functools.cache
def context() -> StageContext:
    """Built once per process from `MHA2MLA_*` (tests call `context.cache_clear()` after changing them).

    Fails here, before any heavy work, when the store is unreachable or its bucket is missing.
    """
    settings = Settings()
    store = open_store(settings.artifact_root, settings)
    tracking.configure(settings)
    for path in remove_orphans(scratch_root(settings)):
        logger.info("removed %s, left by a process that was killed", path)
    return StageContext(settings=settings, store=store)


# ----------------------------------------------------------------------------------------------- cache key


def cache_payload(value: Any) -> Any:
    """The part of a task input that its cache key hashes (see the module docstring)."""
    if isinstance(value, RunLink):
        return None
    if hasattr(value, "cache_token"):
        return value.cache_token()
    if isinstance(value, BaseModel):
        return {k: cache_payload(v) for k, v in value.model_dump(mode="json").items()}
    if is_dataclass(value) and not isinstance(value, type):
        return cache_payload(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): cache_payload(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [cache_payload(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"task input of type {type(value).__name__} cannot be part of a cache key; pass a config")


@functools.cache
def code_digest(modules: tuple[str, ...]) -> str:
    """sha256 of the source of `modules` and of the core modules they import, and of the versions of the
    third-party distributions the core modules import (see the module docstring)."""
    sources, libraries = _code_closure(modules)
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + sources[name])
    for library in sorted(libraries):
        digest.update(f"{library}={_distribution_version(library)}".encode())
    return digest.hexdigest()


def _code_closure(modules: tuple[str, ...]) -> tuple[dict[str, bytes], set[str]]:
    """{module: source} of `modules` plus every `mha2mla_core` module reachable by imports, and the top-level names
    of the other modules the core ones import. Core files are found on disk: nothing is imported."""
    sources: dict[str, bytes] = {}
    libraries: set[str] = set()
    pending = list(modules)
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        sources[name] = _module_file(name).read_bytes()
        for imported in _imports(sources[name]):
            if imported.split(".")[0] == _CORE:
                pending.append(imported)
            elif name.split(".")[0] == _CORE and imported.split(".")[0] not in sys.stdlib_module_names:
                libraries.add(imported.split(".")[0])
    return sources, libraries


@functools.cache
def _core_root() -> Path:
    return Path(importlib.util.find_spec(_CORE).origin).parent  # finding a top-level package does not import it


def _module_file(name: str) -> Path:
    if name.split(".")[0] == _CORE:
        root = _core_root()
        base = root.joinpath(*name.split(".")[1:])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        raise ModuleNotFoundError(f"cache key: module {name} not found under {root}")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"cache key: module {name} not found")
    return Path(spec.origin)


def _imports(source: bytes) -> set[str]:
    """Absolute module names a source imports; in the core, the modules that define what it takes (see
    `_core_targets`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            core = node.module.split(".")[0] == _CORE
            names.update(_core_targets(node.module, [a.name for a in node.names]) if core else {node.module})
    return names


def _core_targets(module: str, imported: list[str]) -> set[str]:
    """The core modules `from module import *imported*` depends on: a submodule it names, or for a name a package
    re-exports, the module that defines it, not every module the package's `__init__` imports."""
    if _module_file(module).name != "__init__.py":
        return {module}
    exports = _package_exports(module)
    targets = set()
    for name in imported:
        if _is_core_module(f"{module}.{name}"):
            targets.add(f"{module}.{name}")
        else:
            targets.add(exports.get(name, module))  # defined in the package itself: all of it
    return targets


@functools.cache
def _package_exports(package: str) -> dict[str, str]:
    """{name: defining module} of the names a core package's `__init__` imports from the core."""
    tree = ast.parse(_module_file(package).read_bytes())
    return {alias.asname or alias.name: node.module for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith(_CORE)
            for alias in node.names}  # fmt: skip


def _is_core_module(name: str) -> bool:
    try:
        _module_file(name)
    except ModuleNotFoundError:
        return False
    return True


@functools.cache
def _distribution_version(top_level: str) -> str:
    """The installed version of the distribution that provides import name `top_level`; "-" where it is not
    installed (then it cannot have produced a cached result)."""
    try:
        return metadata.version(top_level)
    except metadata.PackageNotFoundError:
        if importlib.util.find_spec(top_level) is None:
            return "-"
        dists = _import_names_to_distributions().get(top_level, [])  # e.g. optimum -> optimum-quanto
        return ",".join(f"{d}={metadata.version(d)}" for d in sorted(set(dists))) or "-"


@functools.cache
def _import_names_to_distributions() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()  # scans every installed distribution: once, and only when needed


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def _names_a_type(value: Any) -> bool:
    if isinstance(value, dict):
        return any(key in value for key in _DECODER_KEYS) or any(_names_a_type(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_a_type(v) for v in value)
    return False


def record_problem(key: str, store: ArtifactStore) -> str | None:
    """Why the record of cache `key` cannot be used (refused, or its artifacts missing or changed); None when it
    can, or when there is none. Registered versions of a corrupt artifact are marked as such."""
    uri = store.uri(safe_key(RESULTS_PREFIX, key))
    if not store.exists(uri):
        return None
    try:
        result = parse_record(store.get_bytes(uri))
    except UnsafeRecordError as exc:
        return f"was refused: {exc}"
    broken = [ref for ref in result.refs() if not _intact(ref, store)]
    if not broken:
        return None
    for ref in broken:
        for version in mark_registered(ref.uri, f"corrupt: {ref.uri} no longer hashes to {ref.sha256}"):
            logger.warning("registered model %s points at the corrupt %s; tagged %s", version, ref.uri, INTEGRITY_TAG)
    return f"has missing or changed artifacts ({', '.join(ref.uri for ref in broken)})"


def _intact(ref: ArtifactRef, store: ArtifactStore) -> bool:
    try:
        return store.verify(ref)
    except (ValueError, OSError) as exc:  # an URI of another store, an unreadable object
        logger.info("cached artifact %s unusable: %s", ref.uri, exc)
        return False


@dataclass
class StageCachePolicy(CachePolicy):
    """Key = hash(input digests, stage config, stage code); a hit must pass `record_problem`."""

    code: tuple[str, ...] = ()  # core modules the stage calls

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        """The key; None (the stage runs uncached, writing to a folder of its own) when the records cannot be
        read or too many in a row are unusable."""
        name, fn = task_ctx.task.name, task_ctx.task.fn
        code = code_digest((fn.__module__, *self.code))
        key = _sha256_json({"stage": name, "code": code, "inputs": cache_payload(inputs)})
        store = context().store
        try:
            for _ in range(_REKEY_LIMIT):
                problem = record_problem(key, store)
                if problem is None:
                    return key
                logger.warning("%s: cache record %s/%s %s; treated as a cache miss, the stage runs again",
                               name, RESULTS_PREFIX, key, problem)  # fmt: skip
                key = _sha256_json({"stale": key})
        except (OSError, ClientError, BotoCoreError) as exc:
            logger.warning("%s: cannot read its cache records (%s: %s); the stage runs uncached",
                           name, type(exc).__name__, str(exc).splitlines()[0][:200])  # fmt: skip
            return None
        logger.warning("%s: %d unusable cache records in a row; the stage runs uncached (clear %s/)",
                       name, _REKEY_LIMIT, RESULTS_PREFIX)  # fmt: skip
        return None


# ------------------------------------------------------------------------------------------ result storage


class ArtifactResultStorage(WritableFileSystem):
    """Prefect result records in the artifact store (`prefect-results/KEY`), written atomically.

    The block holds no configuration (the store comes from the process's settings); Prefect needs it saved
    on the API before a task can name it, which `ensure_result_storage` does at the start of every flow.
    """

    _block_type_name = "mha2mla artifact result storage"

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        """The record's bytes, only if they are a JSON record of a StageResult (else UnsafeRecordError)."""
        store = context().store
        content = store.get_bytes(store.uri(safe_key(RESULTS_PREFIX, path)))
        parse_record(content)
        return content

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        """Write-once: when another run stored a record of this key first, that one stays."""
        try:
            context().store.put_bytes(content, safe_key(RESULTS_PREFIX, path))
        except ArtifactConflictError:
            logger.info("cache record %s/%s was written by another run first; keeping it", RESULTS_PREFIX, path)
        return path

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)


RESULT_STORAGE_NAME = "default"
RESULT_STORAGE = f"mha2mla-artifact-result-storage/{RESULT_STORAGE_NAME}"


def ensure_result_storage() -> None:
    """Save the (configuration-free) result storage block on the Prefect API, once per process."""
    if not _saved_result_storage():
        ArtifactResultStorage().save(RESULT_STORAGE_NAME, overwrite=True)
        _saved_result_storage.cache_clear()


@functools.cache
def _saved_result_storage() -> bool:
    try:
        ArtifactResultStorage.load(RESULT_STORAGE_NAME)
    except ValueError:  # no such block document on this API yet
        return False
    return True


# ------------------------------------------------------------------------------------------------ retries


def retry_transient(task_, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry S3 5xx / throttling / dropped connections, never bad input."""
    exc = state.result(raise_on_failure=False)
    transient = isinstance(exc, BaseException) and is_transient(exc)
    logger.info("%s failed with %s: %s", task_run.name, type(exc).__name__, "retrying" if transient else "not retried")
    return transient


RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=1)  # 1, 2, 4 s (+ jitter)


def stage_task(name: str, code: tuple[str, ...]) -> Callable:
    """The decorator of every stage: content-hash caching, JSON results in the store, transient retries."""
    return task(
        name=name,
        cache_policy=StageCachePolicy(code=code),
        persist_result=True,
        result_storage=RESULT_STORAGE,
        result_serializer="json",
        retries=RETRIES,
        retry_delay_seconds=RETRY_DELAYS,
        retry_jitter_factor=0.2,
        retry_condition_fn=retry_transient,
    )


# ------------------------------------------------------------------------------------------- writing

def _call_key() -> str:
    txn = get_transaction()
    return txn.key[:16] if txn is not None and txn.key else "uncached"


def _attempt() -> str:
    """`TASKRUN16.N`: this task run's id and attempt, the same for every artifact one attempt writes."""
    task_run = TaskRunContext.get().task_run
    return f"{task_run.id.hex[:16]}.{task_run.run_count}"


def artifact_key(slug: str, stage: str, name: str) -> str:
    """`stages/SLUG/STAGE/KEY16/RUN/NAME`: a folder per cache key and, inside it, per attempt, so that no path is
    ever written twice (see the module docstring)."""
    return safe_key(STAGES_PREFIX, slug, stage, _call_key(), _attempt(), name)


def work_dir(stage: str) -> Path:
    """A local folder for this stage call's scratch state that outlives the process (training checkpoints):
    `<prefect_home>/../work/STAGE/KEY16`."""
    path = Path(context().settings.prefect_home).resolve().parent / "work" / stage / _call_key()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def scratch_dir() -> Iterator[Path]:
    with owned_temp_dir(scratch_root(context().settings)) as tmp:
        yield Path(tmp)


def log_stage(result: StageResult, *, cached: bool) -> None:
    """Log a result to the active (stage) MLflow run: metrics, output tags, side artifacts, datasets."""
    import mlflow

    tracking.log_metrics(result.metrics)
    tracking.log_output(result.output)
    mlflow.set_tag(CACHE_TAG, "hit" if cached else "miss")
    for dataset in result.datasets:
        tracking.log_dataset(dataset.name, dataset.digest, dataset.source, context=dataset.context)
    store = context().store
    with scratch_dir() as tmp:
        for name, ref in result.files.items():
            mlflow.log_artifact(str(store.get_file(ref.uri, tmp / name, sha256=ref.sha256)))


def finish_stage(
    stage: str, output: ArtifactRef, *, params: BaseModel | Mapping | None = None, **fields: Any
) -> StageResult:
    """Build the stage's result and log it to the active stage run (a cache miss)."""
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    result = StageResult(stage=stage, output=output, params=dict(params or {}), **fields)
    log_stage(result, cached=False)
    return result
