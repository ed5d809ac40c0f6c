"""Block-wise reconstruction and end-to-end distillation of a real (tiny) MLA conversion, on CPU."""

import copy

import pytest
import torch

from mha2mla_core import MLAConfig, convert_to_mla
from mha2mla_core.training.loop import FinetuneConfig, finetune
from mha2mla_core.training import ReconstructConfig
from mha2mla_core.training.reconstruct import reconstruct_attention
from tests.tiny_models import VOCAB, calib_ids, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def converted(source):
    cfg = MLAConfig(rope_strategy="2-norm", rope_dims=4, kv_rank=2, svd="aware", layout="shared", calib_seq_len=64)
    return convert_to_mla(copy.deepcopy(source), cfg, calib_ids())


def rows(n=16, t=32, seed=3):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_reconstruction_fits_each_attention_and_touches_nothing_else():
    teacher = tiny_model("llama-gqa")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer in student.model.layers:
            layer.self_attn.k_proj.weight.add_(0.3 * torch.randn_like(layer.self_attn.k_proj.weight))
    others = {k: v.clone() for k, v in student.state_dict().items() if ".self_attn." not in k}
    result = reconstruct_attention(student, teacher, rows(), ReconstructConfig(steps=100, lr=3e-3, bf16=False))
    assert all(after < 0.25 * before for before, after in zip(result.rel_mse_before, result.rel_mse_after))
    assert all(torch.equal(student.state_dict()[k], v) for k, v in others.items())
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_reconstruction_then_distillation_recover_an_mla_conversion():
    teacher = tiny_model("llama-gqa")
    student = converted(teacher)
    data = rows(n=32)
    events = []
    result = reconstruct_attention(student, teacher, data[:8], ReconstructConfig(steps=40, lr=1e-2, bf16=False,
                                                                                 log_every=20), [events.append])
    assert sum(result.rel_mse_after) < 0.7 * sum(result.rel_mse_before)
    assert [e.step for e in events] == [20, 40] and events[-1].tokens == 40 * 8 * 32
    cfg = FinetuneConfig(max_tokens=20 * 4 * 32, seq_len=32, micro_batch_size=4, lr=3e-3, bf16=False, log_every=1)
    fit = finetune(student, teacher, data, cfg)
    kd = [h["kd_loss"] for h in fit.history if h["kind"] == "log"]
    assert sum(kd[-3:]) < 0.7 * sum(kd[:3])


def test_a_teacher_sharing_trained_weights_with_the_student_is_refused():
    source = tiny_model("llama-gqa")
    student = convert_to_mla(source, MLAConfig(rope_dims=4, kv_rank=2, calib_seq_len=64), calib_ids())
    cfg = FinetuneConfig(max_tokens=4 * 32, seq_len=32, micro_batch_size=4, bf16=False, trainable="attention")
    before = {k: v.clone() for k, v in source.state_dict().items()}
    with pytest.raises(ValueError, match=r"shares .*o_proj.weight.*copy.deepcopy"):
        finetune(student, source, rows(), cfg)
    with pytest.raises(ValueError, match=r"shares .*o_proj.weight"):
        reconstruct_attention(student, source, rows(), ReconstructConfig(steps=1))
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())
