"""Self-contained checkpoints: a converted model saved with its code loads, generates and uses the latent cache in a
process that never imports mha2mla_core (transformers + torch, `trust_remote_code=True`)."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from eval_tiny import tiny_lm, tiny_tokenizer
from mha2mla_core import MLAConfig, convert_to_mla
from mha2mla_core.hub_code import AUTO_MAP, bundle_code, source_modules
from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig
from tiny_models import calib_ids

PROMPTS = ["the river ran past the old mill", "she wrote a long letter"]
NEW_TOKENS = 6

# Run with `python -I` (no PYTHONPATH, no working directory on sys.path); a meta-path finder makes any import of
# mha2mla_core fail, so only the files in the checkpoint can define the model.
ISOLATED = """
import importlib.abc, json, sys
class NoPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mha2mla_core":
            raise ImportError(f"{name} must not be imported by a self-contained checkpoint")
sys.meta_path.insert(0, NoPackage())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, device, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype).to(device).eval()
batch = tok(json.loads(sys.argv[4]), return_tensors="pt", padding=True).to(device)
with torch.no_grad():
    logits = model(**batch).logits.float().cpu()
    out = model.generate(**batch, max_new_tokens=int(sys.argv[5]), do_sample=False, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id)
cache = out.past_key_values
torch.save(logits, sys.argv[6])
print(json.dumps({
    "model_module": type(model).__module__, "model_class": type(model).__name__,
    "cache_class": type(cache).__name__, "cache_bases": [c.__name__ for c in type(cache).__mro__],
    "kv_bytes_per_token": model.kv_bytes_per_token(), "tokens": out.sequences[:, batch.input_ids.shape[1]:].tolist(),
    "loaded": sorted(m.rsplit(".", 1)[-1] for m in sys.modules if m.startswith("transformers_modules.")),
    "package_imported": any(m.split(".")[0] == "mha2mla_core" for m in sys.modules),
}))
"""


def run_isolated(directory, tmp_path, device="cpu", dtype="float32", prompts=PROMPTS) -> tuple[dict, torch.Tensor]:
    # -I ignores PYTHONPATH and the user site; the rest of the environment stays (Triton compiles with the C compiler)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    args = [str(directory), device, dtype, json.dumps(prompts), str(NEW_TOKENS), str(tmp_path / "logits.pt")]
    done = subprocess.run([sys.executable, "-I", "-c", ISOLATED, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(tmp_path / "logits.pt", weights_only=True)


@pytest.fixture(scope="module")
def mla():
    """A tiny converted model (shared latent) and its tokenizer, padding on the left for batched generation."""
    tok = tiny_tokenizer()
    config = MLAConfig(rope_dims=4, kv_rank=4, svd="aware", calib_seq_len=64)
    model = convert_to_mla(tiny_lm(tok), config, calib_ids(512).clamp(max=len(tok) - 1)).eval()
    tok.padding_side = "left"
    return model, tok


def save(model, tok, directory):
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return bundle_code(directory)


def expected(model, tok) -> tuple[torch.Tensor, list]:
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    return logits, out[:, batch.input_ids.shape[1] :].tolist()


def test_checkpoint_loads_generates_and_caches_latents_without_the_package(mla, tmp_path):
    model, tok = mla
    written = save(model, tok, tmp_path / "ckpt")
    assert written == ["kernels.py", "latent_cache.py", "latent_decode.py", "modeling_mla.py", "quant_codes.py", "triton_latent.py"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"] == AUTO_MAP

    report, logits = run_isolated(tmp_path / "ckpt", tmp_path)
    want_logits, want_tokens = expected(model, tok)
    assert not report["package_imported"] and report["model_module"].startswith("transformers_modules.")
    assert report["model_class"] == "MLAForCausalLM" and report["cache_class"] == "LatentCache"
    torch.testing.assert_close(logits, want_logits)
    assert report["tokens"] == want_tokens
    assert report["kv_bytes_per_token"] == model.kv_bytes_per_token()  # the latent, not 2 * Hkv * D per layer
    assert {"modeling_mla", "kernels", "latent_decode"} <= set(report["loaded"])


def test_quantized_cache_checkpoint_uses_the_bundled_quantized_cache(mla, tmp_path):
    model, tok = copy.deepcopy(mla[0]), mla[1]
    model.config.kv_cache_quant = KVCacheQuantConfig(nbits=4, group_size=16, residual_length=0).to_dict()
    save(model, tok, tmp_path / "ckpt")
    report, _ = run_isolated(tmp_path / "ckpt", tmp_path)
    assert report["cache_class"] == "QuantizedLatentCache" and "LatentCache" in report["cache_bases"]
    assert "latent_cache" in report["loaded"] and not report["package_imported"]
    assert report["kv_bytes_per_token"] == model.kv_bytes_per_token()
    assert report["tokens"] == expected(model, tok)[1]


def test_bundle_follows_the_modeling_imports_and_leaves_no_absolute_package_import(mla, tmp_path):
    save(*mla, tmp_path)
    modules = source_modules()
    assert {"mha2mla_core.modeling.latent_cache", "mha2mla_core.kernels.triton_latent"} <= set(modules)  # lazy imports too
    for name in ("modeling_mla", "kernels", "latent_cache", "latent_decode", "quant_codes", "triton_latent"):
        tree = ast.parse((tmp_path / f"{name}.py").read_text())
        absolute = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
                    and (n.module or "").startswith("mha2mla_core")]  # fmt: skip
        assert not absolute, f"{name}.py still imports {[n.module for n in absolute]}"
    # transformers copies the files named by `from .x import` lines: the Triton kernels' file is one of them
    from transformers.dynamic_module_utils import get_relative_import_files

    copied = {p.rsplit("/", 1)[-1] for p in get_relative_import_files(str(tmp_path / "modeling_mla.py"))}
    # (modeling_mla.py itself is the file auto_map names: nothing imports it back since the cache has its own module)
    assert copied == {"kernels.py", "latent_cache.py", "latent_decode.py", "quant_codes.py", "triton_latent.py"}


def test_bundle_needs_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json; call model.save_pretrained"):
        bundle_code(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_decode_kernel_is_bundled_and_used_on_cuda(mla, tmp_path):
    pytest.importorskip("triton")
    save(*mla, tmp_path / "ckpt")
    # one unpadded row: decode steps have no mask, so the fused Triton kernel reads the latent cache
    report, _ = run_isolated(tmp_path / "ckpt", tmp_path, device="cuda", dtype="bfloat16", prompts=PROMPTS[:1])
    assert "triton_latent" in report["loaded"] and not report["package_imported"]
    assert report["cache_class"] == "LatentCache"
