"""What an int4 or int2 latent cache costs in quality: SmolLM2-135M's MLA conversion scored through its cache.

    .venv/bin/python bench/kv_quant_quality.py [--recon-steps N] [--kv-rank 64] [--bits 4 2] [--backends quanto hqq]
        [--max-tokens 4096] [--out FILE.jsonl]

The model is what a CPU worker's `cpu` recipe makes (`flows/recipes/cpu.yaml`): the recipe's MLAConfig calibrated on
the packaged books continued by the original, then the recipe's block-wise reconstruction (`--recon-steps`: another
number of its steps; 0: zero shot); `--kv-rank` converts at another latent width (16: 72 values a token and layer,
MLAConfig's default).
Each cache setting (none, then each of `--bits` with each of `--backends`, group 64, the last 128 tokens in full
precision: `KVCacheQuantConfig`'s defaults, what `--kv-bits` gives) is scored on the first `--max-tokens` of
wikitext-2 in windows of 512. A quantized setting is scored through the cache, one token at a time
(`perplexity_of_ids`), so every prediction past the first 128 of a window reads older tokens as codes. Each setting's
KV bytes per token are read from its cache after a forward of 4,096 tokens (codes, scales, zeros and the full-precision
window). One JSON line per setting, printed and appended to --out; the last line is a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from flows.publish import read_recipe
from mha2mla_core import MLAConfig, convert_to_mla, default_calibration_texts, load_model, sample_calibration
from mha2mla_core.conversion.calibration import continue_with_model
from mha2mla_core.evaluation.paths import WIKITEXT2_TEST, read_text
from mha2mla_core.evaluation.perplexity import perplexity_of_ids
from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig
from mha2mla_core.training.config import ReconstructConfig
from mha2mla_core.training.reconstruct import reconstruct_attention

BYTES_PROBE_TOKENS = 4096


def recipe_model(recon_steps: int, kv_rank: int | None = None):
    """The cpu recipe's MLA model of SmolLM2-135M (at `kv_rank` if given), and its tokenizer."""
    model, tokenizer = load_model("smollm2-135m")
    recipe = read_recipe("cpu")
    cfg = MLAConfig(**recipe.get("mla", {}))
    cfg = cfg if kv_rank is None else dataclasses.replace(cfg, kv_rank=kv_rank)
    calib = sample_calibration(default_calibration_texts(), tokenizer, num_tokens=8192, seq_len=cfg.calib_seq_len)
    calib = continue_with_model(model, calib, cfg.calib_seq_len)  # data-free, as `calibration.model_samples`
    mla = convert_to_mla(copy.deepcopy(model), cfg, calib.input_ids)
    if recon_steps:
        windows = calib.input_ids.view(-1, cfg.calib_seq_len)
        reconstruct_attention(mla, model, windows, ReconstructConfig(**{**recipe["reconstruct"], "steps": recon_steps}))
    return mla, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recon-steps", type=int, help="reconstruction steps (default: the cpu recipe's; 0: none)")
    parser.add_argument("--kv-rank", type=int, help="latent dims per KV head (default: the cpu recipe's)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2], choices=(4, 2), help="quantized cache widths")
    parser.add_argument("--backends", nargs="+", default=["quanto", "hqq"], choices=("quanto", "hqq"))
    parser.add_argument("--max-tokens", type=int, default=4096, help="wikitext-2 tokens scored (windows of 512)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kv_quant_quality.jsonl"))
    args = parser.parse_args()
    if args.recon_steps is None:
        args.recon_steps = read_recipe("cpu")["reconstruct"]["steps"]
    start = time.perf_counter()
    mla, tokenizer = recipe_model(args.recon_steps, args.kv_rank)
    print(f"model ready in {time.perf_counter() - start:.0f} s", flush=True)
    ids = torch.tensor(tokenizer(read_text(WIKITEXT2_TEST, "wikitext-2", "see ../shared/data/README.md"),
                                 verbose=False)["input_ids"][: args.max_tokens])
    settings = [None] + [KVCacheQuantConfig(nbits=b, backend=backend) for b in args.bits for backend in args.backends]
    rows = []
    for setting in settings:
        mla.config.kv_cache_quant = None if setting is None else setting.to_dict()
        start = time.perf_counter()
        nll, predicted, _ = perplexity_of_ids(mla, ids, window=512)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            kv_bytes = mla.kv_bytes_per_token(probe_tokens=BYTES_PROBE_TOKENS)
        label = "none" if setting is None else f"int{setting.nbits} {setting.backend}"
        rows.append(dict(cache=label, ppl=round(math.exp(nll), 3), nll=round(nll, 5), predicted_tokens=predicted,
                         seconds=round(seconds, 1), recon_steps=args.recon_steps,
                         latent_dims=mla.config.kv_lora_rank * mla.config.kv_latent_groups,
                         kv_bytes_per_token=round(kv_bytes, 1),
                         quant=None if setting is None else setting.to_dict(), cpus=os.cpu_count(),
                         command="bench/kv_quant_quality.py"))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
    mla.config.kv_cache_quant = None
    print("| cache | wikitext-2 PPL | change | KV bytes/token |\n|---|---:|---:|---:|")
    for row in rows:
        change = 100 * (row["ppl"] / rows[0]["ppl"] - 1)
        print(f"| {row['cache']} | {row['ppl']:.2f} | {change:+.2f}% | {row['kv_bytes_per_token']:,.0f} |")


if __name__ == "__main__":
    main()
