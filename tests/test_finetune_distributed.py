"""The distributed paths on CPU, DDP and FSDP: a 2-process gloo run under torchrun dies after its step-2 checkpoint,
a second launch resumes it, and its 4 logged losses match one process training on the same global batches.

Run as a script, this file is the worker that torchrun starts (one per rank).
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mha2mla_core.training.loop import FinetuneConfig, finetune

SEQ, STEPS = 16, 4
ROOT = Path(__file__).resolve().parents[1]


def setup():
    """Identical tiny teacher, student and rows on every rank (seeded)."""
    from tests.tiny_models import tiny_model

    teacher = tiny_model("llama-gqa")
    student = tiny_model("llama-gqa", seed=1)
    rows = torch.randint(3, 128, (12, SEQ), generator=torch.Generator().manual_seed(2))
    return teacher, student, rows


def config(world_size: int, strategy: str = "auto") -> FinetuneConfig:
    # the same global batch of 4 rows per step: 2 ranks x 1 row x 2 micro-steps, or 1 process x 2 rows x 2
    return FinetuneConfig(max_tokens=STEPS * 4 * SEQ, seq_len=SEQ, micro_batch_size=2 // world_size,
                          grad_accum_steps=2, lr=3e-3, warmup_frac=0.25, decay_frac=0.25, bf16=False,
                          log_every=1, checkpoint_every=2, strategy=strategy)


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history if h["kind"] == "log"]


def worker(mode: str, out_dir: Path, strategy: str) -> None:
    """mode `crash`: a run whose rank 0 dies after the step-2 checkpoint; `resume`: resume it to the end."""
    from mha2mla_core.training import init_distributed

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)  # the strategy line
    init_distributed(int(os.environ["LOCAL_RANK"]))
    teacher, student, rows = setup()

    def crash(event):  # callbacks run on rank 0: it dies, torchrun stops the other rank
        if event.step == 3:
            os._exit(3)

    callbacks = [crash] if mode == "crash" else []
    result = finetune(student, teacher, rows, config(2, strategy), checkpoint_dir=out_dir / "ckpt",
                      callbacks=callbacks)
    if torch.distributed.get_rank() == 0:
        (out_dir / "resumed.json").write_text(json.dumps([result.resumed_from_step, losses(result)]))
    torch.distributed.destroy_process_group()


def torchrun(mode: str, out_dir: Path, port: int, strategy: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           __file__, mode, str(out_dir), strategy]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_resume_after_a_crash_and_match_one_process(tmp_path, free_port, strategy):
    crashed = torchrun("crash", tmp_path, free_port, strategy)
    assert crashed.returncode != 0 and not (tmp_path / "resumed.json").exists(), crashed.stderr[-3000:]
    resumed = torchrun("resume", tmp_path, free_port, strategy)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"with {strategy.upper()}" in resumed.stderr
    resumed_from, distributed = json.loads((tmp_path / "resumed.json").read_text())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher, student, rows = setup()
        single = losses(finetune(student, teacher, rows, config(1)))
    finally:
        torch.set_num_threads(threads)
    assert resumed_from == 2
    torch.testing.assert_close(distributed, single, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
