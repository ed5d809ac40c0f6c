"""The multi-process path of the training stages on CPU: torchrun starts 2 gloo processes that sample the data-free
rows one process would sample, and train the model one process would train; a rank that fails raises an error
naming the log."""

import pytest
import torch
from safetensors.torch import save_file

from eval_tiny import tiny_lm, tiny_tokenizer
from mha2mla_core import MLAConfig, convert_to_mla, load_model
from mha2mla_core.training.config import FinetuneConfig
from mha2mla_core.training.launch import LaunchError, SampleJob, TrainJob, launch_finetune, launch_sampling, per_rank_config
from mha2mla_core.training.loop import finetune
from mha2mla_core.training.synthetic import mix_in_continuations

SEQ = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher and its MLA conversion, each saved with the tokenizer (what the stages hand the ranks)."""
    root = tmp_path_factory.mktemp("launch")
    tokenizer = tiny_tokenizer()
    teacher = tiny_lm(tokenizer)
    calib = torch.randint(3, len(tokenizer), (256,), generator=torch.Generator().manual_seed(1))
    student = convert_to_mla(teacher, MLAConfig(rope_strategy="2-norm", rope_dims=4, kv_rank=4, calib_seq_len=32), calib)
    for name, model in {"teacher": teacher, "student": student}.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = torch.randint(3, len(tokenizer), (6, SEQ), generator=torch.Generator().manual_seed(2))
    save_file({"rows": rows}, root / "rows.safetensors")
    return root, rows


def config() -> FinetuneConfig:
    # 4 steps of 4 rows: 1 process x 2 rows x 2 micro-steps, or 2 processes x 2 rows x 1
    return FinetuneConfig(max_tokens=4 * 4 * SEQ, seq_len=SEQ, micro_batch_size=2, grad_accum_steps=2, lr=3e-3,
                          warmup_frac=0.25, decay_frac=0.25, bf16=False, log_every=1)  # fmt: skip


@pytest.mark.slow
def test_two_gloo_processes_sample_and_train_as_one_process(models, tmp_path):
    root, rows = models
    job = SampleJob(teacher=str(root / "teacher"), rows=str(root / "rows.safetensors"), fraction=0.5, num_rows=10)
    sampled = launch_sampling(job, 2, tmp_path / "sample", device_type="cpu")
    teacher = load_model(str(root / "teacher"))[0]
    torch.testing.assert_close(sampled, mix_in_continuations(teacher, rows, 0.5, 10, batch_size=64))

    save_file({"rows": sampled}, tmp_path / "mixed.safetensors")
    events = []
    train = TrainJob(student=str(root / "student"), teacher=str(root / "teacher"), rows=str(tmp_path / "mixed.safetensors"),
                     config=config(), output=str(tmp_path / "out"))  # fmt: skip
    run = launch_finetune(train, 2, tmp_path / "train", device_type="cpu", on_event=events.append)
    single = finetune(load_model(str(root / "student"))[0], teacher, sampled, config())
    two = [h["loss"] for h in run.result.history if h["kind"] == "log"]
    torch.testing.assert_close(two, [h["loss"] for h in single.history if h["kind"] == "log"], rtol=1e-5, atol=1e-6)
    assert [e.step for e in events if e.kind == "log"] == [1, 2, 3, 4]  # streamed from rank 0 as they happened
    trained = load_model(str(tmp_path / "out"))[0]  # rank 0 saved the unsharded model with its tokenizer
    assert trained.config.model_type == load_model(str(root / "student"))[0].config.model_type
    assert run.peak_memory_bytes == (0, 0) and run.log.is_file()


@pytest.mark.slow
def test_a_failed_rank_raises_with_the_log(models, tmp_path):
    root, _ = models
    job = TrainJob(student=str(tmp_path / "missing"), teacher=None, rows=str(root / "rows.safetensors"),
                   config=config(), output=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(LaunchError, match=r"train on 2 processes failed \(torchrun exit 1\): rank \d: "
                                          r"FileNotFoundError: \S+missing does not exist") as err:
        launch_finetune(job, 2, tmp_path / "train", device_type="cpu")
    log = tmp_path / "train" / "launch.log"
    assert f"the full log of every rank: {log}" in str(err.value)
    assert "Traceback" in log.read_text()  # every rank's output, its traceback too


def test_the_global_batch_splits_over_the_processes_or_the_error_says_how():
    cfg = FinetuneConfig(max_tokens=4096, seq_len=SEQ, micro_batch_size=3, grad_accum_steps=4)
    assert per_rank_config(cfg, 2).grad_accum_steps == 2 and per_rank_config(cfg, 3).micro_batch_size == 1
    with pytest.raises(ValueError, match="does not split over 5 processes; make one of them a multiple of 5"):
        per_rank_config(cfg, 5)
