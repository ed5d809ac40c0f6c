"""Fine-tuning stage on tiny CPU Llamas: loss, schedule, packing, exact resume, checkpoints, bad input.

The student is a perturbed copy of the teacher, standing in for a converted model until conversion lands.
"""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from mha2mla_core.training.loop import FinetuneConfig, finetune, pack_texts, set_trainable
from mha2mla_core.training import losses
from mha2mla_core.training.checkpoint import list_checkpoints
from mha2mla_core.training.packing import RowOrder
from mha2mla_core.training.schedule import wsd_lr

VOCAB, SEQ = 64, 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    yield
    torch.set_num_threads(threads)


def tiny_llama(num_key_value_heads=2, hidden_size=64) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=num_key_value_heads, tie_word_embeddings=True,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def perturbed_copy(model: LlamaForCausalLM, scale=0.05) -> LlamaForCausalLM:
    student = LlamaForCausalLM(model.config)
    student.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "self_attn" in name:
                p.add_(scale * torch.randn_like(p))
    return student


def rows(n=24):
    return torch.randint(0, VOCAB, (n, SEQ))


def small_cfg(**overrides) -> FinetuneConfig:
    base = dict(max_tokens=6 * 2 * SEQ, seq_len=SEQ, micro_batch_size=2, lr=1e-3, warmup_frac=0.2, decay_frac=0.4,
                bf16=False, log_every=1)
    return FinetuneConfig(**{**base, **overrides})


def log_losses(result):
    return [h["loss"] for h in result.history if h["kind"] == "log"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_distill_loss_matches_autograd_reference(monkeypatch, compiled):
    monkeypatch.setattr(losses, "_CHUNK_ROWS", 5)  # several chunks, the last one partial
    s = torch.randn(2, 7, 11, requires_grad=True)
    t, ids = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    for w, tau in [(0.0, 1.0), (1.0, 1.0), (0.3, 2.0)]:
        loss, lm, kd = losses.distill_loss(s, t, ids, w, tau, compiled=compiled)
        (grad,) = torch.autograd.grad(1.7 * loss, s)
        ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
        kl = tau**2 * F.kl_div(F.log_softmax(s / tau, -1).reshape(-1, 11), F.log_softmax(t / tau, -1).reshape(-1, 11),
                               log_target=True, reduction="batchmean")
        ref = (1 - w) * ce + w * kl
        (ref_grad,) = torch.autograd.grad(1.7 * ref, s)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(lm, ce.detach())
        torch.testing.assert_close(grad, ref_grad)
        if w > 0:
            torch.testing.assert_close(kd, kl.detach())


def test_wsd_schedule_warms_up_holds_and_decays():
    cfg = FinetuneConfig(max_tokens=1 << 20, lr=1.0, warmup_frac=0.1, decay_frac=0.3, min_lr_ratio=0.1)
    lrs = [wsd_lr(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0
    assert set(lrs[10:70]) == {1.0}
    assert lrs[70] < 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[69:], lrs[70:]))


def test_pack_texts_ends_documents_with_eos_and_cuts_rows():
    class Tok:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    packed = pack_texts(Tok(), ["abc", "de", "fghij"], seq_len=4)
    assert packed.tolist() == [[97, 98, 99, 0], [100, 101, 0, 102], [103, 104, 105, 106]]
    with pytest.raises(ValueError, match="fewer than one row"):
        pack_texts(Tok(), ["a"], seq_len=4)


def test_row_order_is_seeded_per_epoch_and_covers_each_row_once():
    order = RowOrder(5, seed=3)
    first, second = order.rows(0, 5), order.rows(5, 5)
    assert sorted(first.tolist()) == list(range(5)) and sorted(second.tolist()) == list(range(5))
    assert first.tolist() != second.tolist()
    assert RowOrder(5, seed=3).rows(3, 4).tolist() == first.tolist()[3:] + second.tolist()[:2]


def test_distillation_pulls_the_student_towards_the_teacher():
    teacher = tiny_llama()
    student = perturbed_copy(teacher, scale=0.2)
    data = rows()
    cfg = small_cfg(max_tokens=40 * 2 * SEQ, lr=3e-3, warmup_frac=0.1, decay_frac=0.2)
    result = finetune(student, teacher, data, cfg)
    kd = [h["kd_loss"] for h in result.history if h["kind"] == "log"]
    assert result.steps == 40 and result.tokens == 40 * 2 * SEQ
    assert kd[-1] < 0.5 * kd[0]


def test_hidden_state_distillation_pulls_every_layer_towards_the_teacher():
    teacher = tiny_llama()
    data = rows()
    with torch.no_grad():
        target = teacher(input_ids=data, output_hidden_states=True).hidden_states[1:]

    def layer_error(model):
        with torch.no_grad():
            return losses.hidden_state_loss(model(input_ids=data, output_hidden_states=True).hidden_states[1:], target)

    student = perturbed_copy(teacher, scale=0.2)
    before = layer_error(student)
    cfg = small_cfg(max_tokens=30 * 2 * SEQ, lr=3e-3, kd_weight=0.0, hidden_weight=1.0)
    result = finetune(student, teacher, data, cfg)
    hidden = [h["hidden_loss"] for h in result.history if h["kind"] == "log"]
    assert hidden[-1] < 0.5 * hidden[0] and layer_error(student) < 0.5 * before
    assert all("kd_loss" in h for h in result.history if h["kind"] == "log")  # the teacher ran, for the hidden states
    with pytest.raises(ValueError, match=r"hidden_weight=1.0\) needs a teacher"):
        finetune(perturbed_copy(teacher), None, data, cfg)
    with pytest.raises(ValueError, match=r"hidden_weight=-1 must be >= 0"):
        small_cfg(hidden_weight=-1)


def test_attention_only_trains_only_attention_and_lm_only_skips_the_teacher():
    teacher = tiny_llama()
    student = perturbed_copy(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}

    class NoForward(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("kd_weight=0 must not run the teacher")

    finetune(student, NoForward(), rows(), small_cfg(trainable="attention", kd_weight=0.0))
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".self_attn." in k for k in changed)
    assert set_trainable(student, "attention+norms") > set_trainable(student, "attention")


def test_resume_after_a_crash_gives_the_uninterrupted_losses_and_weights(tmp_path):
    teacher, data = tiny_llama(), rows()
    cfg = small_cfg(checkpoint_every=3, grad_accum_steps=2, max_tokens=6 * 4 * SEQ)
    uninterrupted = perturbed_copy(teacher)
    start = {k: v.clone() for k, v in uninterrupted.state_dict().items()}
    reference = finetune(uninterrupted, teacher, data, cfg)

    def crash_at_step_5(event):
        if event.kind == "log" and event.step == 5:
            raise KeyboardInterrupt

    crashed = perturbed_copy(teacher)
    crashed.load_state_dict(start)
    with pytest.raises(KeyboardInterrupt):
        finetune(crashed, teacher, data, cfg, checkpoint_dir=tmp_path, callbacks=[crash_at_step_5])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]
    resumed_student = perturbed_copy(teacher)  # a fresh process: the initial weights again
    resumed_student.load_state_dict(start)
    resumed = finetune(resumed_student, teacher, data, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    assert log_losses(resumed) == log_losses(reference)
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed_student.state_dict()[key], value), key


def test_checkpoints_every_few_minutes_land_on_log_steps(tmp_path):
    """checkpoint_minutes saves at the first log step after the interval (here: every log step), and only with a
    checkpoint_dir; 0 turns it off."""
    teacher, data = tiny_llama(), rows()
    cfg = small_cfg(checkpoint_minutes=1e-9, log_every=2, keep_last=10)
    finetune(perturbed_copy(teacher), teacher, data, cfg, checkpoint_dir=tmp_path / "timed")
    assert [p.name for p in list_checkpoints(tmp_path / "timed")] == ["step-00000002", "step-00000004", "step-00000006"]
    finetune(perturbed_copy(teacher), teacher, data, small_cfg(checkpoint_minutes=0, keep_last=10),
             checkpoint_dir=tmp_path / "off")
    assert [p.name for p in list_checkpoints(tmp_path / "off")] == ["step-00000006"]  # the end only
    with pytest.raises(ValueError, match="checkpoint_minutes must be >= 0"):
        small_cfg(checkpoint_minutes=-1)


SIGTERM_RUN = """
import os, signal, sys, torch
from mha2mla_core.training.loop import FinetuneConfig, finetune
from tests.test_finetune import perturbed_copy, rows, small_cfg, tiny_llama
torch.manual_seed(0)
teacher, data = tiny_llama(), rows()
def sigterm_at(event):
    if event.kind == "log" and event.step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGTERM)
finetune(perturbed_copy(teacher), teacher, data, small_cfg(checkpoint_minutes=0), checkpoint_dir=sys.argv[1],
         callbacks=[sigterm_at])
print("returned")
"""


def test_sigterm_saves_a_checkpoint_then_ends_the_process(tmp_path):
    """A run sent SIGTERM (a timeout, a cancelled flow, torchrun stopping its workers) checkpoints the step it is
    at, then dies of the signal as it would have; the same call resumes there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for step in (3, 6):  # mid-run, and at the last step: saved, and the signal is not swallowed
        run = subprocess.run([sys.executable, "-c", SIGTERM_RUN, str(tmp_path / str(step)), str(step)], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == -signal.SIGTERM and "returned" not in run.stdout, run.stderr[-2000:]
        assert [p.name for p in list_checkpoints(tmp_path / str(step))] == [f"step-0000000{step}"]
        assert "SIGTERM: saving a checkpoint" in run.stderr
    torch.manual_seed(0)
    teacher, data = tiny_llama(), rows()
    resumed = finetune(perturbed_copy(teacher), teacher, data, small_cfg(checkpoint_minutes=0),
                       checkpoint_dir=tmp_path / "3")
    assert resumed.resumed_from_step == 3 and resumed.steps == 6


def test_keep_last_and_corrupt_latest_falls_back_with_a_warning(tmp_path, caplog):
    teacher, data = tiny_llama(), rows()
    student = perturbed_copy(teacher)
    cfg = small_cfg(checkpoint_every=2, keep_last=2)
    finetune(student, teacher, data, cfg, checkpoint_dir=tmp_path)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000004", "step-00000006"]
    history = json.loads((tmp_path / names[-1] / "history.json").read_text())
    assert [h["step"] for h in history if h["kind"] == "log"] == [1, 2, 3, 4, 5, 6]

    weights = tmp_path / names[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated write
    extended = small_cfg(checkpoint_every=2, keep_last=2, max_tokens=8 * 2 * SEQ)
    with caplog.at_level(logging.WARNING):
        result = finetune(perturbed_copy(teacher), teacher, data, extended, checkpoint_dir=tmp_path)
    assert "step-00000006 is unreadable" in caplog.text
    assert result.resumed_from_step == 4 and result.steps == 8


def test_bad_input_fails_before_the_first_step(tmp_path):
    with pytest.raises(ValueError, match=r"lr=0.0 must be > 0"):
        small_cfg(lr=0.0)
    with pytest.raises(ValueError, match=r"max_tokens=10 is less than one optimizer step of .*32 tokens"):
        small_cfg(max_tokens=10)
    teacher, data = tiny_llama(), rows()
    with pytest.raises(ValueError, match="needs a teacher"):
        finetune(perturbed_copy(teacher), None, data, small_cfg())
    with pytest.raises(ValueError, match=r"shape \(N, seq_len=16\)"):
        finetune(perturbed_copy(teacher), teacher, data[:, :8], small_cfg())

    finetune(perturbed_copy(teacher), teacher, data, small_cfg(), checkpoint_dir=tmp_path)
    saved = sorted(p.name for p in tmp_path.rglob("*"))
    other = tiny_llama(num_key_value_heads=4)  # another architecture: 4 KV heads
    other_before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"different architecture.*k_proj.weight: \[32, 64\] vs \[64, 64\]"):
        finetune(other, None, data, small_cfg(kd_weight=0.0), checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == saved  # nothing trained is lost
    assert all(torch.equal(v, other_before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match=r"other settings.*micro_batch_size': \(2, 4\)"):
        finetune(perturbed_copy(teacher), teacher, data, small_cfg(micro_batch_size=4, max_tokens=1024),
                 checkpoint_dir=tmp_path)


def test_sampled_continuations_are_seeded_full_length_rows():
    from mha2mla_core.training.synthetic import sample_continuations

    teacher = tiny_llama()
    teacher.config.eos_token_id = 1
    prompts = rows(3)[:, :2]
    state = torch.get_rng_state()
    a = sample_continuations(teacher, prompts, seq_len=SEQ, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert a.shape == (3, SEQ) and torch.equal(a[:, :2], prompts)
    assert torch.equal(a, sample_continuations(teacher, prompts, seq_len=SEQ, seed=5))
    assert not torch.equal(a, sample_continuations(teacher, prompts, seq_len=SEQ, seed=6))


def test_mixed_in_continuations_have_the_asked_share_and_real_prompts():
    from mha2mla_core.training.synthetic import mix_in_continuations

    teacher, real = tiny_llama(), rows(6)
    mixed = mix_in_continuations(teacher, real, fraction=0.5, num_rows=8, prompt_tokens=3, batch_size=3, seed=1)
    assert mixed.shape == (8, SEQ)  # 4 real rows (of 6) and 4 sampled ones
    real_set = {tuple(r.tolist()) for r in real}
    is_real = [tuple(r.tolist()) in real_set for r in mixed]
    assert is_real == [True] * 4 + [False] * 4
    windows = {tuple(x[i : i + 3].tolist()) for x in real for i in range(SEQ - 2)}
    assert all(tuple(r[:3].tolist()) in windows for r in mixed[4:])  # each prompt is 3 real consecutive tokens
    assert torch.equal(mixed, mix_in_continuations(teacher, real, 0.5, 8, 3, 3, seed=1))
    assert mix_in_continuations(None, real, 0.0, 8) is real  # no sampling, no model needed
    data_free = mix_in_continuations(teacher, real, 1.0, 5, prompt_tokens=3, batch_size=2)
    assert data_free.shape == (5, SEQ) and not any(tuple(r.tolist()) in real_set for r in data_free)
    one_row = mix_in_continuations(teacher, real[:1], 1.0, 6, prompt_tokens=3, batch_size=6)
    assert len({tuple(r[:3].tolist()) for r in one_row}) > 1  # prompts from several offsets of the one real row
    with pytest.raises(ValueError, match=r"fraction=1.5 must be in \[0, 1\]"):
        mix_in_continuations(teacher, real, 1.5, 8)
