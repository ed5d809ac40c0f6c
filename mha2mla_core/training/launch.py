"""Fine-tuning and teacher sampling as N processes under torchrun: the `finetune` and `finetune-data` stages'
path on a worker with several GPUs.

    job = TrainJob(student="ckpt/student", teacher="smollm2-135m", rows="rows.safetensors",
                   config=FinetuneConfig(max_tokens=20_000_000), output="ckpt/out", checkpoint_dir="ckpt/work")
    run = launch_finetune(job, nproc=2, workdir=Path("ckpt/launch"))   # the trained student is in ckpt/out

The parent writes the job as JSON in `workdir`, runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m mha2mla_core.training.launch JOB.json

and reads every line the ranks print: training events (`TrainEvent`s, from rank 0) go to `on_event`, the rest to
`on_line` (default: this module's logger), and all of it to `workdir/launch.log`. Each rank loads the student and the
teacher (all of it), joins the process group (NCCL on GPUs, gloo on CPUs) and trains the student replicated (DDP) or
sharded (FSDP), as `config.strategy` says (`distributed.wrap_model`); rank 0 saves the trained student
(`save_pretrained` + tokenizer) and `result.json`. A rank that fails stops the others (torchrun), and the parent
raises `LaunchError` with the last lines and the log's path.

The global batch stays the one `config` describes: with N processes each rank takes 1/N of `grad_accum_steps` (or,
when N does not divide it, of `micro_batch_size`; `per_rank_config`), so a step reads the same rows and the run
trains the same model, up to the order of float sums, whatever N is.

Sampling (`SampleJob`) splits `mix_in_continuations` by batch: rank r samples batches r, r + N, ... with the seeds
one process would use, writes them to `sampled-r.safetensors`, and the parent puts the rows together once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mha2mla_core.loading import load_model
from mha2mla_core.training.config import FinetuneConfig, FinetuneResult, TrainEvent
from mha2mla_core.training.distributed import World, current_world, init_distributed
from mha2mla_core.training.loop import finetune
from mha2mla_core.training.synthetic import plan_continuations, sample_batches, sampling_dtype

logger = logging.getLogger(__name__)

EVENT_MARK = "mha2mla-event "  # a rank's stdout line carrying one TrainEvent as JSON
TAIL_LINES = 40  # of the log, quoted in a LaunchError
_ROOT_CAUSE = re.compile(r"^\s*(rank|exitcode)\s*: (-?\d+)")  # torchrun's summary: "rank : 1 (...)", "exitcode : -9"
_RANK_ERROR = re.compile(r"^\[rank(\d+)\]: (\w+(Error|Exception)\b.*)")  # a rank's uncaught exception, as torch prints it


@dataclass(frozen=True)
class TrainJob:
    """What every rank of a fine-tuning launch reads; paths only, so that the job is a small JSON file."""

    student: str  # the converted checkpoint: a save_pretrained directory with its tokenizer
    teacher: str | None  # the original, as `load_model` takes it; None when the config needs no teacher
    rows: str  # a safetensors file holding "rows": (N, seq_len) token ids
    config: FinetuneConfig  # the global batch (see `per_rank_config`)
    output: str  # rank 0 saves the trained student here
    checkpoint_dir: str | None = None  # resumable checkpoints; a relaunch with the same one resumes


@dataclass(frozen=True)
class SampleJob:
    """`mix_in_continuations(teacher, rows, fraction, num_rows, seed=seed)`, its sampling split over the ranks."""

    teacher: str
    rows: str  # a safetensors file holding "rows": (N, T) real rows, the prompts' source
    fraction: float
    num_rows: int
    seed: int = 0


@dataclass(frozen=True)
class Launched:
    """A finished fine-tuning launch."""

    result: FinetuneResult
    peak_memory_bytes: tuple[int, ...]  # per rank: the CUDA allocator's peak (0 on CPU)
    seconds: float  # the whole launch: process start, loading, training, saving
    log: Path


class LaunchError(RuntimeError):
    """A rank failed (or was killed); the message holds the log's last lines and its path."""


# ---- the parent ----------------------------------------------------------------------------------------------------
def launch_finetune(job: TrainJob, nproc: int, workdir: Path, *, device_type: str = "cuda",
                    on_event: Callable[[TrainEvent], None] | None = None,
                    on_line: Callable[[str], None] | None = None) -> Launched:  # fmt: skip
    """Train `job` on `nproc` processes (one per GPU, or gloo processes on the CPU); see the module docstring."""
    per_rank_config(job.config, nproc)  # fails here, not in every rank
    start = time.perf_counter()
    log = _run(("train", job), nproc, workdir, device_type, on_event, on_line)
    saved = json.loads((workdir / "result.json").read_text())
    result = FinetuneResult(**{**saved["result"], "history": tuple(saved["result"]["history"])})
    return Launched(result, tuple(saved["peak_memory_bytes"]), time.perf_counter() - start, log)


def launch_sampling(job: SampleJob, nproc: int, workdir: Path, *, device_type: str = "cuda",
                    on_line: Callable[[str], None] | None = None) -> torch.Tensor:  # fmt: skip
    """The rows (num_rows, T) of `mix_in_continuations`, sampled by `nproc` processes."""
    _run(("sample", job), nproc, workdir, device_type, None, on_line)
    real, _ = plan_continuations(load_file(job.rows)["rows"], job.fraction, job.num_rows, seed=job.seed)
    sampled: dict[str, torch.Tensor] = {}
    for rank in range(nproc):
        sampled |= load_file(workdir / f"sampled-{rank}.safetensors")
    return torch.cat([real, *(sampled[k] for k in sorted(sampled, key=int))])  # (num_rows, T)


def per_rank_config(cfg: FinetuneConfig, nproc: int) -> FinetuneConfig:
    """`cfg` for one of `nproc` ranks, with the same global batch: grad_accum_steps / nproc, else micro_batch_size / nproc."""
    if cfg.grad_accum_steps % nproc == 0:
        return replace(cfg, grad_accum_steps=cfg.grad_accum_steps // nproc)
    if cfg.micro_batch_size % nproc == 0:
        return replace(cfg, micro_batch_size=cfg.micro_batch_size // nproc)
    raise ValueError(
        f"the global batch of micro_batch_size={cfg.micro_batch_size} x grad_accum_steps={cfg.grad_accum_steps} rows "
        f"does not split over {nproc} processes; make one of them a multiple of {nproc}, or use another GPU count"
    )


def _run(spec: tuple[str, TrainJob | SampleJob], nproc: int, workdir: Path, device_type: str,
         on_event: Callable[[TrainEvent], None] | None, on_line: Callable[[str], None] | None) -> Path:  # fmt: skip
    """torchrun the worker on `spec`; every line to workdir/launch.log, events to `on_event`, the rest to `on_line`."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc}; use >= 1")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "result.json").unlink(missing_ok=True)
    job_file, log = workdir / "job.json", workdir / "launch.log"
    job_file.write_text(json.dumps({"kind": spec[0], "job": asdict(spec[1]), "workdir": str(workdir.resolve())}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device_type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo processes on the CPU even on a machine with GPUs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", __name__, str(job_file)]  # fmt: skip
    reader = _LogReader(log, on_event, on_line or logger.info)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        reader.follow(proc.stdout)
    if proc.returncode != 0:
        raise LaunchError(f"{spec[0]} on {nproc} processes failed (torchrun exit {proc.returncode}): {reader.cause()}\n"
                          f"the full log of every rank: {log}\nits last lines:\n" + "\n".join(reader.tail))
    return log


class _LogReader:
    """Follows torchrun's output: writes the log, dispatches events and lines, remembers what failed."""

    def __init__(self, log: Path, on_event: Callable[[TrainEvent], None] | None, on_line: Callable[[str], None]):
        self.log, self.on_event, self.on_line = log, on_event, on_line
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.errors: list[str] = []  # each rank's uncaught exception
        self.root: dict[str, int] = {}  # the rank torchrun saw fail first, and its exit code

    def follow(self, stream) -> None:
        with open(self.log, "w") as f:
            for line in stream:
                f.write(line)
                f.flush()
                self._note(line.rstrip())

    def _note(self, line: str) -> None:
        self.tail.append(line)
        if found := _RANK_ERROR.match(line):
            self.errors.append(f"rank {found[1]}: {found[2]}")
        if "Root Cause" in line:
            self.root["seen"] = 1
        elif self.root and (found := _ROOT_CAUSE.match(line)):
            self.root.setdefault(found[1], int(found[2]))
        mark = line.find(EVENT_MARK)
        if mark < 0:
            self.on_line(line)
        elif self.on_event is not None:
            self.on_event(TrainEvent(**json.loads(line[mark + len(EVENT_MARK):])))

    def cause(self) -> str:
        """What failed: a rank's signal (the other ranks' errors follow from it), else each rank's exception."""
        errors = "; ".join(dict.fromkeys(self.errors)) or "no rank raised; see the last lines"
        code = self.root.get("exitcode", 0)
        if code < 0:
            return f"rank {self.root.get('rank')} was killed by {signal.Signals(-code).name}; then {errors}"
        return errors


# ---- the ranks -----------------------------------------------------------------------------------------------------
def main(job_file: str) -> None:
    """One rank, started by torchrun: join the group, run the job, leave the group."""
    spec = json.loads(Path(job_file).read_text())
    device = init_distributed(int(os.environ["LOCAL_RANK"]))
    world = current_world()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format=f"[rank {world.rank}] %(name)s: %(message)s")  # fmt: skip
    logger.info("rank %d of %d: pid %d on %s", world.rank, world.size, os.getpid(), device)
    workdir = Path(spec["workdir"])
    if spec["kind"] == "train":
        config = spec["job"]["config"]
        job = TrainJob(**{**spec["job"], "config": FinetuneConfig(**{**config, "betas": tuple(config["betas"])})})
        _train(job, device, world, workdir)
    else:
        _sample(SampleJob(**spec["job"]), device, world, workdir)
    dist.destroy_process_group()


def _train(job: TrainJob, device: torch.device, world: World, workdir: Path) -> None:
    cfg = per_rank_config(job.config, world.size)
    student, tokenizer = load_model(job.student)
    teacher = load_model(job.teacher)[0].to(device) if job.teacher is not None else None
    rows = load_file(job.rows)["rows"].long()  # (N, seq_len)
    result = finetune(student.to(device), teacher, rows, cfg, checkpoint_dir=job.checkpoint_dir,
                      callbacks=[_log_event])  # fmt: skip
    del teacher
    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peaks: list[int] = [0] * world.size
    dist.all_gather_object(peaks, peak)
    if world.is_main:
        plain = load_model(job.student)[0]  # unsharded, on the CPU
        plain.load_state_dict(state)
        plain.save_pretrained(job.output)
        tokenizer.save_pretrained(job.output)
        (workdir / "result.json").write_text(json.dumps({"result": asdict(result), "peak_memory_bytes": peaks}))
    dist.barrier()


def _log_event(event: TrainEvent) -> None:
    """One line on stdout that the parent turns back into `event` (callbacks run on rank 0 only)."""
    logger.info("%s%s", EVENT_MARK, json.dumps(asdict(event)))


def _sample(job: SampleJob, device: torch.device, world: World, workdir: Path) -> None:
    teacher = load_model(job.teacher)[0].to(device, sampling_dtype(device))
    rows = load_file(job.rows)["rows"]  # (N, T)
    _, prompts = plan_continuations(rows, job.fraction, job.num_rows, seed=job.seed)
    start = time.perf_counter()
    batches = sample_batches(teacher, prompts, rows.shape[1], seed=job.seed, shard=(world.rank, world.size))
    sampled = sum(b.numel() for b in batches.values())
    logger.info("sampled %d rows (%d tokens) in %.1f s", sum(b.shape[0] for b in batches.values()), sampled,
                time.perf_counter() - start)
    save_file({str(k): v.contiguous() for k, v in batches.items()}, workdir / f"sampled-{world.rank}.safetensors")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    # Leave without the interpreter's teardown. There, the garbage collector can free a DDP reducer, whose gloo
    # process group joins its worker thread while holding the GIL that the thread waits for (a rank hung so after
    # its last step in a CPU test). Every result is on disk and the group is left by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
