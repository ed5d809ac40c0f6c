"""Where a decode step's GPU time goes: the kernels of one step, by total time, for the decoding cases of issue 17.

    PYTHONPATH=. python -m bench.profile_step            # one CUDA GPU, ~1 min

Cases (SmolLM2-135M shape, random weights, bf16, the decoder of `mha2mla_core.modeling.decoding`):
- `teacher`: the data-free sampler's step, the original model at `--rows` rows over a 1,024-slot static cache
  (temperature 1), as `sample_continuations` runs it;
- `mla-b1` / `original-b1`: one-row greedy decode at a 4k context (other contexts: `--contexts`; `mla-b1-unfused`:
  without the MLA attention's fused decode weights, `StaticDecoder(fused=False)`).
For each, with the step's model eager and compiled (`--compiled 0 1`): ms a step from graph replays, then a profile
of steps without the graph (the same kernels, plus launch gaps): the top kernels by GPU time and the kernel count a
step. `--cases` picks cases (and `sampler`: whole `sample_continuations` calls at `--sampler-rows`); `--compile-mode`
overrides the decoder's torch.compile mode (`compile_mode_for`: max-autotune-no-cudagraphs for one row, else default).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.generate import build_models, tile
from bench.shapes import SMOLLM2_135M
from mha2mla_core.modeling.decoding import StaticDecoder, compile_mode_for, prefill, sample_continuations

PROFILED_STEPS = 4
CASES = ("sampler", "teacher", "mla-b1", "mla-b1-unfused", "original-b1")


def step_ms(decoder: StaticDecoder, steps: int) -> float:
    decoder.run(2)
    torch.cuda.synchronize()
    start = time.perf_counter()
    decoder.run(steps)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / steps


def kernels(decoder: StaticDecoder, top: int) -> None:
    decoder.run(2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.run(PROFILED_STEPS)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / PROFILED_STEPS
    count = sum(e.count for e in events) / PROFILED_STEPS
    print(f"  eager profile: {total / 1e3:.3f} ms GPU time, {count:.0f} kernels a step")
    for e in events[:top]:
        print(f"  {e.device_time_total / PROFILED_STEPS:9.1f} us {e.count / PROFILED_STEPS:5.0f}x  {e.key[:110]}")


def case(name: str, model, prompt_len: int, new: int, rows: int, temperature: float, top: int, compiled: bool,
         fused: bool = True, mode: str | None = None) -> None:  # fmt: skip
    prompt = torch.randint(3, SMOLLM2_135M["vocab_size"], (1, prompt_len), device="cuda")
    state = tile(prefill(model, prompt, new, temperature=temperature), rows)
    start = time.perf_counter()
    decoder = dict(temperature=temperature, compiled=compiled, fused=fused, compile_mode=mode if compiled else None)
    graph = StaticDecoder(model, state, cuda_graph=True, **decoder)
    ready_s = time.perf_counter() - start
    ms = step_ms(graph, min(32, new - 8))
    label = f" compiled ({compile_mode_for(rows, True, mode)})" if compiled else ""
    print(f"{name}{label}: rows {rows}, context {prompt_len}+{new}: graph {ms:.3f} ms a "
          f"step, {rows / ms * 1e3:,.0f} tok/s (capture {ready_s:.1f} s)")  # fmt: skip
    state = tile(prefill(model, prompt, new, temperature=temperature), rows)
    kernels(StaticDecoder(model, state, cuda_graph=False, **decoder), top)


def sampler(model, rows: int, compiled: bool, seq_len: int = 1024, mode: str | None = None) -> None:
    """The product's path: `sample_continuations` of `rows` 4-token prompts to seq_len, timed whole (prefill, capture,
    and compilation included: a second call shows the steady state)."""
    prompts = torch.randint(3, SMOLLM2_135M["vocab_size"], (rows, 4))
    for attempt in ("first", "again"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        sample_continuations(model, prompts, seq_len, seed=0, compiled=compiled, compile_mode=mode if compiled else None)
        seconds = time.perf_counter() - start
        label = f" compiled ({compile_mode_for(rows, True, mode)})" if compiled else ""
        print(f"sample_continuations{label}: {rows} rows x {seq_len} ({attempt}): "
              f"{seconds:.2f} s, {rows * (seq_len - 4) / seconds:,.0f} tok/s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--sampler-rows", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--compiled", type=int, nargs="+", default=[0, 1], help="0: eager modules, 1: torch.compile")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile's mode (default: the decoder's choice by the rows, compile_mode_for)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096], help="prompt tokens of the one-row cases")
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    models = build_models()
    run, mode = set(args.cases), args.compile_mode
    for compiled in map(bool, args.compiled):
        for rows in args.sampler_rows if "sampler" in run else ():
            sampler(models["original"], rows, compiled, mode=mode)
        for rows in args.rows if "teacher" in run else ():  # the sampler's cache: a 4-token prompt, then ~512 of 1,024
            case("teacher", models["original"], 512, 512, rows, 1.0, args.top, compiled, mode=mode)
        for context in args.contexts:
            if "mla-b1" in run:
                case("mla-b1", models["mla"], context, 64, 1, 0.0, args.top, compiled, mode=mode)
            if "mla-b1-unfused" in run:
                case("mla-b1-unfused", models["mla"], context, 64, 1, 0.0, args.top, compiled, fused=False, mode=mode)
            if "original-b1" in run:
                case("original-b1", models["original"], context, 64, 1, 0.0, args.top, compiled, mode=mode)


if __name__ == "__main__":
    main()
