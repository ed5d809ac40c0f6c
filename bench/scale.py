"""Scale: the `finetune` stage on 1 and 2 GPUs (FSDP under torchrun), a rank killed and the run resumed, and a
Llama-3-8B-shape conversion on one GPU.

    # the GPU machine (2 GPUs): every part, each result written as soon as it is measured
    python3 bench/scale.py all --gguf /root/ft/model.gguf --data .carry_data --out $OUT
    # here, on the CPU: the same code paths on small budgets and tiny shapes, 2 gloo processes
    .venv/bin/python bench/scale.py all --tiny --out runs/scale
    # here: the loss-curve figure of the kill and resume, from the JSON
    .venv/bin/python bench/scale.py figure bench/results/scale

Parts (each runs the stages' own multi-process path, `mha2mla_core.training.launch`, which the `finetune-data` and
`finetune` tasks call when the worker has MHA2MLA_GPUS > 1; the Prefect and MLflow layer around it is not installed
on the GPU machine):
- smollm2: the real SmolLM2-135M converted with the default MLAConfig (rotated RoPE, rope_dims 8, kv_rank 16,
  output-aware SVD) on data-free calibration (book windows continued by the original); data-free rows sampled by the
  original on 2 GPUs; KD fine-tuning on 1 GPU, then 2; then on 2 GPUs again with rank 1 SIGKILLed after the mid-way
  checkpoint, and the same launch again, which resumes.
- llama1b: the same on a randomly initialised Llama-3.2-1B shape (random rows, no sampling), 1 GPU then 2.
- convert8b: a randomly initialised Llama-3-8B shape on one GPU through the conversion stages' core calls:
  sample-calibration (+ the data-free continuation), svd-init (layer by layer), timed, with peak GPU and host memory.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import typer
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from bench.memory import PeakRSS
from bench.shapes import LLAMA_3_8B, LLAMA_32_1B
from mha2mla_core import MLAConfig, convert_to_mla, convert_to_mla_with_report, load_model, sample_calibration
from mha2mla_core.conversion.calibration import continue_with_model
from mha2mla_core.training.config import FinetuneConfig, TrainEvent
from mha2mla_core.training.launch import LaunchError, SampleJob, TrainJob, launch_finetune, launch_sampling

logger = logging.getLogger("bench.scale")
app = typer.Typer(add_completion=False, no_args_is_help=True)

# ---- defaults ----------------------------------------------------------------------------------------------------
CALIB_BOOKS = ("pg1342.txt", "pg1661.txt", "pg98.txt")  # as bench/finetune.py: Austen, Doyle, Dickens


@dataclass(frozen=True)
class Budget:
    calib_tokens: int = 32_768  # data-free calibration: book windows of 512 continued by the original
    calib_seq_len: int = 512
    seq_len: int = 1024
    micro_batch: int = 16  # rows per forward per GPU; x grad_accum 2 = 32 rows (32,768 tokens) per optimizer step
    grad_accum: int = 2  # on 1 GPU; on 2 GPUs each takes 1 (launch.per_rank_config)
    steps: int = 32  # SmolLM2 optimizer steps
    sampled_rows: int = 512  # data-free rows sampled by the teacher (the steps take 2 epochs of them)
    big_micro_batch: int = 8  # Llama-3.2-1B: 8 rows x 4 = 32 rows per step
    big_grad_accum: int = 4
    big_steps: int = 8
    log_every: int = 4
    big_log_every: int = 2
    shape_1b: dict | None = None  # None: LLAMA_32_1B
    shape_8b: dict | None = None  # None: LLAMA_3_8B
    convert_calib_tokens: int = 8192  # the pipeline's default (CalibrationParams.num_tokens)


TINY_SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512)  # fmt: skip
TINY = Budget(calib_tokens=1024, calib_seq_len=128, seq_len=64, micro_batch=2, steps=6, sampled_rows=16,
              big_micro_batch=2, big_grad_accum=2, big_steps=4, log_every=1, big_log_every=1, shape_1b=TINY_SHAPE,
              shape_8b=TINY_SHAPE, convert_calib_tokens=512)  # fmt: skip


@dataclass
class Context:
    out: Path  # JSON results (and the figure)
    work: Path  # models, rows, checkpoints
    data: Path
    budget: Budget
    gpus: int  # 2 on the GPU machine; gloo processes on the CPU
    device_type: str
    gguf: str = "smollm2-135m"  # the real model, and the tokenizer the random shapes are saved with
    strategy: str = "fsdp"  # FinetuneConfig.strategy of every launch (the product's default is auto)
    started: float = 0.0
    _tokenizer: object = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_model(self.gguf)[1]
        return self._tokenizer

    def write(self, name: str, result: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"== {name}: {json.dumps(_summary(result))}", flush=True)


# ---- shared pieces -------------------------------------------------------------------------------------------------
def finetune_config(ctx: Context, big: bool, **changes) -> FinetuneConfig:
    b = ctx.budget
    micro, accum, steps = (b.big_micro_batch, b.big_grad_accum, b.big_steps) if big else (b.micro_batch, b.grad_accum, b.steps)
    cfg = FinetuneConfig(max_tokens=steps * micro * accum * b.seq_len, seq_len=b.seq_len, micro_batch_size=micro,
                         grad_accum_steps=accum, lr=6e-4, kd_weight=1.0, decay_frac=0.5,
                         log_every=b.big_log_every if big else b.log_every, bf16=ctx.device_type == "cuda",
                         strategy=ctx.strategy)  # fmt: skip
    return replace(cfg, **changes)


def train(ctx: Context, job: TrainJob, nproc: int, name: str, **hooks) -> dict:
    """One launch of the stage's training path on `nproc` GPUs: throughput per GPU, peak memory, wall time, losses."""
    run = launch_finetune(job, nproc, ctx.work / name, device_type=ctx.device_type, on_line=_quiet, **hooks)
    logs = [h for h in run.result.history if h["kind"] == "log"]
    windows = [h["tokens_per_s"] for h in logs if run.result.resumed_from_step is None or
               h["step"] > run.result.resumed_from_step][1:]  # the first window holds the warm-up
    tok_s = statistics.median(windows) if windows else run.result.tokens_per_s
    return {"gpus": nproc, "steps": run.result.steps, "tokens": run.result.tokens,
            "tokens_per_s": round(tok_s), "tokens_per_s_per_gpu": round(tok_s / nproc),
            "peak_memory_gib_per_gpu": [round(b / 2**30, 2) for b in run.peak_memory_bytes],
            "launch_wall_s": round(run.seconds, 1), "train_s": round(run.result.seconds, 1),
            "resumed_from_step": run.result.resumed_from_step, "final_loss": run.result.final_loss,
            "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in logs]}  # fmt: skip


def scaling(one: dict, two: dict) -> dict:
    return {"efficiency": round(two["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"], 3),
            "speedup": round(two["tokens_per_s"] / one["tokens_per_s"], 3)}


def save_model(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _quiet(line: str) -> None:
    """Rank output worth seeing live: errors and the ranks' own starts; the rest is in each launch.log."""
    if re.search(r"Error|error|rank \d+ of \d+: pid|sampled \d+ rows", line):
        print("   " + line, flush=True)


# ---- part 1: SmolLM2-135M ------------------------------------------------------------------------------------------
def smollm2(ctx: Context) -> dict:
    """Convert, sample data-free rows on 2 GPUs, fine-tune on 1 and 2 GPUs, kill a rank and resume."""
    t0 = time.perf_counter()
    teacher, tokenizer = load_model(ctx.gguf)
    ctx._tokenizer = tokenizer
    plain = LlamaForCausalLM(teacher.config)  # a GGUF-loaded model refuses save_pretrained: its weights, plainly
    plain.load_state_dict(teacher.state_dict())
    teacher_dir = save_model(plain, tokenizer, ctx.work / "smollm2" / "teacher")  # the ranks load this, not the GGUF
    student_dir, convert_s = convert_smollm2(ctx, teacher, tokenizer)
    del teacher
    rows_file, sample = sample_rows(ctx, teacher_dir)
    result = {"model": "SmolLM2-135M", "gguf": ctx.gguf, "mla": MLAConfig().to_dict(), "convert_s": convert_s,
              "sampling": sample, "prepare_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    job = TrainJob(student=student_dir, teacher=teacher_dir, rows=rows_file, config=finetune_config(ctx, False),
                   output=str(ctx.work / "smollm2" / "out"))  # fmt: skip
    result["config"] = asdict(job.config)
    result["one_gpu"] = train(ctx, job, 1, "smollm2-1gpu")
    ctx.write("smollm2", result)
    result["two_gpus"] = train(ctx, job, ctx.gpus, "smollm2-2gpu")
    result["scaling"] = scaling(result["one_gpu"], result["two_gpus"])
    result["recovery_recipe_wall_s"] = round(sample["wall_s"] + result["two_gpus"]["launch_wall_s"], 1)
    ctx.write("smollm2", result)
    result["kill_resume"] = kill_and_resume(ctx, job, result["two_gpus"])
    ctx.write("smollm2", result)
    return result


def convert_smollm2(ctx: Context, teacher, tokenizer) -> tuple[str, float]:
    """The default MLAConfig on data-free calibration (book windows continued by the original), on the GPU."""
    b, device = ctx.budget, _device(ctx)
    texts = [(ctx.data / book).read_text(encoding="utf-8") for book in CALIB_BOOKS]
    start = time.perf_counter()
    sample = sample_calibration(texts, tokenizer, num_tokens=b.calib_tokens, seq_len=b.calib_seq_len, seed=0)
    source = copy.deepcopy(teacher).to(device)
    calib = continue_with_model(source, sample, b.calib_seq_len).input_ids
    student = convert_to_mla(source, MLAConfig(calib_seq_len=b.calib_seq_len), calib.to(device))
    seconds = round(time.perf_counter() - start, 1)
    path = save_model(student.cpu(), tokenizer, ctx.work / "smollm2" / "student")
    del source, student
    _empty_cache()
    return path, seconds


def sample_rows(ctx: Context, teacher_dir: str) -> tuple[str, dict]:
    """The `finetune-data` stage's sampling with synthetic_fraction 1: the prompts from the packed training text."""
    b = ctx.budget
    stream = torch.from_numpy(np.load(ctx.data / "text_train_ids.npz")["ids"].astype(np.int64))
    n = min(stream.numel() // b.seq_len, 2 * b.sampled_rows)  # enough real rows to draw varied prompts from
    real = ctx.work / "smollm2" / "packed.safetensors"
    save_file({"rows": stream[: n * b.seq_len].view(n, b.seq_len).contiguous()}, real)
    job = SampleJob(teacher=teacher_dir, rows=str(real), fraction=1.0, num_rows=b.sampled_rows)
    start = time.perf_counter()
    rows = launch_sampling(job, ctx.gpus, ctx.work / "sample", device_type=ctx.device_type, on_line=_quiet)
    wall = time.perf_counter() - start
    path = ctx.work / "smollm2" / "rows.safetensors"
    save_file({"rows": rows.to(torch.int32)}, path)
    return str(path), {"gpus": ctx.gpus, "rows": rows.shape[0], "tokens": rows.numel(), "wall_s": round(wall, 1),
                       "tokens_per_s": round(rows.numel() / wall)}  # fmt: skip


def kill_and_resume(ctx: Context, job: TrainJob, uninterrupted: dict) -> dict:
    """2 GPUs, a checkpoint every half of the steps; rank 1 SIGKILLed at 3/4; the same launch again resumes."""
    steps = job.config.total_steps(1)
    ckpt, kill_at = str(ctx.work / "smollm2" / "ckpt"), 3 * steps // 4
    shutil.rmtree(ckpt, ignore_errors=True)
    job = replace(job, config=replace(job.config, checkpoint_every=steps // 2, keep_last=1), checkpoint_dir=ckpt)
    pids, seen, killed = {}, [], {}

    def on_line(line: str) -> None:
        if found := re.search(r"rank (\d+) of \d+: pid (\d+)", line):
            pids[int(found[1])] = int(found[2])
        _quiet(line)

    def on_event(event: TrainEvent) -> None:
        seen.append(event)
        if event.kind == "log" and event.step >= kill_at and not killed:
            os.kill(pids[1], signal.SIGKILL)
            killed.update(step=event.step, pid=pids[1], at=time.perf_counter())
            print(f"   SIGKILL rank 1 (pid {pids[1]}) after step {event.step}", flush=True)

    start = time.perf_counter()
    try:
        launch_finetune(job, ctx.gpus, ctx.work / "smollm2-killed", device_type=ctx.device_type, on_event=on_event,
                        on_line=on_line)  # fmt: skip
        error = "the launch finished: no rank was killed"
    except LaunchError as err:
        error = str(err).splitlines()[0]
    killed_wall = time.perf_counter() - start
    resumed = train(ctx, job, ctx.gpus, "smollm2-resumed")
    after = {p["step"]: p["loss"] for p in resumed["loss_curve"]}
    same = [abs(after[p["step"]] - p["loss"]) for p in uninterrupted["loss_curve"] if p["step"] in after and
            p["step"] > (resumed["resumed_from_step"] or 0)]  # fmt: skip
    return {"checkpoint_every": steps // 2, "killed_after_step": killed.get("step"), "launch_error": error,
            "killed_run_wall_s": round(killed_wall, 1),
            "killed_curve": [{"step": e.step, "loss": e.metrics["loss"]} for e in seen if e.kind == "log"],
            "checkpoints": [e.step for e in seen if e.kind == "checkpoint"], "resumed": resumed,
            "max_abs_loss_diff_vs_uninterrupted": max(same) if same else None}  # fmt: skip


# ---- part 2: Llama-3.2-1B shape ------------------------------------------------------------------------------------
def llama1b(ctx: Context) -> dict:
    """A random Llama-3.2-1B shape converted to MLA on the GPU, then KD fine-tuning on random rows, 1 GPU then 2."""
    b, device = ctx.budget, _device(ctx)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        teacher = LlamaForCausalLM(LlamaConfig(**(b.shape_1b or LLAMA_32_1B))).eval()
    vocab = teacher.config.vocab_size
    calib = torch.randint(0, vocab, (8192,), generator=torch.Generator().manual_seed(0))
    student = convert_to_mla(copy.deepcopy(teacher), MLAConfig(calib_seq_len=b.calib_seq_len), calib.to(device))
    work = ctx.work / "llama1b"
    teacher_dir = save_model(teacher.cpu(), ctx.tokenizer, work / "teacher")
    student_dir = save_model(student.cpu(), ctx.tokenizer, work / "student")
    params = sum(p.numel() for p in teacher.parameters())
    del teacher, student
    _empty_cache()
    rows = torch.randint(0, vocab, (b.big_steps * b.big_micro_batch * b.big_grad_accum, b.seq_len),
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
    save_file({"rows": rows.to(torch.int32)}, work / "rows.safetensors")
    job = TrainJob(student=student_dir, teacher=teacher_dir, rows=str(work / "rows.safetensors"),
                   config=finetune_config(ctx, True), output=str(work / "out"))  # fmt: skip
    result = {"model": "Llama-3.2-1B shape, random weights", "params_m": round(params / 1e6, 1),
              "prepare_s": round(time.perf_counter() - start, 1), "config": asdict(job.config)}  # fmt: skip
    result["one_gpu"] = train(ctx, job, 1, "llama1b-1gpu")
    ctx.write("llama1b", result)
    result["two_gpus"] = train(ctx, job, ctx.gpus, "llama1b-2gpu")
    result["scaling"] = scaling(result["one_gpu"], result["two_gpus"])
    ctx.write("llama1b", result)
    return result


# ---- part 3: Llama-3-8B shape conversion ---------------------------------------------------------------------------
def convert8b(ctx: Context) -> dict:
    """The conversion stages' core calls on a random Llama-3-8B shape, all on one GPU, layer by layer."""
    b, device = ctx.budget, _device(ctx)
    shape = b.shape_8b or LLAMA_3_8B
    texts = [(ctx.data / book).read_text(encoding="utf-8") for book in CALIB_BOOKS]
    stages: dict[str, float] = {}
    _reset_peak()
    with PeakRSS() as host:
        start = time.perf_counter()
        sample = sample_calibration(texts, ctx.tokenizer, num_tokens=b.convert_calib_tokens, seq_len=b.calib_seq_len)
        stages["sample-calibration"] = time.perf_counter() - start
        start = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(device):
            source = LlamaForCausalLM(LlamaConfig(**shape)).eval()  # stands in for load_source: fp32, as the stages load
        stages["load (random init on the GPU)"] = time.perf_counter() - start
        start = time.perf_counter()
        sample = continue_with_model(source, sample, b.calib_seq_len)
        stages["sample-calibration --calib-model-samples (continuation)"] = time.perf_counter() - start
        mla, report = convert_to_mla_with_report(source, MLAConfig(calib_seq_len=b.calib_seq_len),
                                                 sample.input_ids.to(device))  # fmt: skip
        stages["svd-init (convert_to_mla, layer by layer)"] = report.seconds
    original_bytes = 2 * shape["num_key_value_heads"] * shape["head_dim"] * shape["num_hidden_layers"] * 2  # bf16
    mla_bytes = mla.kv_bytes_per_token() / 2  # measured in fp32: as bf16
    result = {"model": "Llama-3-8B shape, random weights", "device": _device_name(ctx, one=True),
              "params_b": round(sum(p.numel() for p in source.parameters()) / 1e9, 2), "mla": MLAConfig().to_dict(),
              "calib_tokens": int(sample.input_ids.numel()), "stage_s": {k: round(v, 1) for k, v in stages.items()},
              "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else 0,
              "peak_host_rss_gib": round(host.bytes / 2**30, 1), "kv_bytes_per_token_bf16": mla_bytes,
              "original_kv_bytes_per_token_bf16": original_bytes, "kv_saving": round(1 - mla_bytes / original_bytes, 4),
              "model_gib_fp32": round(sum(p.numel() for p in source.parameters()) * 4 / 2**30, 1)}  # fmt: skip
    del source, mla
    _empty_cache()
    ctx.write("convert8b", result)
    return result


# ---- commands ------------------------------------------------------------------------------------------------------
@app.command("all")
def run_all(gguf: str = "smollm2-135m", data: Path = Path(".carry_data"), out: Path = Path("runs/scale"),
            work: Path = Path("runs/scale/work"), tiny: bool = False,
            parts: str = "smollm2,convert8b,llama1b", strategy: str = "fsdp") -> None:  # fmt: skip
    """Every part in order; a part that fails is reported and the next one runs. `--strategy ddp|fsdp|auto`: how
    the 2-GPU launches hold the student."""
    cuda = torch.cuda.is_available() and not tiny
    ctx = Context(out, work, data, TINY if tiny else Budget(), gpus=2, device_type="cuda" if cuda else "cpu",
                  gguf=gguf, strategy=strategy, started=time.perf_counter())  # fmt: skip
    if cuda and torch.cuda.device_count() < 2:
        raise typer.BadParameter(f"{torch.cuda.device_count()} GPU here; the scaling needs 2")
    print(f"{ctx.device_type}: {_device_name(ctx)}; budget {asdict(ctx.budget)}", flush=True)
    for part in parts.split(","):
        start = time.perf_counter()
        try:
            {"smollm2": lambda: smollm2(ctx), "llama1b": lambda: llama1b(ctx), "convert8b": lambda: convert8b(ctx)}[part]()
        except Exception as err:  # noqa: BLE001 - the bench reports a failed part and runs the next
            logger.exception("part %s failed", part)
            ctx.write(f"{part}-failed", {"error": f"{type(err).__name__}: {err}"})
        print(f"== part {part}: {time.perf_counter() - start:.0f} s (total {time.perf_counter() - ctx.started:.0f} s)",
              flush=True)  # fmt: skip
    if (out / "smollm2.json").is_file():
        figure(out)


@app.command()
def figure(results: Path = typer.Argument(Path("bench/results/scale"))) -> None:
    """kill_resume.png: the uninterrupted 2-GPU loss curve, the killed run's, and the resumed run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.loads((results / "smollm2.json").read_text())
    kr = run.get("kill_resume")
    if kr is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = {"uninterrupted (2 GPUs)": (run["two_gpus"]["loss_curve"], dict(color="0.6", lw=4, alpha=0.5)),
              f"killed (rank 1 SIGKILL after step {kr['killed_after_step']})": (kr["killed_curve"], dict(marker="x")),
              f"resumed from step {kr['resumed']['resumed_from_step']}": (
                  [p for p in kr["resumed"]["loss_curve"] if p["step"] > (kr["resumed"]["resumed_from_step"] or 0)],
                  dict(marker="o", ms=3))}  # fmt: skip
    for label, (curve, style) in curves.items():
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=label, **style)
    for step in kr["checkpoints"]:
        ax.axvline(step, color="k", ls=":", lw=0.8)
    ax.set(xlabel="optimizer step (32,768 tokens)", ylabel="KD loss", title="SmolLM2-135M -> MLA, FSDP on 2 GPUs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "kill_resume.png", dpi=120)
    (results / "kill_resume.json").write_text(json.dumps({k: v[0] for k, v in curves.items()}, indent=1))


def _device(ctx: Context) -> torch.device:
    return torch.device("cuda" if ctx.device_type == "cuda" else "cpu")


def _device_name(ctx: Context, one: bool = False) -> str:
    if ctx.device_type != "cuda":
        return "cpu"
    return f"{1 if one else torch.cuda.device_count()} x {torch.cuda.get_device_name()}"


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _summary(result: dict) -> dict:
    """The figures of a result without its curves (the printed line)."""
    if isinstance(result, dict):
        return {k: _summary(v) for k, v in result.items() if not k.endswith("curve") and k != "config"}
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    app()
