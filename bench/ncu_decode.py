"""One decode step of the latent kernels at a bench point, for Nsight Compute to capture (issue 17).

    ncu --kernel-name regex:_split --set full python3 -m bench.ncu_decode

Each case runs twice, so that the second launch is not the one that compiled; profile the second
(`--launch-skip` per case, or all of them and read the later rows). Cases are bench/decode.py's shapes: the bf16
shared-latent kernel and the int4 kernel on SmolLM2's shape (shared rope key), and the bf16 kernel on DeepSeek's
512 + 64 shape with Llama-2-7B's 32 heads. It prints each case's launch config, so a profile row names its config.
"""

from __future__ import annotations

import argparse
import math

import torch

from bench.decode import SHAPES, int4_inputs, mla_inputs
from mha2mla_core.kernels import triton_latent

CASES = {
    "smollm2-bf16": ("smollm2-135m/shared-rope", "bf16"),
    "smollm2-int4": ("smollm2-135m/shared-rope", "int4"),
    "llama2-bf16": ("llama2-7b/shared-rope", "bf16"),
}


def run_case(name: str, B: int, T: int) -> None:
    shape_name, kind = CASES[name]
    s = next(s for s in SHAPES if s.name == shape_name)
    q_lat, q_pe, c_kv, k_pe = mla_inputs(s, B, T)
    scale = 1 / math.sqrt(s.D + s.Dr)
    if kind == "bf16":
        cfg = triton_latent.default_config(q_lat, c_kv, k_pe)
        step = lambda: triton_latent.decode(q_lat, q_pe, c_kv, k_pe, scale, cfg=cfg)  # noqa: E731
    else:
        del c_kv, k_pe
        kv = int4_inputs(s, B, T)
        cfg = triton_latent.default_config_int4(q_lat, kv)
        step = lambda: triton_latent.decode_int4(q_lat, q_pe, kv, scale, cfg=cfg)  # noqa: E731
    print(f"{name}: {shape_name} {kind} B={B} T={T} {cfg}", flush=True)
    for _ in range(2):
        step()
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    for name in args.cases:
        run_case(name, args.batch, args.tokens)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
