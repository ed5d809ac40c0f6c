"""What a `convert` run leaves for the tools users already have.

- **Headline metrics** on the flow's MLflow run (`headline_metrics`): PPL of the final checkpoint and its change
  against the original, KV bytes per token and the saving, the MC average where MC ran, tokens trained, and the
  wall time of each stage. With the resolved config as the run's params, MLflow's runs table sorts configs by
  quality and its compare view charts one against the other.
- **The registered model** (`publish`): the final checkpoint, with a model card (README.md) and its recipe
  (recipe.yaml, the catalog-entry format: `mha2mla convert --config recipe.yaml` reproduces it) written beside the
  weights, logged as an MLflow pyfunc model and registered with a description and the alias `candidate`; `champion`
  moves to it when it passes the user's quality gate (`QualityGate`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from infra.tracking import RegisteredCheckpoint, checkpoint_version, code_version, register_checkpoint
from mha2mla_core.evaluation.report import Comparison
from infra.stage import StageResult, context, scratch_dir

RECIPE_FILE = "recipe.yaml"
CARD_FILE = "README.md"


class QualityGate(BaseModel):
    """Bounds a checkpoint must meet to become the registered model's `champion`; unset bounds are not checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_ppl: float | None = None  # PPL of the final checkpoint on the evaluation text
    max_ppl_change_pct: float | None = None  # its PPL change against the original, in %
    min_kv_saving_pct: float | None = None  # KV-cache bytes saved against the original, in %

    def failures(self, headline: Mapping[str, float]) -> list[str]:
        """What the checkpoint misses, one line per bound (empty: it passes)."""
        checks = [("ppl", self.max_ppl, 1), ("ppl_change_pct", self.max_ppl_change_pct, 1),
                  ("kv_saving_pct", self.min_kv_saving_pct, -1)]  # fmt: skip
        return [f"{key}={headline[key]:.2f} {'>' if sign > 0 else '<'} {bound}" for key, bound, sign in checks
                if bound is not None and (key not in headline or sign * (headline[key] - bound) > 0)]  # fmt: skip


def headline_metrics(table: Comparison, results: Mapping[str, StageResult], seconds: Mapping[str, float]) -> dict[str, float]:
    """The flow run's metrics: the final checkpoint (the table's last model) against the original."""
    final, base = table.models[-1], table.baseline
    keys = {row.key for row in table.rows}
    out: dict[str, float] = {}
    if "ppl" in keys:
        ppl = table.row("ppl")
        out.update(ppl=ppl.values[final], ppl_original=ppl.values[base], ppl_change_pct=ppl.deltas[final])
    if "kv_bytes_per_token" in keys:
        kv = table.row("kv_bytes_per_token")
        out.update(kv_bytes_per_token=kv.values[final], kv_bytes_per_token_original=kv.values[base],
                   kv_saving_pct=-kv.deltas[final])  # fmt: skip
    accs = [row for row in table.rows if re.fullmatch(r"mc\.[^.]+\.acc", row.key)]
    if accs:
        out["mc_avg_acc"] = sum(row.values[final] for row in accs) / len(accs)
        out["mc_avg_acc_original"] = sum(row.values[base] for row in accs) / len(accs)
    if "finetune" in results:
        out["tokens_trained"] = results["finetune"].metrics.get("tokens", 0.0)
    for stage, value in seconds.items():
        out[f"seconds.{re.sub(r'[^A-Za-z0-9_.-]+', '.', stage).strip('.')}"] = value
    out["seconds.total"] = sum(seconds.values())
    return {key: float(value) for key, value in out.items() if value is not None}


@dataclass(frozen=True)
class RunSummary:
    """What a finished `convert` run knows of its final checkpoint: enough to describe, card and reproduce it."""

    name: str  # the registered model's
    params: BaseModel  # the flow's ConvertParams
    model: Any  # the source ModelSource: name and digest
    table: Comparison  # the side-by-side evaluation, the final checkpoint last
    headline: Mapping[str, float]  # headline_metrics
    results: Mapping[str, StageResult]  # stage name -> its result
    run_id: str  # the flow's MLflow run


def recipe(summary: RunSummary) -> str:
    """The flow's parameters as YAML, headed by the command that reruns them."""
    header = (f"# mha2mla convert --config {RECIPE_FILE}\n"
              f"# reproduces this checkpoint: source model digest {summary.model.digest}, mha2mla {code_version()}\n")  # fmt: skip
    return header + yaml.safe_dump(summary.params.model_dump(mode="json", exclude_none=True), sort_keys=False)


def model_card(summary: RunSummary) -> str:
    """README.md of the checkpoint: base model, method, config, data and digests, quality, KV bytes, code version."""
    name, params, model, table, headline, results, run_id = (summary.name, summary.params, summary.model, summary.table,
                                                              summary.headline, summary.results, summary.run_id)  # fmt: skip
    mla = params.mla
    hub_id = "/" in model.name and not Path(model.name).exists()
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["mha2mla", "multi-head-latent-attention", "custom_code"], **({"base_model": model.name} if hub_id else {})}  # fmt: skip
    datasets = {(d.name, d.digest, d.source) for r in results.values() for d in r.datasets}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", f"# {name}", "",
        f"`{model.name}` with its attention converted to multi-head latent attention (MLA) by mha2mla, after MHA2MLA "
        "(arXiv 2502.14837): partial RoPE, then a low-rank latent initialised by SVD. The KV cache holds only the "
        "latent and the kept RoPE key dims.", "",
        "| config | value |", "|---|---|",
        *(f"| {key} | {value} |" for key, value in mla.to_dict().items()),
        f"| fine-tuning | {'yes, ' + format(int(headline.get('tokens_trained', 0)), ',') + ' tokens' if params.finetune else 'none'} |",
        f"| KV-cache quantization | {f'int{params.quantize_kv.nbits}' if params.quantize_kv else 'none'} |", "",
        "## Quality and KV cache", "", table.to_markdown(),
        f"KV bytes per token: {headline.get('kv_bytes_per_token', 0):,.0f} against {headline.get('kv_bytes_per_token_original', 0):,.0f} "
        f"({headline.get('kv_saving_pct', 0):.2f}% saved), read from the cache's own tensors.", "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)',
        'model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # torch + transformers only',
        "```", "",
        "## Provenance", "", "| what | source | sha256 |", "|---|---|---|",
        f"| base model | `{model.name}` | `{model.digest}` |",
        *(f"| {n} | `{s}` | `{d}` |" for n, d, s in sorted(datasets)),
        "", f"Code: mha2mla `{code_version()}`; MLflow run `{run_id}`. The full recipe is `{RECIPE_FILE}`: "
        f"`mha2mla convert --config {RECIPE_FILE}` reproduces this checkpoint.", "",
    ]  # fmt: skip
    return "\n".join(lines)


def describe(summary: RunSummary) -> str:
    """The registry version's description: source and digest, config, KV saving, PPL."""
    model, headline, params = summary.model, summary.headline, summary.params
    mla = params.mla
    return (f"{model.name} (sha256 {model.digest}) -> MLA: rope {mla.rope_strategy} r={mla.rope_dims}, "
            f"kv_rank {mla.kv_rank}, svd {mla.svd}, {mla.layout}"
            f"{', fine-tuned' if params.finetune else ''}{f', int{params.quantize_kv.nbits} cache' if params.quantize_kv else ''}. "
            f"PPL {headline.get('ppl', float('nan')):.2f} (original {headline.get('ppl_original', float('nan')):.2f}, "
            f"{headline.get('ppl_change_pct', float('nan')):+.1f}%); KV {headline.get('kv_bytes_per_token', 0):,.0f} B/token "
            f"({headline.get('kv_saving_pct', 0):.2f}% saved).")  # fmt: skip


def publish(name: str, final: StageResult, *, summary: RunSummary, champion: bool) -> RegisteredCheckpoint:
    """Register the final checkpoint as an MLflow model (card and recipe beside its weights) on the active run; a
    checkpoint already registered under `name` keeps its version and gets the new description and aliases. One
    larger than `registry_copy_max_gib` is registered by reference (card and recipe beside its URI), not copied."""
    by_reference = final.output.size > context().settings.registry_copy_max_gib * 2**30
    with scratch_dir() as tmp:
        directory = None
        if checkpoint_version(name, final.sha256) is None:
            if by_reference:
                directory = tmp / "checkpoint"
                directory.mkdir()
            else:
                directory = context().store.get_dir(final.uri, tmp / "checkpoint", sha256=final.sha256)
            (directory / CARD_FILE).write_text(model_card(summary))
            (directory / RECIPE_FILE).write_text(recipe(summary))
        return register_checkpoint(directory, final.output, name, description=describe(summary), champion=champion,
                                   by_reference=by_reference)  # fmt: skip


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # packaged recipes, read by name: gpu


def packaged_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe(path: str | Path) -> dict:
    """A recipe file (`recipe.yaml` beside a registered checkpoint, or `model` plus a catalog entry's sections), or
    the name of a packaged recipe (flows/recipes/NAME.yaml), as the `convert` parameters it holds; ValueError naming
    the file when it is not one."""
    path = Path(path)
    if not path.is_file() and path.name == str(path) and (RECIPES_DIR / f"{path}.yaml").is_file():
        path = RECIPES_DIR / f"{path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist; give a recipe file or a packaged recipe: "
                                f"{', '.join(packaged_recipes())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of convert parameters (model, mla, calibration, ...)")
    return data


def overlay(base: Mapping, override: Mapping) -> dict:
    """`override` over `base`, section by section; None and empty sections of `override` leave `base` as it is."""
    merged = dict(base)
    for key, value in override.items():
        if value is None or value == {}:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = value
    return merged
