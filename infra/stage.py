"""How a stage runs under Prefect: the typed result, the content-hash cache policy, result storage, retries, and
the stage's MLflow run.

A stage is a function decorated with `stage_task`: it loads its inputs by URI, calls one core function, writes its
outputs to the artifact store and returns a `StageOutput` (artifact refs, metrics, datasets). The decorator opens
the stage's MLflow run (nested under the flow's, named by the `RunLink`), turns the output into the frozen
`StageResult` that Prefect caches (URIs, sha256 digests, metrics: never a model or a tensor) and logs it:

    @stage_task("score-rope", code=("mha2mla_core.conversion.convert",), params=lambda seq_len, **_: {"seq_len": seq_len})
    def score_rope(model: ModelSource, calibration: StageResult, seq_len: int, run: RunLink) -> StageOutput:
        scores = score_pairs(load_source(model)[0], load_tensors(calibration)["input_ids"], seq_len)
        return StageOutput(save_tensors({"scores": scores}, artifact_key(model.slug, "score-rope", "scores")))

Cache key of a stage call = sha256 of
- its inputs' digests: a `StageResult` counts as its output's sha256, a `ModelSource` / `DataSource` as its
  content digest, a config as its canonical JSON; the `RunLink` (where to log) does not count;
- the stage's code (`infra.code_digest`): the source of the task module, of the core modules it names and of every
  core module those import, plus the versions of the third-party libraries the core imports.

A cached result is reused only if every artifact it names still hashes to its recorded digest. A record whose
artifacts are missing or changed is skipped: the key is re-derived from it, so the stage runs again and its
new record lives beside the stale one (a later run finds the stale record, re-derives, and hits the new one).
Registered model versions that point at a corrupt artifact are tagged `mha2mla.integrity`.

Result records (`infra.stage_records`: JSON only, their artifact URIs relative to the store) are kept in the
artifact store itself under `prefect-results/`, so every process and every worker that shares the store shares
the cache; a record that is not exactly a JSON record of a `StageResult` is refused, with a warning, as a cache
miss. Records are write-once: of two writers of one key, the first one's record stays (both are valid).

Every stage call (each attempt) writes its artifacts to a folder of its own, `stages/SLUG/STAGE/KEY16/RUN`, so no
path ever holds two contents: two runs of one key at once, a retry, or an uncached call cannot overwrite what
another result, or a registered version, points at.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable

import anyio.to_thread
from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from prefect.tasks import exponential_backoff
from prefect.transactions import get_transaction
from pydantic import BaseModel, ConfigDict

from infra import tracking
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
from infra.code_digest import code_digest
from infra.settings import Settings
from infra.stage_records import (
    STORE_URI,
    DatasetInput,
    StageResult,
    UnsafeRecordError,
    in_store,
    parse_record,
    relocate,
)

logger = logging.getLogger(__name__)

RESULTS_PREFIX = "prefect-results"
STAGES_PREFIX = "stages"
_REKEY_LIMIT = 8  # stale records skipped per key before the stage gives up caching


class RunLink(BaseModel):
    """Where a stage logs (its MLflow parent run) and under which label; not part of any cache key."""

    model_config = ConfigDict(frozen=True)

    parent_run_id: str
    label: str = ""  # e.g. "original" / "mla" for the two evaluate calls

    def run_name(self, stage: str) -> str:
        return f"{stage}[{self.label}]" if self.label else stage


class Memo:
    """The last `size` values loaded (models), by content digest; one loader runs per digest at a time.

    With `max_bytes`, the oldest values are also dropped while the host-memory tensors of all of them (`host_bytes`)
    exceed it; the newest always stays. A value a stage still uses lives on until the stage lets it go."""

    def __init__(self, size: int, max_bytes: float | None = None):
        self.size, self.max_bytes, self.items, self.lock = size, max_bytes, OrderedDict(), threading.Lock()
        self.key_locks: dict[str, threading.Lock] = {}

    def get(self, digest: str, load: Callable[[], Any]) -> Any:
        with self.lock:
            key_lock = self.key_locks.setdefault(digest, threading.Lock())
        with key_lock:
            with self.lock:
                if digest in self.items:
                    self.items.move_to_end(digest)
                    return self.items[digest]
            value = load()
            self.put(digest, value)
            return value

    def peek(self, digest: str) -> Any | None:
        """The value kept for `digest`, or None; loads nothing."""
        with self.lock:
            return self.items.get(digest)

    def put(self, digest: str, value: Any) -> None:
        with self.lock:
            self.items[digest] = value
            self.items.move_to_end(digest)
            while len(self.items) > self.size or (len(self.items) > 1 and self._over_budget()):
                dropped, _ = self.items.popitem(last=False)
                logger.info("model memo: let %s go (over %d models or the memo's memory budget)", dropped[:16], self.size)

    def _over_budget(self) -> bool:
        return self.max_bytes is not None and host_bytes(*self.items.values()) > self.max_bytes


def host_bytes(*values: Any) -> int:
    """Bytes of the CPU tensors of the modules in `values` (modules, or tuples holding them), each tensor once: a
    converted model shares its source's embeddings and MLPs."""
    import torch

    items = [v for value in values for v in (value if isinstance(value, tuple) else (value,))]
    modules = [v for v in items if isinstance(v, torch.nn.Module)]
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers()) if t.device.type == "cpu"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


MEMO_MODELS = 3  # models the stages of a process keep loaded (a flow's source, its checkpoints)


@dataclass(frozen=True)
class StageContext:
    """The process's deployment settings, the artifact store they point at, and the models its stages loaded."""

    settings: Settings
    store: ArtifactStore
    models: Memo


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
    return StageContext(settings=settings, store=store, models=Memo(MEMO_MODELS, memo_budget_bytes(settings)))


def memo_budget_bytes(settings: Settings) -> float:
    """`MHA2MLA_MODEL_MEMO_MAX_GIB` in bytes, or half of this machine's memory."""
    import psutil

    if settings.model_memo_max_gib is not None:
        return settings.model_memo_max_gib * 2**30
    return psutil.virtual_memory().total / 2



@dataclass(frozen=True)
class StageOutput:
    """What a stage function returns; `stage_task` makes it the stage's StageResult."""

    output: ArtifactRef  # the primary artifact
    files: dict[str, ArtifactRef] = field(default_factory=dict)  # side artifacts (plots), logged to MLflow by name
    metrics: dict[str, float] = field(default_factory=dict)
    datasets: tuple[DatasetInput, ...] = ()


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


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_problem(key: str, store: ArtifactStore) -> str | None:
    """Why the record of cache `key` cannot be used (refused, or its artifacts missing or changed); None when it
    can, or when there is none. Registered versions of a corrupt artifact are marked as such."""
    uri = store.uri(safe_key(RESULTS_PREFIX, key))
    if not store.exists(uri):
        return None
    try:
        result = parse_record(in_store(store.get_bytes(uri), store))
    except UnsafeRecordError as exc:
        return f"was refused: {exc}"
    broken = [ref for ref in result.refs() if not _intact(ref, store)]
    if not broken:
        return None
    for ref in broken:
        for version in tracking.mark_registered(ref.uri, f"corrupt: {ref.uri} no longer hashes to {ref.sha256}"):
            logger.warning("registered model %s points at the corrupt %s; tagged %s", version, ref.uri, tracking.INTEGRITY_TAG)
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
        content = in_store(store.get_bytes(store.uri(safe_key(RESULTS_PREFIX, path))), store)
        parse_record(content)
        return content

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        """Write-once: when another run stored a record of this key first, that one stays."""
        try:
            store = context().store
            store.put_bytes(relocate(content, store.root + "/", STORE_URI), safe_key(RESULTS_PREFIX, path))
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


class StagePeakMemory:
    """The process's peak host memory (RSS) and GPU memory (what torch's allocator reserves, on every visible GPU),
    sampled every `interval` seconds while the block runs: a stage's metrics `memory.peak_rss_gib` and
    `memory.peak_gpu_gib`. Sampled rather than reset (unlike the evaluation's `PeakMemory`, which resets torch's
    peak counters), so stages running at once in one process never clear each other's figures; each reports the
    process's peak while it ran. A stage's torchrun ranks are other processes and log their own figures."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.interval, self.rss, self.gpu = interval, 0, 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        import torch  # imported by every stage already; not at infra's import time

        self.rss = max(self.rss, self._process.memory_info().rss)
        if torch.cuda.is_initialized():
            self.gpu = max(self.gpu, sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count())))

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "StagePeakMemory":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def metrics(self) -> dict[str, float]:
        gib = 2**30
        return {"memory.peak_rss_gib": self.rss / gib, **({"memory.peak_gpu_gib": self.gpu / gib} if self.gpu else {})}


RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=1)  # 1, 2, 4 s (+ jitter)


def stage_task(name: str, *, code: tuple[str, ...], params: Callable[..., Mapping[str, Any]] | None = None) -> Callable:
    """The decorator of every stage: content-hash caching, JSON results in the store, transient retries, and the
    stage's MLflow run.

    The function takes a `run: RunLink` and returns a StageOutput. Each call runs inside a stage run nested under
    `run.parent_run_id`, with `params(**arguments)` as its params (the stage's resolved config), and returns the
    StageResult, logged to that run. `code`: the core modules the stage calls (part of the cache key)."""

    def decorate(fn: Callable[..., StageOutput]) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run_stage(*args: Any, **kwargs: Any) -> StageResult:
            arguments = signature.bind(*args, **kwargs).arguments
            link: RunLink = arguments["run"]
            logged = dict(params(**arguments)) if params else {}
            with tracking.stage_run(link.run_name(name), logged, parent_run_id=link.parent_run_id):
                with StagePeakMemory() as peak:
                    out = fn(*args, **kwargs)
                result = StageResult(stage=name, output=out.output, files=out.files,
                                     metrics={**out.metrics, **peak.metrics()}, params=logged, datasets=out.datasets)  # fmt: skip
                log_stage(result, cached=False)
                return result

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
        )(run_stage)

    return decorate


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
    tracking.log_metrics(result.metrics)
    store = context().store
    tracking.log_output(result.output, key=store.key_of(result.output.uri))
    tracking.set_tags({tracking.CACHE_TAG: "hit" if cached else "miss"})
    for dataset in result.datasets:
        tracking.log_dataset(dataset.name, dataset.digest, dataset.source, context=dataset.context)
    with scratch_dir() as tmp:
        for name, ref in result.files.items():
            tracking.log_file(store.get_file(ref.uri, tmp / name, sha256=ref.sha256))


def log_cache_hit(result: StageResult, run: RunLink) -> None:
    """A stage served from the cache gets its own stage run too, with the result's params, tagged as a hit."""
    with tracking.stage_run(run.run_name(result.stage), result.params, parent_run_id=run.parent_run_id):
        log_stage(result, cached=True)

