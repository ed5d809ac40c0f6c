"""Run and registered-model names from the model and its config: two configs never share a name."""

import pytest

from flows.convert import ConvertParams, registry_name
from flows.naming import config_tag


def test_default_name_spells_out_the_config():
    two_norm = ConvertParams(model="smollm2-135m", mla={"rope_strategy": "2-norm", "rope_dims": 8, "kv_rank": 16,
                                                       "svd": "output-aware", "layout": "shared"})  # fmt: skip
    assert registry_name(two_norm, "smollm2-135m") == "smollm2-135m-mla-2norm8-kv16-outputaware-shared"
    tuned = ConvertParams(model="m", mla={"rope_strategy": "2-norm", "kv_rank": 8, "svd": "joint", "layout": "per_head"},
                          quantize_kv={"nbits": 4},
                          finetune={"synthetic_fraction": 1, "train": {"max_tokens": 20_000_000}})  # fmt: skip
    assert config_tag(tuned) == "2norm8-kv8-joint-perhead-ft20M-int4"
    assert config_tag(ConvertParams(model="m", reconstruct={"steps": 50})).endswith("-shared-rec50")
    assert config_tag(ConvertParams(model="m", mla={"kv_rank": None, "rope_strategy": "high"})).startswith("high8-kvfull-")
    assert registry_name(ConvertParams(model="m", name="mine"), "m") == "mine"


@pytest.mark.parametrize("change", [{"kv_rank": 8}, {"rope_dims": 16}, {"svd": "aware"}, {"layout": "per_head"},
                                    {"rope_strategy": "uniform"}, {"rope_strategy": "high"}])  # fmt: skip
def test_each_config_change_gives_another_name(change):
    base = ConvertParams(model="m")
    assert registry_name(ConvertParams(model="m", mla=change), "m") != registry_name(base, "m")
