"""`mha2mla`: the command line of the pipeline (typer), one command per flow or question.

    mha2mla convert smollm2-135m [--kv-rank 8 ...]   convert one model, reload it in a fresh process, report
    mha2mla catalog run catalog.example.yaml         every model x config of a catalog
    mha2mla resume RUN_ID                            rerun a flow run with its stored parameters
    mha2mla runs                                     recent flow runs and their stages
    mha2mla lineage URI                              what made a checkpoint: model, data, code, config
    mha2mla export CHECKPOINT OUT                    a checkpoint in DeepSeek-V3's format, for serving engines

Everything runs on the embedded default unless `MHA2MLA_*` / `PREFECT_API_URL` point at services
(see infra/settings.py): Prefect's ephemeral API, MLflow on sqlite, artifacts in the store's folder
(`--home`, `MHA2MLA_HOME`, default ./.mha2mla/). What the commands print and how they exit is flows/console.py;
Prefect's start-up is infra/prefect_api.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from flows.console import (
    RUN_LOGGERS,
    ConsoleApp,
    console,
    install_logging,
    print_error,
    progress_to_stderr,
    report_catalog,
    report_conversion,
    report_export,
    report_lineage,
    report_runs,
    show_progress,
    user_errors,
)
from flows.errors import describe_error
from infra.artifacts import remove_orphans, scratch_root, store_root
from infra.prefect_api import EphemeralAPI, boot_prefect_api, exit_on_signals, prefect_environment, wait_until_ready
from infra.settings import ENV_PREFIX, Settings, check_local_store

app = ConsoleApp(no_args_is_help=True, add_completion=False, help="Convert MHA/GQA models to MLA, cached and tracked.")
catalog_app = typer.Typer(no_args_is_help=True, help="Run a YAML catalog of models x configs.")
app.add_typer(catalog_app, name="catalog")
FLOW_COMMANDS = {"convert", "catalog", "resume"}
READ_COMMANDS = {"runs", "lineage", "resume"}  # they need a store, and say so rather than make one


@dataclasses.dataclass(frozen=True)
class CliState:
    """What the app's callback sets up for its command: the settings (built once, here) and Prefect's API."""

    settings: Settings
    verbose: bool
    api: EphemeralAPI | None = None


@app.callback()
def main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", "--debug", help="Log INFO from every library; an error shows its traceback."),
    home: Optional[Path] = typer.Option(None, "--home", help=f"the store's folder: artifacts, MLflow and Prefect state (default: {ENV_PREFIX}HOME, else ./.mha2mla)"),
) -> None:
    """Set up settings, logging and the embedded Prefect home before torch, transformers or a flow is imported."""
    if home is not None:  # the flows, the reload subprocess and Prefect's server read it from the environment too
        os.environ[f"{ENV_PREFIX}HOME"] = str(home.expanduser().resolve())
    try:
        settings = Settings()
    except ValueError as exc:  # a bad MHA2MLA_* variable or .env line
        print_error(exc)
        raise typer.Exit(2) from None
    if ctx.invoked_subcommand in READ_COMMANDS:
        with user_errors():
            check_local_store(settings)
    install_logging(verbose)
    api = None
    if ctx.invoked_subcommand in FLOW_COMMANDS:  # a command that only reads makes no folder
        prefect_environment(settings.prefect_home, RUN_LOGGERS)
        api = boot_prefect_api()
        scratch = scratch_root(settings)
        restore = exit_on_signals(*([api.stop] if api else []), lambda: remove_orphans(scratch, include_own=True))
        ctx.call_on_close(restore)  # in-process callers (tests) get their own handlers back
    ctx.obj = CliState(settings=settings, verbose=verbose, api=api)


def state(ctx: typer.Context) -> CliState:
    return ctx.find_root().obj


def run_with_progress(ctx: typer.Context, fn, *args, **kwargs):
    """Call a flow (once Prefect's API is up) with a line per stage; errors exit with their message."""
    cli = state(ctx)
    if cli.api is not None:
        wait_until_ready(cli.api)
    return show_progress(fn, *args, verbose=cli.verbose, **kwargs)


def tracking_store(ctx: typer.Context) -> Settings:
    """Point MLflow at this process's store for a command that only reads it; no store here: exit 2, saying so."""
    from infra.tracking import configure

    settings = state(ctx).settings
    with user_errors():
        configure(settings, create=False)
    return settings


def given(**options: Any) -> dict[str, Any]:
    """The options set on the command line; the others keep their config class's default."""
    return {name: value for name, value in options.items() if value is not None}


def _kv_rank(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give a rank per KV head (an integer) or 'none' for no low rank") from None


@app.command()
def convert(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="hub id, local HF directory, .gguf file, or smollm2-135m (or the recipe's)"),
    config: Optional[Path] = typer.Option(None, "--config", help="recipe YAML (recipe.yaml beside a registered checkpoint, or model + a catalog entry's sections), or a packaged recipe's name (gpu, cpu); options given too override it"),
    recipe: Optional[str] = typer.Option(None, help="recovery recipe under --config and the options: gpu (distillation on rows sampled from the original, or on --finetune-data's text when given; flows/recipes/gpu.yaml), cpu (a short block-wise reconstruction, flows/recipes/cpu.yaml), none (conversion only), or auto: gpu on a worker whose MHA2MLA_DEVICE is a GPU, cpu elsewhere, when neither --config nor a fine-tuning option is given (default: MHA2MLA_RECIPE, auto)"),
    rope_strategy: Optional[str] = typer.Option(None, help="rotated | high | low | uniform | 2-norm (default: MLAConfig's)"),
    rope_dims: Optional[int] = typer.Option(None, help="RoPE dims kept per head, even (default: MLAConfig's)"),
    kv_rank: Optional[str] = typer.Option(None, help="latent rank per KV head, or 'none' (default: MLAConfig's)"),
    svd: Optional[str] = typer.Option(None, help="split | joint | aware | output-aware (default: MLAConfig's)"),
    layout: Optional[str] = typer.Option(None, help="shared | per_head (default: MLAConfig's)"),
    refit_values: Optional[bool] = typer.Option(None, "--refit-values/--no-refit-values", help="re-solve the value up-projections by least squares under the converted attention (default: MLAConfig's)"),
    calib_data: Optional[str] = typer.Option(None, envvar="MHA2MLA_CALIB_DATA", help="HF dataset, local txt/jsonl/parquet, or s3:// URI"),
    calib_tokens: Optional[int] = typer.Option(None, help="calibration tokens sampled (default: CalibrationParams')"),
    calib_model_samples: bool = typer.Option(False, "--calib-model-samples", help="data-free calibration: the original model continues each window from its first 4 tokens"),
    eval_text: Optional[str] = typer.Option(None, envvar="MHA2MLA_EVAL_TEXT", help="held-out text (default: packaged books)"),
    eval_tokens: Optional[int] = typer.Option(None, help="evaluation tokens scored (default: EvalParams')"),
    finetune_data: Optional[str] = typer.Option(None, help="fine-tune on this text (distilling the original); default: no fine-tuning, or data-free with --synthetic-fraction 1"),
    finetune_tokens: Optional[int] = typer.Option(None, help="fine-tuning token budget (default: FinetuneConfig's)"),
    finetune_lr: Optional[float] = typer.Option(None, help="peak learning rate of the WSD schedule (default: FinetuneConfig's)"),
    kd_weight: Optional[float] = typer.Option(None, help="distillation share of the loss, in [0, 1]; 0 = LM loss only, no teacher (default: FinetuneConfig's)"),
    trainable: Optional[str] = typer.Option(None, help="all | attention | attention+norms (default: FinetuneConfig's)"),
    finetune_seq_len: Optional[int] = typer.Option(None, help="tokens per packed training row (default: FinetuneConfig's)"),
    finetune_batch: Optional[int] = typer.Option(None, help="rows per forward pass, per process (default: FinetuneConfig's)"),
    grad_accum: Optional[int] = typer.Option(None, help="forward passes per optimizer step (default: FinetuneConfig's)"),
    synthetic_fraction: Optional[float] = typer.Option(None, help="share of fine-tuning rows sampled from the original model, in [0, 1]; 1 = data-free, and fine-tunes without --finetune-data (default: FinetuneParams')"),
    reconstruct_steps: Optional[int] = typer.Option(None, help="steps of the reconstruct stage, which fits each converted attention layer to the original's output: before end-to-end fine-tuning, or alone on the calibration windows when there is none; 0 = none (default: FinetuneParams' / the cpu recipe's)"),
    kv_bits: Optional[int] = typer.Option(None, help="quantize the latent cache to 4 or 2 bits; 0 = a full-precision cache (default: the recipe's: int4 in the cpu and gpu recipes, none with --recipe none)"),
    export_target: Optional[str] = typer.Option(None, help="also export the final checkpoint in DeepSeek-V3's format for hf | llamacpp | vllm | trtllm (README: Serving); default: no export"),
    export_kv_block: Optional[int] = typer.Option(None, help="with --export-target: pad the export's cached rows to whole blocks of this many values (32: llama.cpp's quantized cache types; as `mha2mla export --kv-block`)"),
    mc_tasks: Optional[str] = typer.Option(None, help="zero-shot multiple choice (lm-eval, local files): comma list of arc_easy, arc_challenge, hellaswag, piqa, openbookqa, winogrande, mmlu, or all; default: none"),
    mc_limit: Optional[int] = typer.Option(None, help="MC items per task (per subject for MMLU); default: all"),
    mc_data_dir: Optional[str] = typer.Option(None, help="directory of the normalized MC JSONL files (default: MCConfig's)"),
    needle: bool = typer.Option(False, "--needle", help="needle-in-a-haystack test (grid: NeedleParams')"),
    needle_lengths: Optional[str] = typer.Option(None, help="needle prompt lengths in tokens, comma list (implies --needle)"),
    speed: bool = typer.Option(False, "--speed", help="prefill/decode tokens/s and peak memory (grid: InferenceConfig's)"),
    speed_contexts: Optional[str] = typer.Option(None, help="speed-test context lengths, comma list (implies --speed)"),
    name: Optional[str] = typer.Option(None, help="run and registry name (default: MODEL-mla-CONFIG, flows.naming.default_name)"),
    champion_max_ppl: Optional[float] = typer.Option(None, help="quality gate: the checkpoint becomes the registered model's `champion` if its PPL is at most this"),
    champion_max_ppl_change: Optional[float] = typer.Option(None, help="quality gate: ... if its PPL change against the original is at most this many %"),
    check: bool = typer.Option(True, help="reload the checkpoint in a fresh process and generate a sample"),
    json_output: bool = typer.Option(False, "--json", help="print the outcome as one JSON object on stdout (progress goes to stderr)"),
) -> None:
    """Convert MODEL to MLA, evaluate it against the original, register the checkpoint."""
    from flows.convert import ConvertParams
    from flows.convert import convert as convert_flow
    from flows.publish import overlay, read_recipe

    if json_output:
        progress_to_stderr(ctx)

    tuning = given(finetune_tokens=finetune_tokens, finetune_lr=finetune_lr, kd_weight=kd_weight, trainable=trainable,
                   finetune_seq_len=finetune_seq_len, finetune_batch=finetune_batch, grad_accum=grad_accum)  # fmt: skip
    mla = given(rope_strategy=rope_strategy, rope_dims=rope_dims, svd=svd, layout=layout, refit_values=refit_values)
    if kv_rank is not None:
        mla["kv_rank"] = _kv_rank(kv_rank)
    tunes = bool(finetune_data or synthetic_fraction is not None)  # the options alone turn fine-tuning on
    settings = state(ctx).settings
    with user_errors():
        base = read_recipe(config) if config else {}
        explicit = bool(config or tuning or tunes or reconstruct_steps is not None)
        recovery = _recovery_recipe(recipe or settings.recipe, explicit=explicit, device=settings.device)
        if recovery:
            packaged = read_recipe(recovery)
            if finetune_data and synthetic_fraction is None and packaged.get("finetune"):
                # text given: distil on it rather than on rows the recipe samples from the original (with hidden-state
                # distillation, textbook rows beat sampled ones by 1.8 points of the six tasks; docs/RESULTS.md)
                packaged = overlay(packaged, {"finetune": {"synthetic_fraction": 0.0}})
            base = overlay(packaged, base)
        fine_tuned = tunes or bool(base.get("finetune"))
        if export_kv_block is not None and not export_target:
            raise typer.BadParameter("--export-kv-block set, but nothing is exported: give --export-target llamacpp")
        if tuning and not fine_tuned:
            flags = ", ".join("--" + name.replace("_", "-") for name in tuning)
            raise typer.BadParameter(f"{flags} set, but fine-tuning is off: give --finetune-data TEXT, "
                                     "--synthetic-fraction 1 for data-free fine-tuning, or --recipe gpu")  # fmt: skip
        if model is None and "model" not in base:
            raise ValueError("give the MODEL to convert, or a recipe that names it (--config recipe.yaml)")
        params = ConvertParams.model_validate(overlay(base, dict(
            model=_local(model), name=name, mla=mla,
            calibration=given(data=_local(calib_data), num_tokens=calib_tokens, model_samples=calib_model_samples or None),
            evaluation=given(text=_local(eval_text), max_tokens=eval_tokens, mc_tasks=_items(mc_tasks), mc_limit=mc_limit,
                             mc_data_dir=_local(mc_data_dir),
                             needle=given(lengths=_items(needle_lengths)) if needle or needle_lengths else None,
                             speed=given(contexts=_items(speed_contexts)) if speed or speed_contexts else None),
            finetune=dict(data=_local(finetune_data),
                          train=given(max_tokens=finetune_tokens, lr=finetune_lr, kd_weight=kd_weight,
                                      trainable=trainable, seq_len=finetune_seq_len, micro_batch_size=finetune_batch,
                                      grad_accum_steps=grad_accum),
                          **given(synthetic_fraction=synthetic_fraction), **_reconstruct(reconstruct_steps))
            if fine_tuned else None,
            reconstruct=dict(steps=reconstruct_steps) if reconstruct_steps and not fine_tuned else None,
            quantize_kv=dict(nbits=kv_bits) if kv_bits else None,
            export=dict(target=export_target, **given(kv_block=export_kv_block)) if export_target else None,
            gate=given(max_ppl=champion_max_ppl, max_ppl_change_pct=champion_max_ppl_change),
        )))  # fmt: skip
        if reconstruct_steps == 0:  # the overlay reads None as "not given": drop the reconstruction here
            finetune = params.finetune and params.finetune.model_copy(update={"reconstruct": None})
            params = params.model_copy(update={"finetune": finetune, "reconstruct": None})
        if kv_bits == 0:  # likewise: a full-precision cache, whatever the recipe says
            params = params.model_copy(update={"quantize_kv": None})
    outcome = run_with_progress(ctx, convert_flow, params)
    reloaded = reload_report(outcome, params, state(ctx).settings) if check else None
    if json_output:
        print(json.dumps({**outcome.model_dump(mode="json"), "reloaded": reloaded}))
        return
    report_conversion(outcome, reloaded)


def reload_report(outcome, params, settings: Settings) -> dict[str, Any]:
    """Run flows.reload in a fresh interpreter on the stored checkpoint (this process's store and data, from any
    directory); its JSON report."""
    from flows.reload import reload_command

    command, env = reload_command(outcome.checkpoint, params.evaluation, settings)
    with console.status("reloading the checkpoint with from_pretrained in a fresh process"):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), f"status {done.returncode}")
        console.print(f"[red]reload failed:[/red] {escape(describe_error(RuntimeError(last)))}; rerun it: "
                      f"{escape(' '.join(command[1:4]))} ...")  # fmt: skip
        raise typer.Exit(1)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _recovery_recipe(recipe: str, explicit: bool, device: str) -> str | None:
    """The packaged recipe `--recipe` names (None: conversion only); auto picks gpu on a GPU worker and cpu
    elsewhere, unless the command already says how to recover (--config, a fine-tuning or reconstruction option)."""
    from flows.publish import packaged_recipes
    from tasks.inputs import worker_device

    if recipe == "auto":
        return None if explicit else "gpu" if worker_device(device).type == "cuda" else "cpu"
    if recipe == "none":
        return None
    if recipe not in packaged_recipes():
        raise ValueError(f"recipe {recipe!r} (--recipe or MHA2MLA_RECIPE): use auto, none or a packaged recipe "
                         f"({', '.join(packaged_recipes())})")  # fmt: skip
    return recipe


def _reconstruct(steps: int | None) -> dict[str, Any]:
    """--reconstruct-steps as the finetune section's `reconstruct` (0: none; unset: FinetuneParams' default)."""
    if steps is None:
        return {}
    return {"reconstruct": {"steps": steps} if steps else None}


def _local(value: str | None) -> str | None:
    """A path to something that exists here, made absolute (the reload subprocess and `resume` may run in another
    directory); anything else (a hub id, a packaged name, an s3:// URI) as given."""
    if value is None or "://" in value or not ("/" in value or value.startswith((".", "~"))):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _items(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (the config classes parse and check each item)."""
    return None if value is None else [item.strip() for item in value.split(",") if item.strip()]


@catalog_app.command("run")
def catalog_run(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="catalog YAML (see catalog.example.yaml)"),
    json_output: bool = typer.Option(False, "--json", help="print the summary as one JSON object on stdout (progress goes to stderr)"),
) -> None:
    """Run every entry; exit status 1 if any entry failed."""
    from flows.catalog import catalog, load_catalog

    if json_output:
        progress_to_stderr(ctx)

    with user_errors():
        load_catalog(file)  # a typo fails here, before anything starts
    outcome = run_with_progress(ctx, catalog, str(file))
    if json_output:
        print(json.dumps(outcome.model_dump(mode="json")))
    else:
        report_catalog(outcome)
    if outcome.failed:
        raise typer.Exit(1)




@app.command()
def resume(ctx: typer.Context, run_id: str = typer.Argument(..., help="MLflow run id of a convert or catalog flow run (see `mha2mla runs`)")) -> None:
    """Rerun a flow run with the parameters stored with it; its completed stages are cache hits."""
    from flows.catalog import CATALOG_FILE, catalog
    from flows.convert import CONFIG_FILE, ConvertParams
    from flows.convert import convert as convert_flow
    from infra.tracking import stored_config

    tracking_store(ctx)
    with user_errors():
        stored = stored_config(run_id, (CONFIG_FILE, CATALOG_FILE))
    if stored["flow"] == "convert":
        params = ConvertParams.model_validate(stored["params"])
        report_conversion(run_with_progress(ctx, convert_flow, params), None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / Path(stored["params"]["file"]).name
        file.write_text(json.dumps(stored["catalog"]))  # JSON is YAML
        outcome = run_with_progress(ctx, catalog, str(file))
    report_catalog(outcome)
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
def export(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help="a converted checkpoint: local folder, models:/NAME/VERSION, models:/NAME@ALIAS or artifact URI (file://, s3://)"),
    out: Path = typer.Argument(..., help="new or empty folder to write the exported model to"),
    export_format: str = typer.Option("deepseek_v3", "--format", help="deepseek_v3: the format vLLM, SGLang, llama.cpp and TensorRT-LLM run MLA in"),
    target: Optional[str] = typer.Option(None, help="hf | llamacpp | vllm | trtllm: refuse a layout the engine's MLA kernels do not run (default: ExportParams')"),
    check_tokens: Optional[int] = typer.Option(None, help="packaged calibration tokens on which the export's logits are compared with the checkpoint's; 0 = no check (default: ExportParams')"),
    kv_block: Optional[int] = typer.Option(None, help="pad the RoPE key so that each cached row is whole blocks of this many values: 32 lets llama.cpp quantize the cache (-ctk q8_0); the latent must already be whole blocks (default: ExportParams', 1)"),
    rotate_latent: Optional[bool] = typer.Option(None, "--rotate-latent/--no-rotate-latent", help="turn the latent (exactly) so that its channels are alike in scale, for engines' quantized caches (default: ExportParams', on)"),
    json_output: bool = typer.Option(False, "--json", help="print what was written and measured as one JSON object on stdout"),
) -> None:
    """Write a converted checkpoint in a serving engine's format (README: Serving)."""
    from tasks.export import ExportParams, export_checkpoint

    if export_format != "deepseek_v3":
        raise typer.BadParameter(f"--format {export_format!r}: the one export format is deepseek_v3")
    with user_errors():
        params = ExportParams(**given(target=target, check_tokens=check_tokens, kv_block=kv_block, rotate_latent=rotate_latent))
        summary = export_checkpoint(checkpoint, out, params, state(ctx).settings)
    if json_output:
        print(json.dumps(summary))
        return
    report_export(f"{checkpoint} -> {out} (deepseek_v3, target {params.target})", summary)


@app.command()
def runs(
    ctx: typer.Context,
    limit: int = typer.Option(10, min=1, help="how many flow runs"),
    json_output: bool = typer.Option(False, "--json", help="print the runs as a JSON list on stdout"),
) -> None:
    """Recent flow runs (newest first) with each stage's status and cache outcome."""
    from infra.tracking import recent_runs

    tracking_store(ctx)
    found = recent_runs(limit)
    if json_output:
        print(json.dumps([dataclasses.asdict(flow_run) for flow_run in found], default=str))
        return
    report_runs(found)


@app.command()
def lineage(
    ctx: typer.Context,
    uri: str = typer.Argument(..., help="a checkpoint: registry URI (models:/NAME/VERSION or models:/NAME@ALIAS), artifact URI (file://, s3://) or local folder"),
    json_output: bool = typer.Option(False, "--json", help="print the lineage as one JSON object on stdout"),
) -> None:
    """The model, data, code and config that produced the checkpoint at URI, from MLflow."""
    from flows.convert import CONFIG_FILE
    from infra.tracking import lineage as find_lineage
    from infra.tracking import stored_params

    settings = tracking_store(ctx)
    with user_errors():
        found = find_lineage(uri, root=store_root(settings.artifact_root))
    config = stored_params(found.flow.run if found.flow else found.producer, CONFIG_FILE)
    if json_output:
        print(json.dumps({**dataclasses.asdict(found), "config": config}, default=str))
        return
    report_lineage(uri, found, config)
