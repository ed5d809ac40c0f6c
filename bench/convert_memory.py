"""Peak memory of a streaming conversion, on the real SmolLM2-135M and a random 1B-parameter Llama shape.

    .venv/bin/python bench/convert_memory.py [--case smollm2-135m|llama-1b|all]

Each case runs in a fresh subprocess, with glibc told to hand freed memory back to the OS
(MALLOC_TRIM_THRESHOLD_=0, MALLOC_MMAP_THRESHOLD_=65536); `--glibc-default` keeps glibc's defaults, under which
RSS also counts freed blocks that glibc keeps for reuse (about +10% peak on the 135M model). Target: peak RSS during conversion <= 1.3 x the original model's
in-memory size + one layer's calibration activations (the layer's input, its MLP activations and attention
scores for one chunk of calibration sequences).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.memory import PeakRSS, rss
from mha2mla_core import MLAConfig, convert_to_mla, load_model
from mha2mla_core.conversion.convert import calibration_batches

# Llama-3.2-1B's shape: 1.24B parameters (untied here: 1.50B)
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
)  # fmt: skip
CALIB_TOKENS = 4096
CHUNK = 8  # sequences per layer forward in stream_layers


def build(case: str):
    if case == "smollm2-135m":
        return load_model(case)[0]
    with torch.device("cpu"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).eval()


def one_layer_activation_bytes(config, seq_len: int) -> int:
    """Inputs + MLP intermediates + attention scores of one layer for one chunk, plus the layer input of all tokens."""
    tokens_chunk = CHUNK * seq_len
    mlp = 3 * tokens_chunk * config.intermediate_size
    scores = CHUNK * config.num_attention_heads * seq_len * seq_len
    hidden = 3 * CALIB_TOKENS * config.hidden_size  # hidden states, normed inputs, layer output
    return 4 * (mlp + scores + hidden)


def run_case(case: str) -> dict:
    base = rss()
    model = build(case)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    after_load = rss()
    cfg = MLAConfig(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="aware", layout="shared")
    calib = torch.randint(0, model.config.vocab_size, (CALIB_TOKENS,), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with PeakRSS() as peak:
        mla = convert_to_mla(model, cfg, calib)
    seconds = time.perf_counter() - start
    activations = one_layer_activation_bytes(model.config, calibration_batches(calib, cfg.calib_seq_len).shape[1])
    budget = 1.3 * model_bytes + activations
    return {
        "case": case,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "model_mb": round(model_bytes / 2**20, 1),
        "rss_after_load_mb": round((after_load - base) / 2**20, 1),
        "one_layer_activations_mb": round(activations / 2**20, 1),
        "peak_conversion_mb": round((peak.bytes - base) / 2**20, 1),
        "budget_mb": round(budget / 2**20, 1),
        "peak_over_budget": round((peak.bytes - base) / budget, 3),
        "convert_s": round(seconds, 1),
        "mla_params_m": round(sum(p.numel() for p in mla.parameters()) / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["smollm2-135m", "llama-1b", "all"], default="all")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's malloc trim/mmap thresholds")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(run_case(args.case)))
        return
    env = dict(os.environ)
    if not args.glibc_default:
        env.update(MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_THRESHOLD_="65536")
    for case in ["smollm2-135m", "llama-1b"] if args.case == "all" else [args.case]:
        out = subprocess.run(
            [sys.executable, "-m", "bench.convert_memory", "--case", case, "--in-process"],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        if out.returncode:
            raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({**row, "glibc_default": args.glibc_default}), flush=True)


if __name__ == "__main__":
    main()
