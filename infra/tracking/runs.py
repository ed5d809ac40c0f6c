"""MLflow runs: where they are stored (`configure`: the experiment, a copied store re-pointed), a parent run per
flow and a nested run per stage, and what a run logs (params without secrets, metrics, datasets, outputs,
artifacts, the code and library versions)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import platform
import re
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, SecretBytes, SecretStr

from infra.artifacts import ArtifactRef
from infra.locks import file_lock
from infra.settings import Settings, check_local_store, redact_uri, sqlite_path
from infra.tracking.tags import (
    CODE_VERSION_TAG,
    DATASET_SHA256_TAG,
    KIND_TAG,
    OUTPUT_KEY_TAG,
    OUTPUT_SHA256_TAG,
    OUTPUT_URI_TAG,
    STAGE_TAG,
)

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "prefect", "mlflow", "boto3")
# a key naming a secret; "token" only as a whole key or with a credential prefix (hf_token), not max_tokens
_SECRET_KEY = re.compile(
    r"secret|passw|credential|api_?key|access_key|private_key|^token$|(hf|auth|access|refresh|bearer|session|gh)_token$",
    re.I,
)
_MAX_PARAM = 6000  # MLflow's limit on a param value
# a unique-constraint failure, as sqlite, PostgreSQL and MySQL word it through SQLAlchemy
_DUPLICATE_ROW = re.compile(r"IntegrityError|UniqueViolation|UNIQUE constraint failed|duplicate key|Duplicate entry")


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
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context, tags={DATASET_SHA256_TAG: digest})
            return
        except MlflowException as exc:
            # MLflow looks the dataset up, then inserts it: two runs logging the same new dataset at once (two
            # converts in one directory) race, and the loser's transaction rolls back whole. Again, it finds the
            # winner's row and links to it.
            if attempt == 2 or not _DUPLICATE_ROW.search(str(exc)):
                raise
            log.info("dataset %r was logged by another run at the same moment; linking to it", name)


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
    """The git commit of this checkout (`-dirty` if tracked files changed), else the installed mha2mla package
    version, else "unknown" (a copied source tree; each stage's code digest still names its code)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        try:
            return metadata.version("mha2mla")
        except metadata.PackageNotFoundError:
            return "unknown"
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
