"""`mha2mla`: the command line of the pipeline (typer + rich).

    mha2mla convert smollm2-135m [--kv-rank 8 ...]   convert one model, reload it in a fresh process, report
    mha2mla catalog run catalog.example.yaml         every model x config of a catalog
    mha2mla resume RUN_ID                            rerun a flow run with its stored parameters
    mha2mla runs                                     recent flow runs and their stages
    mha2mla lineage URI                              what made a checkpoint: model, data, code, config

Everything runs on the embedded default unless `MHA2MLA_*` / `PREFECT_API_URL` point at services
(see infra/settings.py): Prefect's ephemeral API, MLflow on sqlite, artifacts in ./.mha2mla/.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flows.errors import describe_error, quiet_engine_logs
from infra.artifacts import StoreCheckError, remove_orphans, scratch_root
from infra.prefect_api import EphemeralAPI, exit_on_signals
from infra.settings import Settings


class ConsoleApp(typer.Typer):
    """The app as the `mha2mla` script runs it (`sys.exit(app())`): the process ends as soon as the command has."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exc:
            exit_now(exc.code)


def exit_now(code: Any) -> NoReturn:
    """Exit as the interpreter does (join the non-daemon threads, run the atexit handlers: MLflow, Prefect,
    logging, the ephemeral API's stop; flush the output), minus its teardown of every imported module, which
    takes seconds once torch, transformers, MLflow and a model are loaded."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    api_logs = sys.modules.get("prefect.logging.handlers")
    if api_logs is not None:  # the interpreter would send the last log lines before the atexit handlers stop the API
        api_logs.APILogWorker.drain_all(timeout=5)
    atexit._run_exitfuncs()  # what the interpreter's own exit runs after the threads
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


app = ConsoleApp(no_args_is_help=True, add_completion=False, help="Convert MHA/GQA models to MLA, cached and tracked.")
catalog_app = typer.Typer(no_args_is_help=True, help="Run a YAML catalog of models x configs.")
app.add_typer(catalog_app, name="catalog")
# piped or redirected: lines as wide as a run id or digest needs, not rich's default of 80 columns
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
FLOW_COMMANDS = {"convert", "catalog", "resume"}
# loggers whose INFO records reach the Prefect UI (PREFECT_LOGGING_EXTRA_LOGGERS) and the CLI's stage display
RUN_LOGGERS = ("mha2mla.progress", "mha2mla_core", "tasks", "flows")
# errors that are the user's to fix: printed as one message, no traceback
USER_ERRORS = (ValueError, LookupError, OSError, StoreCheckError)
ID_COLUMN = {"overflow": "fold", "min_width": 32}  # run ids and digests are folded onto more lines, never cut short


def print_error(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(describe_error(exc))}")


@app.callback()
def main(ctx: typer.Context, verbose: bool = typer.Option(False, "--verbose", "-v", "--debug", help="Log INFO from every library; an error shows its traceback.")) -> None:
    """Set up logging and the embedded Prefect home before torch, transformers or a flow is imported."""
    try:
        prefect_home = Path(Settings().prefect_home).resolve()
    except ValueError as exc:  # a bad MHA2MLA_* variable or .env line
        print_error(exc)
        raise typer.Exit(2) from None
    prefect_home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # to the Prefect UI; the terminal shows WARNING (-v: INFO)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(RUN_LOGGERS))  # our run logs reach the UI too
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # outside a run they stay local
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # first start migrates its db
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, level=level)])  # fmt: skip
    progress = logging.getLogger("mha2mla.progress")
    progress.setLevel(logging.INFO)
    progress.propagate = False  # shown by StageProgress only
    if not verbose:  # before torch, transformers or mlflow are imported, which read these once
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows it too
        os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF de-quantization bar
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about being handed a model instance
        quiet_engine_logs()  # a failing run's traceback in one line: the CLI prints the error itself
    if ctx.invoked_subcommand in FLOW_COMMANDS:
        ctx.obj = boot_prefect_api()
        scratch = scratch_root(Settings())
        restore = exit_on_signals(*([ctx.obj.stop] if ctx.obj else []), lambda: remove_orphans(scratch, include_own=True))
        ctx.call_on_close(restore)  # in-process callers (tests) get their own handlers back


def boot_prefect_api() -> EphemeralAPI | None:
    """Start Prefect's ephemeral API server (a subprocess that takes seconds to boot) while the command goes on
    to import torch, transformers and the flows, and point this process's Prefect at it; `run_with_progress`
    waits for it.

    Only on the embedded default (no PREFECT_API_URL in the environment or the Prefect profile).
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings

    if PREFECT_API_URL.value():
        return None
    api = EphemeralAPI.start({**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)})
    use_api(api.url)
    return api


def use_api(url: str) -> None:
    """Point this process's Prefect client (and the subprocesses it starts) at `url`."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


class StageProgress(logging.Handler):
    """Shows each stage's start and outcome (ran / cached / failed) from the flows' progress records, and beside the
    running stage the latest INFO line of our run loggers (training step, loss, tokens/s). When the output is not a
    terminal, each of these is a plain line, printed as it happens."""

    DONE = {"miss": "[green]done", "hit": "[cyan]cached", "failed": "[red]failed"}

    def __init__(self, progress: Progress, shown_from: int = logging.WARNING):
        super().__init__(logging.INFO)
        self.progress, self.rows, self.running = progress, {}, None
        self.shown_from = shown_from  # the console's log handler prints records from this level on

    def emit(self, record: logging.LogRecord) -> None:
        stage, event = getattr(record, "stage", None), getattr(record, "event", None)
        if stage is None and record.levelno >= self.shown_from and self.progress.disable:
            return  # already a line of the log handler's
        if self.progress.disable:  # piped or redirected
            line = f"{escape(stage)}: {'started' if event == 'start' else self.DONE.get(event, event)}" if stage else f"  {escape(record.getMessage())}"
            console.print(f"{datetime.now():%H:%M:%S} {line}", soft_wrap=True, highlight=False)
        elif stage is None and self.running is not None:
            counts = {}
            if hasattr(record, "completed") and hasattr(record, "total"):  # e.g. training steps: counts and ETA
                counts = dict(completed=record.completed, total=record.total, count=f"{record.completed}/{record.total}")
            self.progress.update(self.rows[self.running], outcome=f"[yellow]{escape(record.getMessage())}", **counts)
        elif event == "start":
            self.rows[stage] = self.progress.add_task(escape(stage), total=1, outcome="[yellow]running", count="")
            self.running = stage
        elif stage in self.rows:
            total = self.progress.tasks[self.rows[stage]].total
            self.progress.update(self.rows[stage], completed=total, outcome=self.DONE.get(event, event))
            self.running = None


def stage_progress(out: Console) -> Progress:
    """A row per stage: its name, step counts where it reports them, elapsed and remaining time, its latest line;
    disabled (StageProgress prints plain lines) when `out` is not a terminal."""
    return Progress(SpinnerColumn(), TextColumn("{task.description:<28}"), TextColumn("{task.fields[count]:>11}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[outcome]}"), console=out,
                    disable=not out.is_terminal)  # fmt: skip


def run_with_progress(ctx: typer.Context, fn, *args, **kwargs):
    """Call a flow with a rich line per stage (once Prefect's API is up); user errors exit with their message."""
    api = ctx.find_root().obj
    if api is not None:
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        api.wait_ready(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        use_api(api.url)  # a port taken meanwhile gives a new one
    verbose = ctx.find_root().params.get("verbose")
    handler = StageProgress(stage_progress(console), logging.INFO if verbose else logging.WARNING)
    progress = handler.progress
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with progress:
            return fn(*args, **kwargs)
    except USER_ERRORS as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    except Exception as exc:  # a fault of ours or of a library: one line, the traceback with --verbose
        if ctx.find_root().params.get("verbose"):
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {escape(describe_error(exc))} (--debug shows the traceback)")
        raise typer.Exit(1) from None
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def progress_to_stderr(ctx: typer.Context) -> None:
    """--json: stdout carries the JSON alone; progress and messages go to stderr until the command ends."""
    console.stderr = True
    ctx.call_on_close(lambda: setattr(console, "stderr", False))


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
    config: Optional[Path] = typer.Option(None, "--config", help="recipe YAML (recipe.yaml beside a registered checkpoint, or model + a catalog entry's sections); options given too override it"),
    rope_strategy: Optional[str] = typer.Option(None, help="rotated | high | low | uniform | 2-norm (default: MLAConfig's)"),
    rope_dims: Optional[int] = typer.Option(None, help="RoPE dims kept per head, even (default: MLAConfig's)"),
    kv_rank: Optional[str] = typer.Option(None, help="latent rank per KV head, or 'none' (default: MLAConfig's)"),
    svd: Optional[str] = typer.Option(None, help="split | joint | aware | output-aware (default: MLAConfig's)"),
    layout: Optional[str] = typer.Option(None, help="shared | per_head (default: MLAConfig's)"),
    calib_data: Optional[str] = typer.Option(None, envvar="MHA2MLA_CALIB_DATA", help="HF dataset, local txt/jsonl/parquet, or s3:// URI"),
    calib_tokens: Optional[int] = typer.Option(None, help="calibration tokens sampled (default: CalibrationParams')"),
    calib_model_samples: bool = typer.Option(False, "--calib-model-samples", help="data-free calibration: the original model continues each window from its first 4 tokens"),
    eval_text: Optional[str] = typer.Option(None, envvar="MHA2MLA_EVAL_TEXT", help="held-out text (default: packaged books)"),
    eval_tokens: Optional[int] = typer.Option(None, help="evaluation tokens scored (default: EvalParams')"),
    finetune_data: Optional[str] = typer.Option(None, help="fine-tune on this text (distilling the original); default: no fine-tuning, or data-free with --synthetic-fraction 1"),
    finetune_tokens: Optional[int] = typer.Option(None, help="fine-tuning token budget (default: FinetuneConfig's)"),
    finetune_lr: Optional[float] = typer.Option(None, help="peak learning rate of the WSD schedule (default: FinetuneConfig's)"),
    kd_weight: Optional[float] = typer.Option(None, help="distillation share of the loss, in [0, 1]; 0 = LM loss only, no teacher (default: 1)"),
    trainable: Optional[str] = typer.Option(None, help="all | attention | attention+norms (default: all)"),
    finetune_seq_len: Optional[int] = typer.Option(None, help="tokens per packed training row (default: FinetuneConfig's)"),
    finetune_batch: Optional[int] = typer.Option(None, help="rows per forward pass, per process (default: FinetuneConfig's)"),
    grad_accum: Optional[int] = typer.Option(None, help="forward passes per optimizer step (default: 1)"),
    synthetic_fraction: Optional[float] = typer.Option(None, help="share of fine-tuning rows sampled from the original model, in [0, 1]; 1 = data-free, and fine-tunes without --finetune-data; default 0"),
    reconstruct_steps: Optional[int] = typer.Option(None, help="steps of the reconstruct stage, which fits each converted attention layer to the original's output before end-to-end fine-tuning; 0 = none (default: 300)"),
    kv_bits: int = typer.Option(0, help="quantize the latent cache to 4 or 2 bits; 0 = no quantization"),
    export_target: Optional[str] = typer.Option(None, help="also export the final checkpoint in DeepSeek-V3's format for hf | llamacpp | vllm | trtllm (README: Serving); default: no export"),
    mc_tasks: Optional[str] = typer.Option(None, help="zero-shot multiple choice (lm-eval, local files): comma list of arc_easy, arc_challenge, hellaswag, piqa, openbookqa, winogrande, mmlu, or all; default: none"),
    mc_limit: Optional[int] = typer.Option(None, help="MC items per task (per subject for MMLU); default: all"),
    mc_data_dir: Optional[str] = typer.Option(None, help="directory of the normalized MC JSONL files (default: shared/data/mc)"),
    needle: bool = typer.Option(False, "--needle", help="needle-in-a-haystack test (grid: NeedleParams')"),
    needle_lengths: Optional[str] = typer.Option(None, help="needle prompt lengths in tokens, comma list (implies --needle)"),
    speed: bool = typer.Option(False, "--speed", help="prefill/decode tokens/s and peak memory (grid: SpeedParams')"),
    speed_contexts: Optional[str] = typer.Option(None, help="speed-test context lengths, comma list (implies --speed)"),
    name: Optional[str] = typer.Option(None, help="run and registry name (default MODEL-mla)"),
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
                   finetune_seq_len=finetune_seq_len, finetune_batch=finetune_batch, grad_accum=grad_accum,
                   reconstruct_steps=reconstruct_steps)  # fmt: skip
    if tuning and not finetune_data and synthetic_fraction is None:
        flags = ", ".join("--" + name.replace("_", "-") for name in tuning)
        raise typer.BadParameter(f"{flags} set, but fine-tuning is off: give --finetune-data TEXT, or "
                                 "--synthetic-fraction 1 for data-free fine-tuning")  # fmt: skip
    mla = given(rope_strategy=rope_strategy, rope_dims=rope_dims, svd=svd, layout=layout)
    if kv_rank is not None:
        mla["kv_rank"] = _kv_rank(kv_rank)
    try:
        recipe = read_recipe(config) if config else {}
        if model is None and "model" not in recipe:
            raise ValueError("give the MODEL to convert, or a recipe that names it (--config recipe.yaml)")
        params = ConvertParams.model_validate(overlay(recipe, dict(
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
            if finetune_data or synthetic_fraction is not None else None,
            quantize_kv=dict(nbits=kv_bits) if kv_bits else None,
            export=dict(target=export_target) if export_target else None,
            gate=given(max_ppl=champion_max_ppl, max_ppl_change_pct=champion_max_ppl_change),
        )))  # fmt: skip
    except (ValueError, OSError) as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    outcome = run_with_progress(ctx, convert_flow, params)
    reloaded = reload_report(outcome, params) if check else None
    if json_output:
        print(json.dumps({**outcome.model_dump(mode="json"), "reloaded": reloaded}))
        return
    report_conversion(outcome, reloaded)


def reload_report(outcome, params) -> dict[str, Any]:
    """Run flows.reload in a fresh interpreter on the stored checkpoint (this process's store and data, from any
    directory); its JSON report."""
    from flows.reload import reload_command
    from tasks.common import context

    command, env = reload_command(outcome.checkpoint, params.evaluation, context().settings)
    with console.status("reloading the checkpoint with from_pretrained in a fresh process"):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), f"status {done.returncode}")
        console.print(f"[red]reload failed:[/red] {escape(describe_error(RuntimeError(last)))}; rerun it: "
                      f"{escape(' '.join(command[1:4]))} ...")  # fmt: skip
        raise typer.Exit(1)
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def report_conversion(outcome, reloaded: dict[str, Any] | None) -> None:
    """The side-by-side evaluation (a row per metric, a column per model, change against the original)."""
    from mha2mla_core.evaluation.report import Comparison

    comparison = Comparison.from_dict(outcome.table)
    if reloaded is not None:
        figures = {key: reloaded[key] for key in ("ppl", "kv_bytes_per_token")}
        comparison = comparison.with_model(f"{comparison.models[-1]}, reloaded (fresh process)", figures)
    header, *body = comparison.cells()
    table = Table(title=f"original vs MLA ({outcome.model_version}); change against the original in brackets")
    for i, column in enumerate(header):
        table.add_column(escape(column), justify="left" if i == 0 else "right")
    for cells in body:
        table.add_row(*(escape(cell) for cell in cells))
    console.print(table)
    hits = sum(v == "hit" for v in outcome.cache.values())
    console.print(f"stages: {len(outcome.cache) - hits} ran, {hits} cached")
    console.print(f"checkpoint: {outcome.checkpoint.uri}", soft_wrap=True)
    console.print(f"registered: models:/{outcome.model_version}   MLflow run: {outcome.run_id}", soft_wrap=True)
    if reloaded is not None:
        console.print(f"[bold]greedy sample[/bold] ({reloaded['model_class']}, reloaded):\n"
                      f"[dim]{reloaded['prompt']}[/dim]{reloaded['sample']}")  # fmt: skip


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

    try:
        load_catalog(file)  # a typo fails here, before anything starts
    except USER_ERRORS as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    outcome = run_with_progress(ctx, catalog, str(file))
    if json_output:
        print(json.dumps(outcome.model_dump(mode="json")))
    else:
        report_catalog(outcome)
    if outcome.failed:
        raise typer.Exit(1)


def report_catalog(outcome) -> None:
    table = Table(title=f"catalog summary (MLflow run {outcome.run_id})")
    suites = any(row.get("suites") for row in outcome.rows)
    for column in ("entry", "status", "PPL original", "PPL mla", "KV saving", *(["other suites (vs original)"] if suites else []),
                   "checkpoint / error"):  # fmt: skip
        table.add_column(column)
    for row in outcome.rows:
        ok = row["status"] == "ok"
        other = "\n".join(f"{label}: {cell}" for label, cell in row.get("suites", {}).items())
        table.add_row(
            row["entry"], "[green]ok" if ok else "[red]failed",
            f"{row['ppl_original']:.2f}" if ok else "", f"{row['ppl_mla']:.2f}" if ok else "",
            f"{row['kv_saving_pct']:.2f}%" if ok else "", *([escape(other)] if suites else []),
            escape(row["checkpoint"] if ok else row["error"]),
        )  # fmt: skip
    console.print(table)


@app.command()
def resume(ctx: typer.Context, run_id: str = typer.Argument(..., help="MLflow run id of a convert or catalog flow run (see `mha2mla runs`)")) -> None:
    """Rerun a flow run with the parameters stored with it; its completed stages are cache hits."""
    import mlflow

    from flows.catalog import CATALOG_FILE, catalog
    from flows.convert import CONFIG_FILE, ConvertParams
    from flows.convert import convert as convert_flow
    from infra.tracking import configure

    try:
        configure(Settings(), create=False)
        stored = _stored_config(mlflow, run_id, (CONFIG_FILE, CATALOG_FILE))
    except USER_ERRORS as exc:
        print_error(exc)
        raise typer.Exit(2) from None
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


def _stored_config(mlflow, run_id: str, names: tuple[str, ...]) -> dict:
    try:
        run = mlflow.get_run(run_id)
    except Exception as exc:  # MlflowException: unknown or malformed id
        raise LookupError(f"no MLflow run {run_id!r}; `mha2mla runs` lists them") from exc
    for name in names:
        try:
            return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{name}")
        except Exception:  # not this flow's file
            continue
    raise LookupError(f"run {run_id} is not a convert or catalog flow run (no {' or '.join(names)} stored with it)")


def _stored_params(run) -> dict[str, Any]:
    """The flow's parameters from its stored config.json (complete), else its MLflow params."""
    import mlflow

    from flows.convert import CONFIG_FILE

    try:
        stored = mlflow.artifacts.load_dict(f"{mlflow.get_run(run.run_id).info.artifact_uri}/{CONFIG_FILE}")
    except Exception:  # a run without the file (not a convert flow): fall back
        return run.params
    return _flat(stored["params"])


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="a converted checkpoint: local folder, models:/NAME/VERSION, models:/NAME@ALIAS or artifact URI (file://, s3://)"),
    out: Path = typer.Argument(..., help="new or empty folder to write the exported model to"),
    export_format: str = typer.Option("deepseek_v3", "--format", help="deepseek_v3: the format vLLM, SGLang, llama.cpp and TensorRT-LLM run MLA in"),
    target: str = typer.Option("hf", help="hf | llamacpp | vllm | trtllm: refuse a layout the engine's MLA kernels do not run"),
    check_tokens: int = typer.Option(512, help="packaged calibration tokens on which the export's logits are compared with the checkpoint's; 0 = no check"),
    json_output: bool = typer.Option(False, "--json", help="print what was written and measured as one JSON object on stdout"),
) -> None:
    """Write a converted checkpoint in a serving engine's format (README: Serving)."""
    from tasks.export import ExportParams, export_checkpoint

    if export_format != "deepseek_v3":
        raise typer.BadParameter(f"--format {export_format!r}: the one export format is deepseek_v3")
    try:
        summary = export_checkpoint(checkpoint, out, ExportParams(target=target, check_tokens=check_tokens))
    except USER_ERRORS as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    if json_output:
        print(json.dumps(summary))
        return
    table = Table(title=f"{escape(checkpoint)} -> {escape(str(out))} (deepseek_v3, target {target})", show_header=False)
    table.add_column("what")
    table.add_column("value", **ID_COLUMN)
    table.add_row("KV values per token and layer", f"{summary['kv_values_per_layer']} (original {summary['original_kv_values_per_layer']}, saves {summary['kv_saving']:.1%})")
    for key, value in summary.get("measured", {}).items():
        table.add_row(key, f"{value:.3g}" if isinstance(value, float) else str(value))
    table.add_row("files", ", ".join(summary["files"]))
    console.print(table)


@app.command()
def runs(
    limit: int = typer.Option(10, min=1, help="how many flow runs"),
    json_output: bool = typer.Option(False, "--json", help="print the runs as a JSON list on stdout"),
) -> None:
    """Recent flow runs (newest first) with each stage's status and cache outcome."""
    from infra.tracking import configure, recent_runs

    try:
        configure(Settings(), create=False)
    except USER_ERRORS as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    found = recent_runs(limit)
    if json_output:
        print(json.dumps([dataclasses.asdict(flow_run) for flow_run in found], default=str))
        return
    table = Table(title="recent flow runs")
    for column in ("run id", "name", "flow", "status", "started (UTC)", "stages"):
        table.add_column(column, **ID_COLUMN if column == "run id" else {})
    for flow_run in found:
        run = flow_run.run
        stages = "\n".join(
            escape(f"{s.name}: {s.status.lower()}") + (f" ({s.tags['mha2mla.cache']})" if "mha2mla.cache" in s.tags else "")
            for s in flow_run.stages
        )
        table.add_row(run.run_id, escape(run.name), run.tags.get("mha2mla.flow", ""), run.status.lower(),
                      run.start_time.strftime("%Y-%m-%d %H:%M:%S"), stages)  # fmt: skip
    console.print(table)


@app.command()
def lineage(
    uri: str = typer.Argument(..., help="a checkpoint: registry URI (models:/NAME/VERSION or models:/NAME@ALIAS), artifact URI (file://, s3://) or local folder"),
    json_output: bool = typer.Option(False, "--json", help="print the lineage as one JSON object on stdout"),
) -> None:
    """The model, data, code and config that produced the checkpoint at URI, from MLflow."""
    from infra.tracking import configure
    from infra.tracking import lineage as find_lineage

    try:
        configure(Settings(), create=False)
        found = find_lineage(uri)
    except USER_ERRORS as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    flow = found.flow.run if found.flow else found.producer
    if json_output:
        print(json.dumps({**dataclasses.asdict(found), "config": _stored_params(flow)}, default=str))
        return
    table = Table(title=f"lineage of {uri}", show_header=False)
    table.add_column("what")
    table.add_column("value", **ID_COLUMN)
    table.add_row("sha256", found.sha256)
    table.add_row("produced by", escape(f"{found.producer.name} (run {found.producer.run_id})"))
    table.add_row("flow run", f"{flow.name} (run {flow.run_id})")
    table.add_row("model", f"{flow.tags.get('mha2mla.model_source', '?')}")
    table.add_row("model digest", f"{flow.tags.get('mha2mla.model_digest', '?')}")
    table.add_row("code version", flow.tags.get("mha2mla.code_version", "?"))
    for key in sorted(k for k in flow.tags if k.startswith("mha2mla.version.")):
        table.add_row(key.removeprefix("mha2mla."), flow.tags[key])
    stages = found.flow.stages if found.flow else (found.producer,)
    for stage in stages:
        for dataset in stage.datasets:
            table.add_row(f"dataset {dataset.name}", f"sha256 {dataset.sha256}\nsource {dataset.source}")
    for key, value in sorted(_stored_params(flow).items()):
        table.add_row(f"config {key}", str(value))
    table.add_row("registered as", ", ".join(found.model_versions) or "-")
    console.print(table)
