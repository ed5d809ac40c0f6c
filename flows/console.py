"""What the `mha2mla` CLI shows and how it ends: rich logging and progress, the tables of each command, one-line
errors with their exit status, and a process exit that skips the interpreter's slow teardown.

- User errors (`USER_ERRORS`: bad values, missing files, no store) print one line and exit 2 (`user_errors`);
  another fault prints one line and exits 1, its traceback shown with `--debug` (`run_with_progress`).
- A flow runs under `StageProgress`: a row per stage in a terminal, plain timestamped lines when piped.
- `--json` output goes to stdout alone; progress and messages move to stderr (`progress_to_stderr`).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flows.errors import describe_error, quiet_engine_logs
from infra.artifacts import StoreCheckError

# piped or redirected: lines as wide as a run id or digest needs, not rich's default of 80 columns
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
# loggers whose INFO records reach the Prefect UI (PREFECT_LOGGING_EXTRA_LOGGERS) and the CLI's stage display
RUN_LOGGERS = ("mha2mla.progress", "mha2mla_core", "tasks", "flows", "infra.stage")
# errors that are the user's to fix: printed as one message, no traceback
USER_ERRORS = (ValueError, LookupError, OSError, StoreCheckError)
ID_COLUMN = {"overflow": "fold", "min_width": 32}  # run ids and digests are folded onto more lines, never cut short


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


def print_error(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(describe_error(exc))}")


@contextmanager
def user_errors() -> Iterator[None]:
    """A user error raised inside prints its one-line message and exits 2."""
    try:
        yield
    except USER_ERRORS as exc:
        print_error(exc)
        raise typer.Exit(2) from None


def install_logging(verbose: bool) -> None:
    """Log records through rich (WARNING and up; INFO with --verbose); our run loggers' INFO goes to StageProgress.
    Without --verbose, the libraries' progress bars and chatter are off (set before they are imported)."""
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
            self.progress.console.print(f"{datetime.now():%H:%M:%S} {line}", soft_wrap=True, highlight=False)
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


def show_progress(fn, *args, verbose: bool, **kwargs):
    """Call a flow with a rich line per stage; user errors exit 2 with their message, other faults 1 with theirs
    (re-raised with `verbose`, for the traceback)."""
    handler = StageProgress(stage_progress(console), logging.INFO if verbose else logging.WARNING)
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with handler.progress, user_errors():
            return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except Exception as exc:  # a fault of ours or of a library: one line, the traceback with --verbose
        if verbose:
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


def report_catalog(outcome) -> None:
    table = Table(title=f"catalog summary (MLflow run {outcome.run_id})")
    suites = any(row.get("suites") for row in outcome.rows)
    for column in ("entry", "status", "PPL original", "PPL mla", "KV saving", *(["other suites (vs original)"] if suites else []),
                   "checkpoint / error"):  # fmt: skip
        table.add_column(column, **ID_COLUMN if column == "checkpoint / error" else {})  # URIs folded, never cut short
    for row in outcome.rows:
        ok = row["status"] == "ok"
        other = "\n".join(f"{label}: {cell}" for label, cell in row.get("suites", {}).items())
        table.add_row(
            row["entry"], "[green]ok" if ok else "[red]failed",
            f"{row['ppl_original']:.2f}" if ok else "", f"{row['ppl_mla']:.2f}" if ok else "",
            f"{row['kv_saving_pct']:.2f}%" if ok else "", *([escape(other)] if suites else []),
            escape(row["checkpoint"] + (f"\nexport {row['export']}" if row.get("export") else "") if ok else row["error"]),
        )  # fmt: skip
    console.print(table)


def report_export(title: str, summary: dict) -> None:
    table = Table(title=escape(title), show_header=False)
    table.add_column("what")
    table.add_column("value", **ID_COLUMN)
    table.add_row("KV values per token and layer", f"{summary['kv_values_per_layer']} (original {summary['original_kv_values_per_layer']}, saves {summary['kv_saving']:.1%})")
    blocks = f", whole {summary['kv_block']}-value blocks" if summary["kv_block"] > 1 else ""
    table.add_row("cached row", f"latent {summary['kv_lora_rank']} + RoPE key {summary['qk_rope_head_dim']}{blocks}")
    for key, value in summary.get("measured", {}).items():
        table.add_row(key, f"{value:.3g}" if isinstance(value, float) else str(value))
    table.add_row("files", ", ".join(summary["files"]))
    console.print(table)


def report_runs(found) -> None:
    """A row per flow run: full run id, name, flow, status, start, and each stage with its cache outcome."""
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


def report_lineage(uri: str, found, config: dict[str, Any]) -> None:
    """The writer of a checkpoint, its flow, the source model, code, datasets and config, untruncated."""
    flow = found.flow.run if found.flow else found.producer
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
    for key, value in sorted(config.items()):
        table.add_row(f"config {key}", str(value))
    table.add_row("registered as", ", ".join(found.model_versions) or "-")
    console.print(table)
