"""Thin MLflow wrapper, the one module of the pipeline that imports mlflow: a parent run per flow, a nested run per
stage, artifacts of a run (`log_json`, `log_text`, `log_file`), the registry, lineage lookups.

    configure(settings)
    with parent_run("smollm2-135m", params=config) as flow_id:
        with stage_run("svd-init", stage_config, parent_run_id=flow_id) as stage_id:
            log_dataset("calibration", calib_ref.sha256, calib_ref.uri)
            ...
            log_output(ckpt_ref, key)          # key: the output's key in the artifact store
        log_metrics(headline)                      # on the flow's run: what the runs table sorts by
        register_checkpoint(local_dir, ckpt_ref, "smollm2-135m-mla-...", description="...", champion=passed)

- MLflow's active run is per thread, so a stage running in a Prefect worker thread or another
  process passes `parent_run_id` explicitly; inside the `with`, fluent `mlflow.*` calls and the
  helpers below act on the stage run.
- Parent runs carry tag `mha2mla.kind=flow` plus the code and library versions (`run_tags`);
  stage runs carry `mha2mla.kind=stage` and `mha2mla.stage=NAME`.
- A stage records its primary output with `log_output(ref, key)` (tags `mha2mla.output_uri`,
  `mha2mla.output_sha256` and `mha2mla.output_key`); `lineage(uri)` finds that run (in a copied or moved store
  by its key, or its digest), then its flow and sibling stages.
- A sqlite store copied or moved with its `mlruns/` is re-pointed at the copy on `configure` (`_rehome`).
- A checkpoint is registered as an MLflow model: a pyfunc that generates (`infra/mlflow_model.py`, logged as
  code) with the Hugging Face folder as its artifact, a signature, a description, the tags
  `mha2mla.checkpoint_uri` / `mha2mla.checkpoint_sha256` and the alias `candidate` (`champion` when the
  flow's quality gate passed). `mlflow.pyfunc.load_model("models:/NAME@candidate")` loads it.
- Params are flattened (`{"mla": {"rank": 8}}` -> `mla.rank`) and secrets are dropped: SecretStr
  values, keys that name a secret, passwords inside URIs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import platform
import re
import sqlite3
import subprocess
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from pydantic import BaseModel, SecretBytes, SecretStr

from infra.artifacts import MANIFEST_NAME, ArtifactRef, sha256_file
from infra.locks import file_lock
from infra.settings import Settings, check_local_store, redact_uri, sqlite_path

log = logging.getLogger(__name__)

KIND_TAG = "mha2mla.kind"  # "flow" | "stage"
STAGE_TAG = "mha2mla.stage"
OUTPUT_URI_TAG = "mha2mla.output_uri"
OUTPUT_SHA256_TAG = "mha2mla.output_sha256"
OUTPUT_KEY_TAG = "mha2mla.output_key"  # the output's key in its store: found again in a copy of the store
DATASET_SHA256_TAG = "mha2mla.sha256"  # MLflow keeps only 36 chars of a dataset digest
CODE_VERSION_TAG = "mha2mla.code_version"
CACHE_TAG = "mha2mla.cache"  # on a stage run: "hit" (served from the cache) or "miss" (ran, wrote its outputs)
CHECKPOINT_URI_TAG = "mha2mla.checkpoint_uri"  # on a registered model version: the artifact-store checkpoint
CHECKPOINT_SHA256_TAG = "mha2mla.checkpoint_sha256"
CHECKPOINT_TAGS = (CHECKPOINT_URI_TAG, CHECKPOINT_SHA256_TAG)
INTEGRITY_TAG = "mha2mla.integrity"  # on a registered version whose checkpoint was found corrupt
CANDIDATE, CHAMPION = "candidate", "champion"  # registry aliases: every new version, and the ones that pass the gate
MODEL_CODE = Path(__file__).resolve().with_name("mlflow_model.py")
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "prompt")]),
    outputs=Schema([ColSpec(DataType.string, "text")]),
    params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, 32), ParamSpec("temperature", DataType.double, 0.0),
                        ParamSpec("top_p", DataType.double, 1.0)]),
)  # fmt: skip
MODEL_REQUIREMENTS = ("torch", "transformers", "mlflow", "pandas", "safetensors")
LIBRARIES = ("torch", "transformers", "prefect", "mlflow", "boto3")
# a key naming a secret; "token" only as a whole key or with a credential prefix (hf_token), not max_tokens
_SECRET_KEY = re.compile(
    r"secret|passw|credential|api_?key|access_key|private_key|^token$|(hf|auth|access|refresh|bearer|session|gh)_token$",
    re.I,
)
_MAX_PARAM = 6000  # MLflow's limit on a param value


def configure(settings: Settings, *, create: bool = True) -> str:
    """Point MLflow at `settings.tracking_uri`, select `settings.experiment` (created with
    `settings.experiment_artifact_location()` if new) and return its id. A sqlite database is
    created and migrated by one process at a time (two cold runs in one directory).

    `create=False` (commands that only read: runs, lineage, resume) raises LookupError where there is no store
    yet, instead of making an empty one. A sqlite store copied or moved with its `mlruns/` is pointed at the
    artifacts beside it (`_rehome`), so that its runs read, and new runs write, there; where that cannot be done,
    a writer gets a ValueError rather than writing new runs into the old folder."""
    if not create:
        check_store_exists(settings)
    with _sqlite_lock(settings.tracking_uri):
        mlflow.set_tracking_uri(settings.tracking_uri)
        client = MlflowClient()
        experiment = client.get_experiment_by_name(settings.experiment)
        if experiment is not None:
            if _moved(experiment.artifact_location, settings) and settings.mlflow_artifact_root is None:
                _rehome(sqlite_path(settings.tracking_uri), experiment.artifact_location,
                        settings.experiment_artifact_location())  # fmt: skip
            elif create:
                _check_artifact_location(experiment.artifact_location, settings)
            experiment_id = experiment.experiment_id
        else:
            location = settings.experiment_artifact_location()
            experiment_id = client.create_experiment(settings.experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _moved(location: str, settings: Settings) -> bool:
    """MLflow keeps an experiment's artifact location as an absolute URI: in a store copied or moved elsewhere it
    still names the old folder."""
    expected = settings.experiment_artifact_location()
    return bool(expected and expected.startswith("file://") and location.startswith("file://") and location != expected)


# (table, column) of MLflow's sqlite schema that hold artifact locations
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
                     ("model_versions", "storage_location"))  # fmt: skip


def _rehome(db: Path, old: str, new: str) -> None:
    """Point the artifact locations in MLflow's sqlite database `db` under `old` (the folder it was copied from)
    at `new` (the `mlruns/` beside it), in one transaction. Called under the database's lock."""
    log.info("the store was copied or moved: pointing its MLflow artifacts at %s (was %s)", new, old)
    with closing(sqlite3.connect(db)) as conn, conn:
        for table, column in _LOCATION_COLUMNS:
            try:
                conn.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                             f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                             (new, len(old) + 1, old, len(old) + 1, old + "/"))  # fmt: skip
            except sqlite3.OperationalError as exc:  # a table or column this MLflow version does not have
                log.info("MLflow's %s.%s not re-pointed: %s", table, column, exc)


def _check_artifact_location(location: str, settings: Settings) -> None:
    """A tracking server's experiment whose local artifact folder is another store's: refuse to write there."""
    if _moved(location, settings):
        expected = settings.experiment_artifact_location()
        raise ValueError(
            f"experiment {settings.experiment!r} keeps its run artifacts in {location}, not beside this store "
            f"({expected}): the store was copied or moved. Its runs stay readable (mha2mla runs, lineage); to run "
            f"here, set MHA2MLA_EXPERIMENT to a new name, whose artifacts will live beside this store"
        )


def check_store_exists(settings: Settings) -> None:
    """LookupError naming the store looked for when its sqlite database or experiment does not exist."""
    check_local_store(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    if MlflowClient().get_experiment_by_name(settings.experiment) is None:
        where = f"MHA2MLA_TRACKING_URI={redact_uri(settings.tracking_uri)}"
        raise LookupError(f"no experiment {settings.experiment!r} in the store at {where}: nothing has run there yet")


@contextmanager
def _sqlite_lock(tracking_uri: str) -> Iterator[None]:
    """An exclusive lock on `DB.lock` beside a sqlite database; nothing for a server."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    path = sqlite_path(tracking_uri)
    with file_lock(path.with_name(path.name + ".lock")):
        yield


@contextmanager
def parent_run(
    name: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[str]:
    """A flow's run, tagged with code and library versions; yields its run id."""
    all_tags = {**run_tags(), **(tags or {}), KIND_TAG: "flow"}
    with mlflow.start_run(run_name=name, tags=all_tags) as run:
        log_params(params or {})
        yield run.info.run_id


@contextmanager
def stage_run(
    name: str, params: Mapping[str, Any] | None = None, *, parent_run_id: str | None = None
) -> Iterator[str]:
    """A stage's run nested under `parent_run_id` (default: this thread's active run)."""
    if parent_run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError(f"stage_run({name!r}) needs parent_run_id or an active parent run")
        parent_run_id = active.info.run_id
    tags = {KIND_TAG: "stage", STAGE_TAG: name}
    with mlflow.start_run(
        run_name=name, nested=True, parent_run_id=parent_run_id, tags=tags
    ) as run:
        log_params(params or {})
        yield run.info.run_id


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings, pydantic models and dataclasses -> `a.b.c: str`, secrets dropped."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, (SecretStr, SecretBytes)) or _SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, BaseModel):
            value = dict(value)  # keeps SecretStr fields as such, so they are dropped above
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = _param_value(value)
    return flat


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = redact_uri(value)
    elif isinstance(value, (list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 3] + "..."


def log_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Log flattened params (secrets dropped) to the active run; return what was logged."""
    flat = flatten_params(params)
    if flat:
        mlflow.log_params(flat)
    return flat


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log numeric metrics (nested mappings flattened with '.') to the active run."""
    flat = {name: float(value) for name, value in _flatten_numbers(metrics, "")}
    if flat:
        mlflow.log_metrics(flat, step=step)


def _flatten_numbers(metrics: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            yield from _flatten_numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def log_dataset(name: str, digest: str, source_uri: str, *, context: str = "training") -> None:
    """Record a dataset input by name, sha256 and source, without loading the data.

    `source_uri` may be an artifact URI (file://, s3://), an http(s) URL, or a Hub dataset id.
    """
    dataset = MetaDataset(source=_dataset_source(source_uri), name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context, tags={DATASET_SHA256_TAG: digest})


def _dataset_source(source_uri: str) -> DatasetSource:
    scheme = urlsplit(source_uri).scheme
    if scheme in ("http", "https"):
        return HTTPDatasetSource(source_uri)
    if scheme in ("s3", "file"):
        source_type = "s3" if scheme == "s3" else "local"
        return get_dataset_source_from_json(json.dumps({"uri": source_uri}), source_type)
    return HuggingFaceDatasetSource(path=source_uri.removeprefix("hf://datasets/"))


def log_output(ref: ArtifactRef, key: str = "") -> None:
    """Tag the active (stage) run with its primary output and its key in the store, for `lineage(uri)`."""
    mlflow.set_tags({OUTPUT_URI_TAG: ref.uri, OUTPUT_SHA256_TAG: ref.sha256, **({OUTPUT_KEY_TAG: key} if key else {})})


def set_tags(tags: Mapping[str, str]) -> None:
    """Tag the active run."""
    mlflow.set_tags(dict(tags))


def log_file(path: str | Path) -> None:
    """Log a local file as an artifact of the active run, under its own name."""
    mlflow.log_artifact(str(path))


def log_json(obj: Any, artifact_file: str) -> None:
    """Log `obj` as a JSON artifact of the active run."""
    mlflow.log_dict(obj, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    """Log `text` as an artifact of the active run."""
    mlflow.log_text(text, artifact_file)


def log_table_markdown(rows: Sequence[Mapping[str, Any]], artifact_file: str) -> str:
    """Log `rows` as a markdown table artifact of the active run; return the markdown."""
    columns = list(dict.fromkeys(col for row in rows for col in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(col, "")) for col in columns) + " |")
    markdown = "\n".join(lines) + "\n"
    log_text(markdown, artifact_file)
    return markdown


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


@functools.cache
def code_version() -> str:
    """The git commit of this checkout (`-dirty` if tracked files changed), else the
    installed mha2mla package version."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return metadata.version("mha2mla")
    return commit + ("-dirty" if dirty else "")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


def run_tags() -> dict[str, str]:
    """Code version plus the versions of Python and the libraries the pipeline runs on."""
    tags = {CODE_VERSION_TAG: code_version(), "mha2mla.version.python": platform.python_version()}
    for library in LIBRARIES:
        try:
            tags[f"mha2mla.version.{library}"] = metadata.version(library)
        except metadata.PackageNotFoundError:
            tags[f"mha2mla.version.{library}"] = "absent"
    return tags


@dataclasses.dataclass(frozen=True)
class RegisteredCheckpoint:
    name: str
    version: int
    aliases: tuple[str, ...]
    logged: bool  # False: the version already existed (a rerun of the same checkpoint)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_checkpoint(
    directory: str | Path | None, ref: ArtifactRef, name: str, *, description: str = "", champion: bool = False
) -> RegisteredCheckpoint:
    """Register the Hugging Face folder `directory` (the checkpoint `ref`) as a version of model `name`: logged as
    a pyfunc model on the active run, unless a version of `name` already holds this checkpoint (then `directory`
    may be None). The version gets `description`, the checkpoint tags and the alias `candidate`; `champion` moves
    that alias to it too."""
    client = MlflowClient()
    version = checkpoint_version(name, ref.sha256)
    logged = version is None
    if version is None:
        if directory is None:
            raise ValueError(f"{name} has no version of checkpoint {ref.uri} yet; give its folder to log it")
        with warnings.catch_warnings():  # the signature is given; an input example would load the model to check it
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), artifacts={"checkpoint": str(directory)},
                signature=MODEL_SIGNATURE, pip_requirements=_requirements(),
            )  # fmt: skip
        tags = {CHECKPOINT_URI_TAG: ref.uri, CHECKPOINT_SHA256_TAG: ref.sha256}
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    if description:
        client.update_model_version(name, version.version, description=description)
    aliases = [CANDIDATE, CHAMPION] if champion else [CANDIDATE]
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    log.info("registered %s as model %s version %s (%s)", ref.uri, name, version.version, ", ".join(aliases))
    return RegisteredCheckpoint(name, int(version.version), tuple(aliases), logged)


def checkpoint_version(name: str, sha256: str) -> ModelVersion | None:
    """The version of registered model `name` that holds the checkpoint of digest `sha256`, if any."""
    filter_string = f"name = '{_quoted(name)}' and tags.`{CHECKPOINT_SHA256_TAG}` = '{_quoted(sha256)}'"
    versions = MlflowClient().search_model_versions(filter_string)
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _requirements() -> list[str]:
    """Pinned requirements of the pyfunc: the versions this process runs (local labels such as +cpu dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def resolve_checkpoint(target: str) -> tuple[str, str | None]:
    """(artifact URI, sha256 or None) from what a user holds: `models:/NAME/VERSION` or `models:/NAME@ALIAS` (the
    version's checkpoint tags), a local folder or file:// URI (its manifest's digest, when it is a stored
    checkpoint), or an s3:// URI (no digest)."""
    if target.startswith("models:/"):
        uri = resolve_checkpoint_uri(target)
        return uri, _registered_sha256(target)
    uri = resolve_checkpoint_uri(target)
    manifest = Path(unquote(urlsplit(uri).path)) / MANIFEST_NAME if uri.startswith("file://") else None
    return uri, sha256_file(manifest)[0] if manifest is not None and manifest.is_file() else None


def _registered_sha256(target: str) -> str | None:
    name, _, version = target.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    client = MlflowClient()
    found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return found.tags.get(CHECKPOINT_SHA256_TAG)


def resolve_checkpoint_uri(target: str) -> str:
    """An artifact URI from what a user holds: `models:/NAME/VERSION` or `models:/NAME@ALIAS` (the version's
    checkpoint tag), a local folder (its file:// URI), or an artifact URI as it is."""
    if target.startswith("models:/"):
        name, _, version = target.removeprefix("models:/").partition("/")
        name, _, alias = name.partition("@")
        client = MlflowClient()
        try:
            found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except MlflowException:
            raise LookupError(f"{target}: no such registered model version; `mha2mla runs` lists the flows") from None
        if CHECKPOINT_URI_TAG not in found.tags:
            raise LookupError(f"{target} was not registered by mha2mla (no {CHECKPOINT_URI_TAG} tag)")
        return found.tags[CHECKPOINT_URI_TAG]
    if urlsplit(target).scheme in ("file", "s3"):
        return target
    path = Path(target)
    if not path.exists():
        raise LookupError(f"{target}: not a models:/ URI, an artifact URI (file://, s3://) or an existing folder")
    return path.resolve().as_uri()


@dataclasses.dataclass(frozen=True)
class DatasetRecord:
    name: str
    sha256: str  # full digest when logged by log_dataset, else MLflow's digest
    source: str  # the source's JSON, e.g. {"uri": "s3://..."}
    context: str


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One MLflow run as the CLI shows it; `tags` holds ours (mha2mla.*), not mlflow.* ones."""

    run_id: str
    name: str
    status: str
    start_time: datetime
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    datasets: tuple[DatasetRecord, ...]
    parent_run_id: str | None


@dataclasses.dataclass(frozen=True)
class FlowRun:
    run: RunRecord
    stages: tuple[RunRecord, ...]  # by start time


@dataclasses.dataclass(frozen=True)
class Lineage:
    """What made the artifact at `uri`: the stage run that wrote it, its flow, every stage's
    params and datasets, and the registered model versions pointing at it."""

    uri: str
    sha256: str
    producer: RunRecord
    flow: FlowRun | None
    model_versions: tuple[str, ...]  # "name/version"
    key: str = ""  # its key in the store (resolve it against the store's root: the store may have moved since)


def lineage(target: str, root: str = "") -> Lineage:
    """The lineage of a checkpoint recorded with `log_output`, given as an artifact URI, a `models:/` URI or a local
    folder (`resolve_checkpoint_uri`); LookupError if none. The producer is the stage run that wrote it: the first
    one that logged it and was not served from the cache. A checkpoint of the store at `root` (its URI) is also
    found by its key, when the store was copied or moved since it was written; any other by its digest."""
    uri, sha256 = resolve_checkpoint(target)
    client = MlflowClient()
    runs = _search(client, f"tags.`{OUTPUT_URI_TAG}` = '{_quoted(uri)}'")
    if not runs and root and uri.startswith(root + "/"):
        runs = _search(client, f"tags.`{OUTPUT_KEY_TAG}` = '{_quoted(uri.removeprefix(root + '/'))}'")
    if not runs and sha256:
        runs = _search(client, f"tags.`{OUTPUT_SHA256_TAG}` = '{_quoted(sha256)}'")
        uri = runs[0].data.tags[OUTPUT_URI_TAG] if runs else uri
    if not runs:
        raise LookupError(f"no run logged output {uri}; is MHA2MLA_TRACKING_URI the right store?")
    writers = [run for run in runs if run.data.tags.get(CACHE_TAG) != "hit"] or runs
    producer = _record(min(writers, key=lambda run: run.info.start_time))
    flow = _flow(client, producer.parent_run_id) if producer.parent_run_id else None
    versions = client.search_model_versions(f"tags.`{CHECKPOINT_URI_TAG}` = '{_quoted(uri)}'")
    return Lineage(
        uri=uri,
        sha256=producer.tags.get(OUTPUT_SHA256_TAG, ""),
        producer=producer,
        flow=flow,
        model_versions=tuple(f"{v.name}/{v.version}" for v in versions),
        key=producer.tags.get(OUTPUT_KEY_TAG, ""),
    )


def stored_config(run_id: str, names: Sequence[str]) -> dict:
    """The first of the JSON artifacts `names` a flow run stored (its parameters: `resume` reruns them);
    LookupError naming the run when there is no such run or none of them."""
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as exc:  # unknown or malformed id
        raise LookupError(f"no MLflow run {run_id!r}; `mha2mla runs` lists them") from exc
    for name in names:
        try:
            return mlflow.artifacts.load_dict(f"{run_artifact_uri(run)}/{name}")
        except Exception:  # not this flow's file (MLflow raises several types for a missing artifact)
            continue
    raise LookupError(f"run {run_id} is not a convert or catalog flow run (no {' or '.join(names)} stored with it)")


def stored_params(run: RunRecord, name: str) -> dict[str, Any]:
    """A flow's parameters, flattened (`mla.kv_rank`), from the `name` JSON it stored (complete), else its MLflow
    params."""
    try:
        stored = stored_config(run.run_id, (name,))
    except LookupError:  # a run without the file (not a convert flow): fall back
        return run.params
    return _flat(stored["params"])


def _flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_artifact_uri(run: Run) -> str:
    """Where a run's artifacts are."""
    return run.info.artifact_uri


def recent_runs(limit: int = 20) -> list[FlowRun]:
    """The latest flow runs, newest first, each with its stage runs."""
    client = MlflowClient()
    flows = _search(client, f"tags.`{KIND_TAG}` = 'flow'", max_results=limit)
    return [_flow(client, run.info.run_id) for run in flows]


def _flow(client: MlflowClient, run_id: str) -> FlowRun:
    stages = _search(client, f"tags.`mlflow.parentRunId` = '{_quoted(run_id)}'")
    ordered = sorted((_record(run) for run in stages), key=lambda record: record.start_time)
    return FlowRun(run=_record(client.get_run(run_id)), stages=tuple(ordered))


def _search(client: MlflowClient, filter_string: str, max_results: int = 1000) -> list[Run]:
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(
        experiment_ids,
        filter_string=filter_string,
        max_results=max_results,
        order_by=["attributes.start_time DESC"],
    )


def _quoted(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"{value!r} holds a quote or backslash; no run can match it")
    return value


def _record(run: Run) -> RunRecord:
    tags = run.data.tags
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name,
        status=run.info.status,
        start_time=datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags={key: value for key, value in tags.items() if not key.startswith("mlflow.")},
        datasets=tuple(_dataset_record(inp) for inp in run.inputs.dataset_inputs),
        parent_run_id=tags.get("mlflow.parentRunId"),
    )


def _dataset_record(dataset_input: Any) -> DatasetRecord:
    tags = {tag.key: tag.value for tag in dataset_input.tags}
    dataset = dataset_input.dataset
    return DatasetRecord(
        name=dataset.name,
        sha256=tags.get(DATASET_SHA256_TAG, dataset.digest),
        source=dataset.source,
        context=tags.get("mlflow.data.context", ""),
    )


# ------------------------------------------------------------------------------ registry integrity
SUPERSEDED_TAG = "mha2mla.superseded_by"  # on a version marked corrupt: the version registered in its place
REPOINTED_TAG = "mha2mla.repointed_from"  # on a version pointed at a good copy: the corrupt copy it pointed at


def model_versions(name: str) -> list[ModelVersion]:
    """Every version of registered model `name`."""
    return MlflowClient().search_model_versions(f"name = '{_quoted(name)}'")


def model_version_of(name: str, number: str | int) -> ModelVersion:
    return MlflowClient().get_model_version(name, str(number))


def settle_corrupt_versions(versions: Sequence[ModelVersion], number: int, good: ArtifactRef) -> None:
    """After `good` was registered as version `number`: of `versions` marked corrupt (`mha2mla.integrity`), the one
    that holds `good`'s bytes is pointed at `good` (`repoint`); the others get `mha2mla.superseded_by` = it."""
    client = MlflowClient()
    for version in versions:
        if INTEGRITY_TAG not in version.tags or SUPERSEDED_TAG in version.tags:
            continue
        if int(version.version) == int(number):
            repoint(version, good)
        else:
            client.set_model_version_tag(version.name, version.version, SUPERSEDED_TAG, f"{version.name}/{number}")


def repoint(version: ModelVersion, good: ArtifactRef) -> None:
    """Point a registered version whose checkpoint copy was found corrupt at a good copy of the same bytes: its
    checkpoint tag becomes `good.uri`, the mark goes, `mha2mla.repointed_from` keeps the corrupt copy's URI."""
    corrupt, sha256 = registered_source(version)
    if sha256 != good.sha256:
        raise ValueError(f"{version.name}/{version.version} holds sha256 {sha256}, not {good.sha256}; not re-pointed")
    client = MlflowClient()
    client.set_model_version_tag(version.name, version.version, REPOINTED_TAG, corrupt)
    client.set_model_version_tag(version.name, version.version, CHECKPOINT_TAGS[0], good.uri)
    client.delete_model_version_tag(version.name, version.version, INTEGRITY_TAG)


def registered_source(version) -> tuple[str, str]:
    """(artifact URI, sha256) of the checkpoint a registered MLflow model version stands for: its checkpoint
    tags, or for a version registered straight from the store, its source and `sha256` tag."""
    uri_tag, sha_tag = CHECKPOINT_TAGS
    return version.tags.get(uri_tag, version.source), version.tags.get(sha_tag, version.tags.get("sha256", ""))


def mark_registered(uri: str, note: str) -> list[str]:
    """Tag every registered model version whose checkpoint is `uri` with `mha2mla.integrity=note`; "name/version"s."""
    client, marked = MlflowClient(), []
    quoted = uri.replace("'", "")  # a store URI holds no quote (safe_key); never let one end the filter
    found = {(v.name, v.version): v for filter_string in (f"source_path = '{quoted}'", f"tags.`{CHECKPOINT_TAGS[0]}` = '{quoted}'")
             for v in client.search_model_versions(filter_string)}  # fmt: skip
    for (name, number), version in sorted(found.items()):
        if registered_source(version)[0] == uri:
            client.set_model_version_tag(name, number, INTEGRITY_TAG, note)
            marked.append(f"{name}/{number}")
    return marked
