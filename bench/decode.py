"""Per-layer decode-step benchmark: SDPA GQA of the original attention vs the fused latent kernels (bf16 and int4).

    python bench/decode.py --out runs/bench_decode.jsonl     # needs a CUDA GPU with Triton; ~3 min on an H100
    python bench/decode.py --batches 16 64 --contexts 16384 32768 --shapes smollm2-135m/shared   # a subset

For each model shape, batch B and context T it times one decode step of one layer (`time_ms`: CUDA-graph replays with
the L2 flushed before every call, so kernel time without Python launch overhead; `mla_eager_ms` adds that overhead
back for the bf16 kernel) of: `sdpa` = torch SDPA with enable_gqa on the original (B, Hkv, T, D) bf16 K/V, `mla` = the Triton
latent kernel on the bf16 latent cache, `mla_int4` = the int4 kernel on `GroupQuant` codes (group 64, 128-token
residual window), and `torch` = the plain-torch reference (only where it fits easily). Bytes are the cache tensors
each method must read; GB/s = bytes / time, `%bw` against the running device's datasheet HBM bandwidth (`PEAK_HBM_GBS`,
by device name; the measured device-to-device copy is printed too, and stands in for a device the table lacks). A
second table gives the largest batch whose KV cache fits a fixed memory budget, from each cache's measured bytes per
token. The shapes with `rope_heads` 1 are the shared rope key (one k_pe head read by all query heads).
"""

import argparse
import json
import math
import shlex
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from mha2mla_core.kernels import (
    GroupQuant,
    QuantizedLatentKV,
    latent_decode_attention,
    latent_decode_attention_quantized,
    latent_decode_attention_reference,
)

# ---- defaults ------------------------------------------------------------------------------------------------------
BATCHES = (1, 16, 64)
CONTEXTS = (4096, 16384, 32768)
GROUP_SIZE = 64  # int4 tokens per scale/zero group
RESIDUAL = 128  # most recent tokens kept in bf16
KV_BUDGET_GIB = 60.0  # memory given to the KV cache in the max-batch table
TORCH_MAX_TOKENS = 16 * 16384  # time the plain-torch reference only up to B * T of this
PEAK_HBM_GBS = {  # datasheet HBM bandwidth, GB/s, by torch.cuda.get_device_name()
    "NVIDIA H200": 4800.0,
    "NVIDIA H200 NVL": 4800.0,
    "NVIDIA H100 80GB HBM3": 3350.0,
    "NVIDIA H100 NVL": 3900.0,
    "NVIDIA H100 PCIe": 2000.0,
    "NVIDIA A100-SXM4-80GB": 2039.0,
    "NVIDIA A100-SXM4-40GB": 1555.0,
    "NVIDIA A100 80GB PCIe": 1935.0,
    "NVIDIA A100-PCIE-40GB": 1555.0,
    "NVIDIA B200": 8000.0,
}
FLUSH_BYTES = 256 << 20  # written between timed calls so that no call finds the cache in L2


@dataclass(frozen=True)
class BenchShape:
    """Original attention (H, Hkv, D) and its MLA latent layout (Hc, Rc, Dr, rope_heads), as in
    `latent_decode_attention`: c_kv (B, Hc, T, Rc), k_pe (B, rope_heads, T, Dr)."""

    model: str
    layout: str
    layers: int
    H: int
    Hkv: int
    D: int
    Hc: int
    Rc: int
    Dr: int
    rope_heads: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.layout}"


SHAPES = (
    BenchShape("smollm2-135m", "shared", 30, H=9, Hkv=3, D=64, Hc=1, Rc=48, Dr=8, rope_heads=3),
    BenchShape("smollm2-135m", "shared-rope", 30, H=9, Hkv=3, D=64, Hc=1, Rc=48, Dr=24, rope_heads=1),
    BenchShape("smollm2-135m", "per_head", 30, H=9, Hkv=3, D=64, Hc=3, Rc=16, Dr=8, rope_heads=3),
    # what both recipes make since session 15: rank 64 per KV head, one shared latent of 192 and one 24-dim RoPE key
    BenchShape("smollm2-135m-r64", "shared-rope", 30, H=9, Hkv=3, D=64, Hc=1, Rc=192, Dr=24, rope_heads=1),
    BenchShape("llama2-7b", "per_head", 32, H=32, Hkv=32, D=128, Hc=32, Rc=64, Dr=32, rope_heads=32),
    BenchShape("llama2-7b", "shared", 32, H=32, Hkv=32, D=128, Hc=1, Rc=512, Dr=32, rope_heads=32),
    BenchShape("llama2-7b", "shared-rope", 32, H=32, Hkv=32, D=128, Hc=1, Rc=512, Dr=64, rope_heads=1),  # DeepSeek's 512 + 64
)


def _replay_ms(graph: torch.cuda.CUDAGraph, trials: int = 5) -> float:
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(trials):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def time_ms(fn, reps: int = 20) -> float:
    """GPU time of one call of fn with a cold L2 and no Python launch overhead: a CUDA graph of reps x (flush L2,
    fn) minus one of reps x (flush L2), divided by reps."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    fn()  # compiles the Triton kernels outside the capture
    torch.cuda.synchronize()
    totals = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        totals.append(_replay_ms(graph))
        del graph
    return (totals[0] - totals[1]) / reps


def eager_ms(fn) -> float:
    """Wall time of one eager call, Python and launch overhead included (L2 flushed by do_bench)."""
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def peak_bandwidth_gbs(copy_gbs: float) -> tuple[float, str]:
    """(GB/s, where it comes from): the running device's datasheet HBM bandwidth, else the measured copy."""
    name = torch.cuda.get_device_name()
    if name in PEAK_HBM_GBS:
        return PEAK_HBM_GBS[name], f"{name} datasheet"
    return copy_gbs, f"{name} is not in PEAK_HBM_GBS: measured device-to-device copy"


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def random_int4(B: int, Hx: int, T: int, D: int) -> GroupQuant:
    """Random int4 codes in the cache's layout (timing does not depend on the values)."""
    codes = torch.randint(0, 256, (B, Hx, T, D // 2), dtype=torch.uint8, device="cuda")  # (B, Hx, T, D/2)
    scale = torch.rand(B, Hx, T // GROUP_SIZE, D, device="cuda", dtype=torch.bfloat16) * 0.1  # (B, Hx, T/g, D)
    zero = torch.rand(B, Hx, T // GROUP_SIZE, D, device="cuda", dtype=torch.bfloat16) * 15
    return GroupQuant(codes, scale, zero, nbits=4, group_size=GROUP_SIZE)


def time_sdpa(s: BenchShape, B: int, T: int) -> tuple[float, int]:
    q = torch.randn(B, s.H, 1, s.D, device="cuda", dtype=torch.bfloat16)  # (B, H, 1, D)
    k = torch.randn(B, s.Hkv, T, s.D, device="cuda", dtype=torch.bfloat16)  # (B, Hkv, T, D)
    v = torch.randn_like(k)
    ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    return ms, k.nbytes + v.nbytes


def mla_inputs(s: BenchShape, B: int, T: int) -> tuple[torch.Tensor, ...]:
    """Random bf16 q_lat (B, H, Rc), q_pe (B, H, Dr), c_kv (B, Hc, T, Rc), k_pe (B, rope_heads, T, Dr)."""
    q_lat = torch.randn(B, s.H, s.Rc, device="cuda", dtype=torch.bfloat16)  # (B, H, Rc)
    q_pe = torch.randn(B, s.H, s.Dr, device="cuda", dtype=torch.bfloat16)  # (B, H, Dr)
    c_kv = torch.randn(B, s.Hc, T, s.Rc, device="cuda", dtype=torch.bfloat16)  # (B, Hc, T, Rc)
    k_pe = torch.randn(B, s.rope_heads, T, s.Dr, device="cuda", dtype=torch.bfloat16)  # (B, rope_heads, T, Dr)
    return q_lat, q_pe, c_kv, k_pe


def int4_inputs(s: BenchShape, B: int, T: int) -> QuantizedLatentKV:
    """Random int4 codes for all but the last RESIDUAL + (T - RESIDUAL) % GROUP_SIZE tokens, which stay bf16."""
    t_res = RESIDUAL + (T - RESIDUAL) % GROUP_SIZE
    return QuantizedLatentKV(
        random_int4(B, s.Hc, T - t_res, s.Rc),
        random_int4(B, s.rope_heads, T - t_res, s.Dr),
        torch.randn(B, s.Hc, t_res, s.Rc, device="cuda", dtype=torch.bfloat16),  # (B, Hc, R, Rc)
        torch.randn(B, s.rope_heads, t_res, s.Dr, device="cuda", dtype=torch.bfloat16),  # (B, rope_heads, R, Dr)
    )


def time_mla(s: BenchShape, B: int, T: int, torch_ref: bool) -> dict:
    q_lat, q_pe, c_kv, k_pe = mla_inputs(s, B, T)
    scale = 1 / math.sqrt(s.D + s.Dr)
    row = {"mla_ms": time_ms(lambda: latent_decode_attention(q_lat, q_pe, c_kv, k_pe, scale))}
    row["mla_eager_ms"] = eager_ms(lambda: latent_decode_attention(q_lat, q_pe, c_kv, k_pe, scale))
    row["mla_bytes"] = c_kv.nbytes + k_pe.nbytes
    if torch_ref and B * T <= TORCH_MAX_TOKENS:
        row["torch_ms"] = time_ms(lambda: latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, scale))
    del c_kv, k_pe
    kv = int4_inputs(s, B, T)
    row["int4_ms"] = time_ms(lambda: latent_decode_attention_quantized(q_lat, q_pe, kv, scale))
    row["int4_bytes"] = kv.nbytes
    return row


def bench_point(s: BenchShape, B: int, T: int, peak_gbs: float, torch_ref: bool) -> dict:
    row = {"model": s.model, "layout": s.layout, "rope_heads": s.rope_heads, "B": B, "T": T}
    row["sdpa_ms"], row["sdpa_bytes"] = time_sdpa(s, B, T)
    torch.cuda.empty_cache()
    row.update(time_mla(s, B, T, torch_ref))
    torch.cuda.empty_cache()
    for name in ("sdpa", "mla", "int4"):
        row[f"{name}_gbs"] = row[f"{name}_bytes"] / row[f"{name}_ms"] / 1e6
        row[f"{name}_pct_bw"] = 100 * row[f"{name}_gbs"] / peak_gbs
    row["speedup_mla"] = row["sdpa_ms"] / row["mla_ms"]
    row["speedup_int4"] = row["sdpa_ms"] / row["int4_ms"]
    row["int4_vs_mla"] = row["mla_ms"] / row["int4_ms"]
    return row


def print_table(rows: list[dict], peak_gbs: float, peak_source: str) -> None:
    print(f"\nPer-layer decode step, bf16; %bw against {peak_gbs:.0f} GB/s ({peak_source})")
    print("| model | layout | B | T | SDPA GQA us (GB/s) | MLA us (GB/s, %bw) | x vs SDPA | MLA eager us "
          "| MLA int4 us (GB/s, %bw) | x vs SDPA | int4 x vs MLA | torch ref us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        torch_us = f"{1e3 * r['torch_ms']:.0f}" if "torch_ms" in r else "-"
        print(
            f"| {r['model']} | {r['layout']} | {r['B']} | {r['T'] // 1024}k "
            f"| {1e3 * r['sdpa_ms']:.1f} ({r['sdpa_gbs']:.0f}) "
            f"| {1e3 * r['mla_ms']:.1f} ({r['mla_gbs']:.0f}, {r['mla_pct_bw']:.0f}%) | {r['speedup_mla']:.1f} "
            f"| {1e3 * r['mla_eager_ms']:.1f} "
            f"| {1e3 * r['int4_ms']:.1f} ({r['int4_gbs']:.0f}, {r['int4_pct_bw']:.0f}%) | {r['speedup_int4']:.1f} "
            f"| {r['int4_vs_mla']:.2f} | {torch_us} |"
        )


def max_batch_rows(rows: list[dict], shapes: list[BenchShape], contexts: list[int]) -> list[dict]:
    """Largest batch whose cache (all layers) fits KV_BUDGET_GIB, from measured bytes per token and layer."""
    out = []
    for s in shapes:
        r = max((r for r in rows if r["model"] == s.model and r["layout"] == s.layout), key=lambda r: r["B"] * r["T"])
        per_token = {k: r[f"{k}_bytes"] / (r["B"] * r["T"]) for k in ("sdpa", "mla", "int4")}
        for T in contexts:
            fit = {k: int(KV_BUDGET_GIB * 2**30 // (v * T * s.layers)) for k, v in per_token.items()}
            out.append({"model": s.model, "layout": s.layout, "T": T, "bytes_per_token_layer": per_token, "max_batch": fit})
    return out


def print_max_batch(rows: list[dict]) -> None:
    print(f"\nLargest batch whose KV cache fits {KV_BUDGET_GIB:.0f} GiB (all layers)")
    print("| model | layout | T | bytes/token/layer orig / MLA / MLA int4 | max B orig | MLA | MLA int4 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b, m = r["bytes_per_token_layer"], r["max_batch"]
        print(
            f"| {r['model']} | {r['layout']} | {r['T'] // 1024}k | {b['sdpa']:.0f} / {b['mla']:.0f} / {b['int4']:.1f} "
            f"| {m['sdpa']} | {m['mla']} ({m['mla'] / max(m['sdpa'], 1):.1f}x) | {m['int4']} ({m['int4'] / max(m['sdpa'], 1):.1f}x) |"
        )


def main(args: argparse.Namespace) -> None:
    shapes = [s for s in SHAPES if not args.shapes or s.name in args.shapes]
    if args.shapes and len(shapes) != len(set(args.shapes)):
        raise SystemExit(f"--shapes {args.shapes}: known shapes are {[s.name for s in SHAPES]}")
    command = "python " + shlex.join(sys.argv)
    copy_gbs = copy_bandwidth_gbs()
    peak_gbs, peak_source = peak_bandwidth_gbs(copy_gbs)
    header = {"device": torch.cuda.get_device_name(), "command": command, "copy_gbs": copy_gbs, "peak_gbs": peak_gbs,
              "torch": torch.__version__, "triton": triton.__version__}  # fmt: skip
    print(f"{header['device']}: copy bandwidth {copy_gbs:.0f} GB/s; peak {peak_gbs:.0f} GB/s ({peak_source})")
    print(f"command: {command}", flush=True)
    rows = []
    for s in shapes:
        for B in args.batches:
            for T in args.contexts:
                rows.append(bench_point(s, B, T, peak_gbs, not args.no_torch_ref))
                print(json.dumps(rows[-1]), flush=True)
    print_table(rows, peak_gbs, peak_source)
    fits = max_batch_rows(rows, shapes, args.contexts)
    print_max_batch(fits)
    if args.out:
        with open(args.out, "w") as f:
            for r in rows + fits:
                f.write(json.dumps({**header, **r}) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON lines here")
    parser.add_argument("--shapes", nargs="*", help=f"a subset of {[s.name for s in SHAPES]}")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    parser.add_argument("--no-torch-ref", action="store_true", help="skip timing the plain-torch reference")
    main(parser.parse_args())
