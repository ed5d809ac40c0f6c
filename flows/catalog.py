"""The `catalog` flow: every model x config of a YAML catalog through the `convert` flow.

Entries run as tasks on a thread pool of `max_concurrency` workers; a failing entry is reported in the
summary and does not stop the others. The summary table goes to the terminal (the CLI prints it with rich)
and, as markdown and JSON, to the catalog's MLflow run; each entry's `convert` run is tagged with that run's
id (`mha2mla.catalog_run`).

Catalog format (see catalog.example.yaml): every level rejects unknown fields, so a typo is an error that
names it before anything runs.

    max_concurrency: 2           # entries converted at the same time
    defaults:                    # sections of ConvertParams, merged key by key under each config's
      calibration: {num_tokens: 8192}
      evaluation: {max_tokens: 4096, mc_tasks: [arc_easy, piqa], mc_limit: 100}
    models:
      - model: smollm2-135m
        configs:
          - name: r8-k16         # unique per model; the run and registry name is MODEL-NAME
          - name: r8-k8-int4
            mla: {kv_rank: 8}
            quantize_kv: {nbits: 4}
          - name: r8-k16-kd
            finetune: {data: ./train.jsonl, train: {max_tokens: 20000000}}
          - name: r8-k64-llamacpp
            mla: {kv_rank: 64}
            export: {target: llamacpp, kv_block: 32}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.convert import FLOW_TAG, ConvertParams, convert
from flows.errors import describe_error
from infra.tracking import log_json, log_table_markdown, parent_run
from mha2mla_core.evaluation.report import Comparison
from infra.stage import context, ensure_result_storage
from tasks.inputs import model_slug

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.json"


SECTIONS = ("mla", "calibration", "evaluation", "finetune", "quantize_kv", "export", "gate")


class Defaults(BaseModel):
    """Sections of `convert` parameters (see ConvertParams); an absent finetune / quantize_kv / export skips the
    stage."""

    model_config = ConfigDict(extra="forbid")

    mla: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    quantize_kv: dict[str, Any] | None = None
    export: dict[str, Any] | None = None  # ExportParams: the final checkpoint also in DeepSeek-V3's format
    gate: dict[str, Any] | None = None  # QualityGate: the bounds that make a checkpoint its model's `champion`


class EntryConfig(Defaults):
    """One config of a model; each section is merged key by key over the catalog's defaults."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CatalogModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    configs: list[EntryConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "CatalogModel":
        names = [c.name for c in self.configs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model {self.model!r}: config names {repeated} repeat; give each config its own name")
        return self


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_concurrency: int = Field(2, ge=1, le=64)
    defaults: Defaults = Defaults()
    models: list[CatalogModel] = Field(min_length=1)

    def entries(self) -> list[ConvertParams]:
        """Every model x config as validated `convert` parameters (a bad value fails here, for all)."""
        entries = []
        for i, item in enumerate(self.models):
            for j, config in enumerate(item.configs):
                sections = {
                    part: {**(getattr(self.defaults, part) or {}), **(getattr(config, part) or {})}
                    for part in SECTIONS
                    if getattr(self.defaults, part) is not None or getattr(config, part) is not None
                }
                name = f"{model_slug(item.model).replace('/', '--')}-{config.name}"
                try:
                    entries.append(ConvertParams(model=item.model, name=name, **sections))
                except ValidationError as exc:
                    raise ValueError(f"models.{i}.configs.{j} ({config.name!r}): {describe_error(exc)}") from None
        return entries


def load_catalog(path: str | Path) -> tuple[Catalog, list[ConvertParams]]:
    """Parse and validate a catalog file and all its entries; ValueError names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"catalog file {path} does not exist")
    try:
        catalog = Catalog.model_validate(yaml.safe_load(path.read_text()) or {})
        return catalog, catalog.entries()
    except ValueError as exc:  # pydantic ValidationError included
        raise ValueError(f"{path}: {describe_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None


class CatalogOutcome(BaseModel):
    run_id: str
    rows: list[dict]
    failed: int


@task(name="convert-entry", task_run_name="convert-entry[{params.name}]")
def convert_entry(params: ConvertParams, catalog_run_id: str) -> dict:
    """One catalog entry through the `convert` flow (its stages cache and retry on their own)."""
    return convert(params, catalog_run_id=catalog_run_id).model_dump(mode="json")


SUMMARY_KEYS = ("ppl", "kv_bytes_per_token")  # the summary's own columns; the other suites' rows go to `suites`


def summary_row(params: ConvertParams, state) -> dict:
    """The entry's name, status, PPL and KV saving of its last model (the final checkpoint) and its other suites'
    figures with their change against the original (`suites`: label -> cell), or the error."""
    row = {"entry": params.name, "model": params.model, "status": "failed"}
    if state.is_completed():
        outcome = state.result()
        table = Comparison.from_dict(outcome["table"])
        last, ppl, kv = table.models[-1], table.row("ppl"), table.row("kv_bytes_per_token")
        header, *cells = table.cells()
        suites = {line[0]: line[header.index(last)] for r, line in zip(table.rows, cells) if r.key not in SUMMARY_KEYS}
        row.update(status="ok", ppl_original=ppl.values[table.baseline], ppl_mla=ppl.values[last],
                   kv_saving_pct=-kv.deltas[last], suites=suites, checkpoint=outcome["checkpoint"]["uri"])  # fmt: skip
        if outcome.get("export"):
            row["export"] = outcome["export"]["uri"]
    else:
        error = state.result(raise_on_failure=False)
        row["error"] = f"{type(error).__name__}: {describe_error(error)}".splitlines()[0][:300]  # URI passwords masked
    return row


@flow(name="catalog", flow_run_name="catalog-{file}", persist_result=False)
def catalog(file: str) -> CatalogOutcome:
    """Run every entry of the catalog `file` with bounded concurrency; failures are summarised, not raised."""
    spec, entries = load_catalog(file)
    context()
    ensure_result_storage()
    with parent_run(f"catalog-{Path(file).stem}", params={"file": file, "entries": len(entries)},
                    tags={FLOW_TAG: "catalog"}) as run_id:  # fmt: skip
        log_json({"flow": "catalog", "params": {"file": file}, "catalog": spec.model_dump(mode="json")}, CATALOG_FILE)
        with ThreadPoolTaskRunner(max_workers=spec.max_concurrency) as runner:
            futures = [runner.submit(convert_entry, {"params": p, "catalog_run_id": run_id}) for p in entries]
            for future in futures:
                future.wait()
        rows = [summary_row(p, f.state) for p, f in zip(entries, futures)]
        log_table_markdown([{**r, "suites": "; ".join(f"{k} {v}" for k, v in r.get("suites", {}).items())} for r in rows],
                           "catalog_summary.md")  # fmt: skip
        log_json(rows, "catalog_summary.json")
    failed = sum(row["status"] != "ok" for row in rows)
    return CatalogOutcome(run_id=run_id, rows=rows, failed=failed)
