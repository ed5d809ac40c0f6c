"""End-to-end greedy decoding speed of SmolLM2-135M, original vs MLA, on a CUDA GPU.

    PYTHONPATH=. python bench/generate.py --out runs/generate.jsonl      # ~2 min on an H100

Both models have SmolLM2-135M's shape with random weights (decode speed does not depend on them; max positions raised
to 32k for the 16k point) in bf16; the MLA model is the default conversion (2-norm, r=8, kv_rank 16 per KV head,
aware SVD, shared latent: 81.25% less cache). For each context P and batch B:
- `graph`: `mha2mla_core.modeling.decoding` — a static cache (transformers' StaticCache for the original, StaticLatentCache for
  MLA) and one CUDA graph per decode step, replayed; the MLA step runs the fused Triton latent kernel. The original
  runs twice: `original` reads each K/V head once (`grouped_decode_attention`), `original-repeat_kv` through
  transformers' sdpa, which copies K/V out to every query head first (what transformers does with a mask). The
  speed-up is against the faster of the two (the decoder's default picks by the batch: `GROUPED_MIN_PAIRS`).
- `eager` (B = 1 only): the same step without the graph, and HF `generate()` with its default dynamic cache, to show
  what the Python loop costs.
The prompt of one row is prefilled for real and its cache copied to the B rows (decode reads the same bytes whatever
the tokens). Timed: `--steps` decode steps after 4 warm ones; tok/s = B * steps / seconds. Peak memory is the CUDA
allocator's over the whole point.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.shapes import SMOLLM2_135M
from mha2mla_core import MLAConfig, convert_to_mla
from mha2mla_core.modeling.decoding import DecodeState, StaticDecoder, prefill

CONTEXTS = (4096, 16384)
BATCHES = (1, 16, 64)
STEPS = 64
WARM_STEPS = 4


def build_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    original = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "max_position_embeddings": 32768})).cuda().eval()
    calib = torch.randint(0, SMOLLM2_135M["vocab_size"], (4096,), generator=torch.Generator().manual_seed(0))
    mla = convert_to_mla(copy.deepcopy(original), MLAConfig(), calib.cuda())
    return {"original": original.to(torch.bfloat16), "mla": mla.to(torch.bfloat16)}


def tile(state: DecodeState, batch: int) -> DecodeState:
    """The B = 1 state copied to `batch` rows (cache slots, mask, last token, positions)."""
    for layer in state.cache.layers:
        layer.keys, layer.values = layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1)
        layer.batch_size = batch
    rows = lambda t: t.repeat(batch, *([1] * (t.dim() - 1)))  # noqa: E731
    return DecodeState(state.cache, rows(state.tokens), rows(state.positions), rows(state.mask), state.slot,
                       rows(state.out), state.step)  # fmt: skip


def timed(decoder: StaticDecoder, steps: int) -> float:
    decoder.run(WARM_STEPS)
    torch.cuda.synchronize()
    start = time.perf_counter()
    decoder.run(steps)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def point(name: str, model, context: int, batch: int, steps: int, graph: bool, grouped: bool = True) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(3, SMOLLM2_135M["vocab_size"], (1, context), device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    state = prefill(model, prompt, WARM_STEPS + steps + 1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    seconds = timed(StaticDecoder(model, tile(state, batch), cuda_graph=graph, grouped=grouped), steps)
    return dict(model=name, mode="graph" if graph else "eager", context=context, batch=batch,
                ms_per_step=1e3 * seconds / steps, tok_s=batch * steps / seconds, prefill_b1_s=prefill_s,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)  # fmt: skip


def hf_generate(name: str, model, context: int, steps: int) -> dict:
    """HF generate() as users call it: dynamic cache, eager Python loop, B = 1."""
    prompt = torch.randint(3, SMOLLM2_135M["vocab_size"], (1, context), device="cuda")
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=2)
    model.generate(prompt[:, :128], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, **kw)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start  # prefill included: subtract a 1-token run's time
    start = time.perf_counter()
    model.generate(prompt, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
    torch.cuda.synchronize()
    decode_s = seconds - (time.perf_counter() - start)
    return dict(model=name, mode="hf_generate", context=context, batch=1, ms_per_step=1e3 * decode_s / (steps - 1),
                tok_s=(steps - 1) / decode_s)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/generate.jsonl")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    models = build_models()
    rows = []
    with open(args.out, "a") as sink:
        def keep(row: dict) -> None:
            rows.append(row)
            sink.write(json.dumps({**row, "device": torch.cuda.get_device_name()}) + "\n")
            sink.flush()
            print(json.dumps(row), flush=True)

        for context in CONTEXTS:
            for name, model in models.items():
                keep(hf_generate(name, model, context, 32))
                keep(point(name, model, context, 1, args.steps, graph=False))
                for batch in BATCHES:
                    keep(point(name, model, context, batch, args.steps, graph=True))
            for batch in BATCHES:
                keep(point("original-repeat_kv", models["original"], context, batch, args.steps, True, grouped=False))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    by = {(r["model"], r["mode"], r["context"], r["batch"]): r for r in rows}
    print("\n| mode | context | batch | original (repeat_kv) tok/s | original (grouped) tok/s | MLA tok/s | speed-up | "
          "original peak GiB | MLA peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in (r for r in rows if r["model"] == "mla"):
        key = (r["mode"], r["context"], r["batch"])
        o, repeat_kv = by[("original", *key)], by.get(("original-repeat_kv", *key))
        expanded = f"{repeat_kv['tok_s']:,.0f}" if repeat_kv else "-"
        best = max(o["tok_s"], repeat_kv["tok_s"] if repeat_kv else 0)
        peaks = f"{o.get('peak_gib', float('nan')):.2f} | {r.get('peak_gib', float('nan')):.2f}"
        print(f"| {r['mode']} | {r['context']} | {r['batch']} | {expanded} | {o['tok_s']:,.0f} | {r['tok_s']:,.0f} | "
              f"{r['tok_s'] / best:.2f}x | {peaks} |")  # fmt: skip


if __name__ == "__main__":
    main()
