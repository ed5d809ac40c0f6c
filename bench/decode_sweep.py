"""Sweep the latent decode kernels' launch configs (tile, warps, stages, splits) on the running GPU.

    PYTHONPATH=. python -m bench.decode_sweep --out runs/decode_sweep.jsonl
    PYTHONPATH=. python -m bench.decode_sweep --baseline old_triton_latent.py   # also time another version's defaults

For each shape in SWEPT (or --shapes; from bench/decode.py) it times the bf16 and the int4 kernel with every `LaunchConfig` of a grid at the
largest point (B=64, T=32k, programs_per_sm 4), then the best few with each programs_per_sm at every point, and
prints the best per shape, kernel and point next to the current defaults (`default_config`, `default_config_int4`).
Times are `bench.decode.time_ms` (CUDA graphs, cold L2); GB/s = cache bytes / time. The kernels are compiled first
by worker processes in parallel (Triton's disk cache), so the GPU's time goes to timing: a sweep of 4 warps or 8 over
three shapes took about a minute on an H200 (bench/results/decode/sweep_h200.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import multiprocessing
import os
import shlex
import sys
from dataclasses import replace
from itertools import product

import torch
from triton.runtime.errors import OutOfResources

from bench.decode import (
    SHAPES,
    BenchShape,
    copy_bandwidth_gbs,
    int4_inputs,
    mla_inputs,
    peak_bandwidth_gbs,
    time_ms,
    time_sdpa,
)
from mha2mla_core.kernels import triton_latent
from mha2mla_core.kernels.latent_decode import latent_decode_attention_reference

# ---- defaults ------------------------------------------------------------------------------------------------------
POINTS = ((16, 16384), (64, 32768))  # (B, T): the targets are B >= 16, T >= 16k
STAGE1_POINT = (64, 32768)
STAGE1_PPS = 4.0
PROGRAMS_PER_SM = (2.0, 4.0, 8.0, 16.0)
TOP = 2  # configs of stage 1 carried into the programs_per_sm sweep
COMPILE_T = 4096  # tokens of the inputs the compile workers run on (the kernels' specialisations do not depend on T)
SMEM_LIMIT = 210 * 1024
SWEPT = ["smollm2-135m/shared", "smollm2-135m/shared-rope", "smollm2-135m-r64/shared-rope", "llama2-7b/shared",
         "llama2-7b/shared-rope", "llama2-7b/per_head"]


def bf16_grid(s: BenchShape) -> list[triton_latent.LaunchConfig]:
    per_token = 2 * (triton_latent._pow2(s.Rc) + triton_latent._pow2(max(1, s.rope_heads // s.Hc) * s.Dr))
    grid = []
    for block_t, warps, stages in product((16, 32, 64, 128), (1, 2, 4), (2, 3, 4)):
        if stages * block_t * per_token <= SMEM_LIMIT and 4096 <= block_t * per_token <= 100 * 1024:
            grid.append(triton_latent.LaunchConfig(block_t, warps, stages, STAGE1_PPS))
    return grid


def int4_grid(s: BenchShape) -> list[triton_latent.LaunchConfig]:
    tiles = (32, 64) if s.Rc <= 64 else (16, 32)
    return [triton_latent.LaunchConfig(block_t, warps, 3, STAGE1_PPS) for block_t, warps in product(tiles, (1, 2, 4))]


def run_config(kind: str, s: BenchShape, B: int, T: int, cfg, module=triton_latent):
    """A closure running one decode step of `kind` with `cfg` (no retry on shared-memory overflow), and its inputs:
    (q_lat, q_pe, c_kv, k_pe) or (q_lat, q_pe, QuantizedLatentKV)."""
    q_lat, q_pe, c_kv, k_pe = mla_inputs(s, B, T)
    scale = 1 / math.sqrt(s.D + s.Dr)
    if kind == "bf16":
        return lambda: module._decode(q_lat, q_pe, c_kv, k_pe, scale, None, None, cfg), (q_lat, q_pe, c_kv, k_pe)
    del c_kv, k_pe
    kv = int4_inputs(s, B, T)
    return lambda: module._decode_int4(q_lat, q_pe, kv, scale, None, cfg), (q_lat, q_pe, kv)


def _compile_worker(jobs: list[tuple]) -> int:
    """Run each (kind, shape, B, cfg, module path) once on small inputs so that Triton compiles and caches it."""
    failed = 0
    for kind, s, B, cfg, path in jobs:
        try:
            module = triton_latent if path is None else load_baseline(path)
            if cfg is None:
                cfg = default_for(kind, s, B, COMPILE_T, module)
            fn, _ = run_config(kind, s, B, COMPILE_T, cfg, module)
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the others still compile
            failed += 1
            if not isinstance(e, OutOfResources):
                print(f"compiling {kind} {s.name} {cfg} failed: {e!r}", flush=True)
        finally:
            torch.cuda.empty_cache()
    return failed


def precompile(jobs: list[tuple], workers: int) -> None:
    chunks = [jobs[i::workers] for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        failed = sum(pool.map(_compile_worker, chunks))
    print(f"compiled {len(jobs)} variants in {workers} processes ({failed} failed)", flush=True)


def timed(kind: str, s: BenchShape, B: int, T: int, cfg, module=triton_latent) -> float | None:
    """Microseconds of one step, None where the config does not fit the GPU's shared memory."""
    try:
        fn, _ = run_config(kind, s, B, T, cfg, module)
        return 1e3 * time_ms(fn)
    except OutOfResources:
        return None
    except Exception as e:  # noqa: BLE001 - reported; the sweep goes on with the other configs
        print(f"timing {kind} {s.name} {cfg} failed: {e!r}", flush=True)
        return None
    finally:
        torch.cuda.empty_cache()


def time_sdpa_bytes(s: BenchShape, B: int, T: int) -> int:
    return 2 * 2 * B * s.Hkv * T * s.D  # bf16 K and V


def cache_bytes(kind: str, s: BenchShape, B: int, T: int) -> int:
    if kind == "bf16":
        return 2 * B * T * (s.Hc * s.Rc + s.rope_heads * s.Dr)
    return int4_inputs(s, 1, T).nbytes * B


def default_for(kind: str, s: BenchShape, B: int, T: int, module=triton_latent):
    """The config the library picks for this point (module: this version or a baseline)."""
    q_lat, q_pe, c_kv, k_pe = mla_inputs(s, 1, 64)
    if kind == "bf16":
        return module.default_config(q_lat, c_kv, k_pe)
    return module.default_config_int4(q_lat, int4_inputs(s, 1, 256))


def check(s: BenchShape, cfg, kind: str) -> float:
    """Relative error of the kernel with cfg against the fp32 reference at B=4, T=8k."""
    fn, data = run_config(kind, s, 4, 8192, cfg)
    q_lat, q_pe, c_kv, k_pe = data if kind == "bf16" else (*data[:2], *data[2].dequantize())
    out = fn().float()
    ref = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, 1 / math.sqrt(s.D + s.Dr)).float()
    return float((out - ref).norm() / ref.norm())


def sweep_shape(s: BenchShape, kind: str, peak_gbs: float, baseline) -> list[dict]:
    grid = bf16_grid(s) if kind == "bf16" else int4_grid(s)
    stage1 = [(timed(kind, s, *STAGE1_POINT, cfg), cfg) for cfg in grid]
    if not any(us is not None for us, _ in stage1):
        print(f"{s.name} {kind}: no config of the grid ran", flush=True)
        return []
    stage1 = sorted(((us, cfg) for us, cfg in stage1 if us is not None), key=lambda x: x[0])
    for us, cfg in stage1:
        print(f"  stage1 {s.name} {kind} {cfg}: {us:.1f} us", flush=True)
    rows = []
    for B, T in POINTS:
        nbytes = cache_bytes(kind, s, B, T)
        tried = {}
        for (_, cfg), pps in product(stage1[:TOP], PROGRAMS_PER_SM):
            cand = replace(cfg, programs_per_sm=pps)
            tried[cand] = timed(kind, s, B, T, cand)
        default = default_for(kind, s, B, T)
        tried[default] = timed(kind, s, B, T, default)
        best = min((c for c in tried if tried[c] is not None), key=tried.get)
        row = {"shape": s.name, "kind": kind, "B": B, "T": T, "bytes": nbytes,
               "best": dataclasses.asdict(best), "best_us": tried[best], "default": dataclasses.asdict(default),
               "default_us": tried[default], "check_rel_err": check(s, best, kind),
               "all": [{**dataclasses.asdict(c), "us": us} for c, us in tried.items()]}  # fmt: skip
        if kind == "bf16":  # the peer: torch SDPA (enable_gqa) over the original model's K/V cache
            row["sdpa_us"] = 1e3 * time_sdpa(s, B, T)[0]
            row["sdpa_gbs"] = time_sdpa_bytes(s, B, T) / row["sdpa_us"] / 1e3
            row["sdpa_pct"] = 100 * row["sdpa_gbs"] / peak_gbs
            torch.cuda.empty_cache()
        if baseline is not None:
            row["baseline_us"] = timed(kind, s, B, T, default_for(kind, s, B, T, baseline), baseline)
        for key in ("best", "default", "baseline"):
            if row.get(f"{key}_us"):
                row[f"{key}_gbs"] = nbytes / row[f"{key}_us"] / 1e3
                row[f"{key}_pct"] = 100 * row[f"{key}_gbs"] / peak_gbs
        print(json.dumps({k: v for k, v in row.items() if k != "all"}), flush=True)
        rows.append(row)
    return rows


@functools.lru_cache(maxsize=2)
def load_baseline(path: str | None):
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("baseline_triton_latent", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/decode_sweep.jsonl")
    parser.add_argument("--shapes", nargs="*", help=f"a subset of {[s.name for s in SHAPES]}", default=SWEPT)
    parser.add_argument("--kinds", nargs="+", default=["bf16", "int4"], choices=["bf16", "int4"])
    parser.add_argument("--baseline", help="a triton_latent.py of another version: its defaults are timed too")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    args = parser.parse_args()
    by_name = {s.name: s for s in SHAPES}
    shapes = [by_name[name] for name in args.shapes] if args.shapes else list(SHAPES)
    peak_gbs, peak_source = peak_bandwidth_gbs(copy_bandwidth_gbs())
    command = "python " + shlex.join(sys.argv)
    print(f"{torch.cuda.get_device_name()}: peak {peak_gbs:.0f} GB/s ({peak_source}); command: {command}", flush=True)
    jobs = [(kind, s, B, cfg, None) for s in shapes for kind in args.kinds for B, _ in POINTS
            for cfg in (bf16_grid(s) if kind == "bf16" else int4_grid(s))]  # fmt: skip
    if args.baseline:  # its kernels specialise on T's divisibility: mostly, not always, what the timed calls compile
        jobs += [(kind, s, B, None, args.baseline) for s in shapes for kind in args.kinds for B, _ in POINTS]
    precompile(jobs, args.workers)
    baseline = load_baseline(args.baseline)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = []
    with open(args.out, "w") as f:  # row by row, so that a run stopped early keeps what it measured
        for s, kind in product(shapes, args.kinds):
            for r in sweep_shape(s, kind, peak_gbs, baseline):
                rows.append(r)
                f.write(json.dumps({"device": torch.cuda.get_device_name(), "command": command, "peak_gbs": peak_gbs, **r}) + "\n")
                f.flush()
    print(f"\n{torch.cuda.get_device_name()}, {command}; % of {peak_gbs:.0f} GB/s")
    print("| shape | kernel | B | T | best config | best us (GB/s, %) | default us (%) | baseline us (%) | SDPA us (%) "
          "| rel err |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        b = r["best"]
        cfg = f"t{b['block_t']} w{b['num_warps']} s{b['num_stages']} pps{b['programs_per_sm']:g}"
        base = f"{r['baseline_us']:.1f} ({r['baseline_pct']:.0f}%)" if r.get("baseline_us") else "-"
        sdpa = f"{r['sdpa_us']:.1f} ({r['sdpa_pct']:.0f}%)" if r.get("sdpa_us") else "-"
        print(f"| {r['shape']} | {r['kind']} | {r['B']} | {r['T'] // 1024}k | {cfg} | {r['best_us']:.1f} "
              f"({r['best_gbs']:.0f}, {r['best_pct']:.0f}%) | {r['default_us']:.1f} ({r['default_pct']:.0f}%) | {base} | {sdpa} "
              f"| {r['check_rel_err']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
