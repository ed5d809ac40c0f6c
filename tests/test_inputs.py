"""How the stages hold models: device copies that skip host memory, and the dtype a worker keeps a model in."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest_plugins = ["pipeline_fixtures"]


def test_a_device_copy_goes_straight_to_the_device_and_keeps_tied_weights(tiny_source):
    from tasks.inputs import on_device

    model = AutoModelForCausalLM.from_pretrained(tiny_source)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)

    copy = on_device(model, torch.device("meta"))  # a device with no storage: nothing of the copy is on the CPU

    assert copy is not model and all(p.is_meta for p in copy.parameters()) and all(b.is_meta for b in copy.buffers())
    assert all(p.device.type == "cpu" for p in model.parameters())  # the shared model is untouched
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    assert [p.requires_grad for p in copy.parameters()] == [p.requires_grad for p in model.parameters()]
    assert on_device(model, torch.device("cpu")) is model


def test_a_model_larger_than_the_free_gpu_memory_is_a_clear_error_before_any_copy(tiny_source, monkeypatch):
    from infra.stage import host_bytes
    from tasks.inputs import check_fits, on_device

    model = AutoModelForCausalLM.from_pretrained(tiny_source)
    weights = host_bytes(model)  # parameters and buffers
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (weights - 1, 80 * 2**30))
    with pytest.raises(ValueError, match=r"weights take .* GiB free: run this stage on a worker with more GPU memory"):
        on_device(model, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (weights, 80 * 2**30))
    check_fits(model, torch.device("cuda"))  # exactly enough: no error


def test_a_gpu_worker_holds_models_in_their_stored_dtype_and_a_cpu_worker_in_fp32(local_env, tiny_source, tmp_path, monkeypatch):
    import tasks.inputs as inputs
    from infra.stage import context

    source = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_source, dtype=torch.bfloat16).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_source).save_pretrained(source)
    model_source = inputs.resolve_model(str(source))
    assert inputs.load_source(model_source)[0].dtype == torch.float32  # this CPU worker computes on the shared copy

    monkeypatch.setattr(inputs, "worker_device", lambda setting: torch.device("cuda"))  # a GPU worker's host
    context.cache_clear()
    model, tokenizer = inputs.load_source(model_source)
    assert model.dtype == torch.bfloat16  # 2 bytes a parameter in host memory, as stored

    private = AutoModelForCausalLM.from_pretrained(tiny_source)  # fp32, as a trained student
    ref = inputs.save_checkpoint(private, tokenizer, "stages/tiny/test/model", torch.bfloat16)
    assert context().models.peek(ref.sha256)[0].dtype == torch.bfloat16  # memoised as a reload would give it


def test_a_tokenizer_alone_loads_no_weights(local_env, tiny_source):
    from infra.stage import context
    from tasks.inputs import load_source, load_source_tokenizer, resolve_model

    model_source = resolve_model(str(tiny_source))
    tokenizer = load_source_tokenizer(model_source)
    assert tokenizer("the cat").input_ids and context().models.peek(model_source.digest) is None
    _, loaded = load_source(model_source)
    assert load_source_tokenizer(model_source) is loaded  # the memoised model's, once it is loaded


def test_the_model_memo_keeps_fewer_models_past_its_memory_budget():
    from infra.stage import Memo, host_bytes

    def model(n):  # n fp32 values, with a tokenizer-like companion as the stages memoise them
        return torch.nn.Linear(n, 1, bias=False), "tokenizer"

    assert host_bytes(model(256)) == 1024
    shared = model(256)
    assert host_bytes(shared, (shared[0], "another tokenizer")) == 1024  # a tensor two values share counts once
    memo = Memo(size=3, max_bytes=2500)
    memo.put("a", model(256))
    memo.put("b", model(256))
    assert list(memo.items) == ["a", "b"]  # 2,048 bytes: both kept
    memo.put("c", model(256))
    assert list(memo.items) == ["b", "c"]  # 3,072 > 2,500: the oldest goes
    memo.put("d", model(1024))
    assert list(memo.items) == ["d"]  # larger than the budget alone: the newest stays
    unbounded = Memo(size=2)
    for key in "xyz":
        unbounded.put(key, model(1024))
    assert list(unbounded.items) == ["y", "z"]
