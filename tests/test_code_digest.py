"""The code part of a stage's cache key: the sources the stage runs, followed through the core's imports."""

import sys

import pytest

from infra import code_digest as common
from infra.code_digest import _code_closure, code_digest


def test_closure_follows_core_imports_transitively_and_keys_third_party_libraries():
    sources, libraries = _code_closure(("tasks.finetune", "mha2mla_core.training.loop"))
    # finetune -> training.synthetic -> decoding -> modeling_mla: a change to any of them is a new key
    assert {"mha2mla_core.training.schedule", "mha2mla_core.training.synthetic", "mha2mla_core.modeling.decoding",
            "mha2mla_core.modeling.modeling_mla"} <= set(sources)  # fmt: skip
    assert {"torch", "transformers"} <= libraries and not libraries & set(sys.stdlib_module_names)
    assert "prefect" not in libraries  # only what the core imports is keyed, not the orchestration around it
    _, eval_libraries = _code_closure(("tasks.evaluate", "mha2mla_core.evaluation.suite"))
    assert "lm_eval" in eval_libraries  # an lm-eval upgrade re-runs the evaluation


def test_a_name_taken_from_a_package_keys_its_defining_module_not_the_whole_package():
    from tasks.svd_init import CORE

    sources, _ = _code_closure(("tasks.svd_init", *CORE))  # tasks/svd_init.py: `from mha2mla_core import MLAConfig`
    assert {"mha2mla_core.conversion.convert", "mha2mla_core.conversion.svd", "mha2mla_core.modeling.modeling_mla"} <= set(sources)
    assert "mha2mla_core.modeling.decoding" not in sources  # re-exported by mha2mla_core/__init__, not used by conversion
    assert "mha2mla_core.training.loop" not in sources


def test_digest_changes_with_a_transitively_imported_source_and_a_library_version(monkeypatch, tmp_path):
    modules = ("tasks.finetune", "mha2mla_core.training.loop")
    before = code_digest.__wrapped__(modules)
    schedule = common._module_file("mha2mla_core.training.schedule")
    edited = tmp_path / "schedule.py"
    edited.write_bytes(schedule.read_bytes() + b"\n# edited\n")
    real_module_file = common._module_file
    monkeypatch.setattr(common, "_module_file",
                        lambda name: edited if name == "mha2mla_core.training.schedule" else real_module_file(name))
    assert code_digest.__wrapped__(modules) != before
    monkeypatch.setattr(common, "_module_file", real_module_file)
    assert code_digest.__wrapped__(modules) == before
    real_version = common._distribution_version
    monkeypatch.setattr(common, "_distribution_version", lambda name: "0.0" if name == "torch" else real_version(name))
    assert code_digest.__wrapped__(modules) != before  # another torch


def test_a_missing_module_is_named():
    with pytest.raises(ModuleNotFoundError, match="mha2mla_core.no_such_module"):
        code_digest.__wrapped__(("mha2mla_core.no_such_module",))
