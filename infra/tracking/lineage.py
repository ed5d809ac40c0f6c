"""What the runs say: the lineage of a checkpoint (the stage run that wrote it, its flow, datasets and registered
versions), recent flow runs with their stages, and the parameters a flow run stored."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from infra.tracking.registry import resolve_checkpoint
from infra.tracking.tags import (
    CACHE_TAG,
    CHECKPOINT_URI_TAG,
    DATASET_SHA256_TAG,
    KIND_TAG,
    OUTPUT_KEY_TAG,
    OUTPUT_SHA256_TAG,
    OUTPUT_URI_TAG,
    quoted,
)


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
    runs = _search(client, f"tags.`{OUTPUT_URI_TAG}` = '{quoted(uri)}'")
    if not runs and root and uri.startswith(root + "/"):
        runs = _search(client, f"tags.`{OUTPUT_KEY_TAG}` = '{quoted(uri.removeprefix(root + '/'))}'")
    if not runs and sha256:
        runs = _search(client, f"tags.`{OUTPUT_SHA256_TAG}` = '{quoted(sha256)}'")
        uri = runs[0].data.tags[OUTPUT_URI_TAG] if runs else uri
    if not runs:
        raise LookupError(f"no run logged output {uri}; is MHA2MLA_TRACKING_URI the right store?")
    writers = [run for run in runs if run.data.tags.get(CACHE_TAG) != "hit"] or runs
    producer = _record(min(writers, key=lambda run: run.info.start_time))
    flow = _flow(client, producer.parent_run_id) if producer.parent_run_id else None
    versions = client.search_model_versions(f"tags.`{CHECKPOINT_URI_TAG}` = '{quoted(uri)}'")
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
            return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{name}")
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


def recent_runs(limit: int = 20) -> list[FlowRun]:
    """The latest flow runs, newest first, each with its stage runs."""
    client = MlflowClient()
    flows = _search(client, f"tags.`{KIND_TAG}` = 'flow'", max_results=limit)
    return [_flow(client, run.info.run_id) for run in flows]


def _flow(client: MlflowClient, run_id: str) -> FlowRun:
    stages = _search(client, f"tags.`mlflow.parentRunId` = '{quoted(run_id)}'")
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
