"""Evaluate the original SmolLM2-135M and MLA candidates side by side: PPL, zero-shot MC, needle grid, KV, speed.

    .venv/bin/python bench/evaluate.py --limit 100                       # the original only, CPU
    .venv/bin/python bench/evaluate.py --limit 100 \
        --candidate mla-ft=runs/finetuned                                 # a saved MLA checkpoint
        --convert mla-default=rope_dims=8,kv_rank=16,svd=aware,layout=shared   # converted here (calibration
                                                                          # as bench/zero_shot.py)
    .venv/bin/python bench/evaluate.py --device cuda --needle-lengths 1024,2048,4096,8000   # full runs on a GPU
    python3 bench/evaluate.py --model model.gguf --device cuda --no-original --candidate mla=ckpt \
        --mc-data-dir mc/ --ppl-text wiki.test.raw        # a machine without ../shared: data given, original skipped
    ... --candidate mla=ckpt --kv-bits 4                  # also each MLA model with an int4 latent cache

Stages (see mha2mla_core.evaluation): wikitext-2 PPL on the project protocol; lm-eval zero-shot MC on the local
tasks (`--limit` items per task, per subject for MMLU); needle-in-a-haystack in the Gutenberg books (lengths x
depths); KV bytes/token from the cache after a forward of `--kv-probe-tokens`; peak memory and prefill/decode/generate
tokens/s. Writes table.md, comparison.json, <name>.json per model and PNGs (needle heatmaps, decode speed, KV bytes)
to --out.

`--kv-bits N` scores each MLA model (`--candidate`, `--convert`) once more as `<name>-intN`, with its latent cache
quantized as `KVCacheQuantConfig(nbits=N, backend=--kv-backend)` (hqq, as the recipes, unless told), where the
cache is read: PPL through the cache, one token at a time, the needle and the speed points. Multiple choice scores
each item in one forward, which never reads the cache, so it is not run again.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch

from mha2mla_core import MLAConfig, convert_to_mla, load_model
from mha2mla_core.evaluation import (
    EvalConfig,
    EvalResult,
    InferenceConfig,
    MCConfig,
    NeedleConfig,
    PerplexityConfig,
    compare,
    evaluate_model,
    plots,
)
from mha2mla_core.evaluation.multiple_choice import TASK_FILES
from mha2mla_core.evaluation.paths import MC_DATA_DIR
from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def mla_config(spec: str) -> MLAConfig:
    """`rope_dims=8,kv_rank=16,svd=aware,layout=shared` (kv_rank=none: partial RoPE only)."""
    fields: dict[str, object] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key in ("rope_dims", "kv_rank", "calib_seq_len"):
            fields[key] = None if value.lower() == "none" else int(value)
        else:
            fields[key] = value
    return MLAConfig(**fields)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="the original model (load_model name)")
    p.add_argument("--candidate", type=named, action="append", default=[], help="NAME=PATH of a saved model")
    p.add_argument("--no-original", action="store_true",
                   help="skip the original's evaluation (deltas then read against the first candidate)")
    p.add_argument("--convert", type=named, action="append", default=[], help="NAME=MLAConfig fields, k=v,...")
    p.add_argument("--kv-bits", type=int, choices=(4, 2),
                   help="also score each MLA model with its latent cache quantized to this many bits")
    p.add_argument("--kv-backend", choices=("hqq", "quanto"), default="hqq",
                   help="the quantized cache's backend (default hqq, as the recipes)")
    p.add_argument("--out", type=Path, default=Path("bench/results/evaluate"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip", default="", help="stages to skip: comma list of ppl,mc,needle,inference")
    p.add_argument("--ppl-text", type=Path, default=None,
                   help="the perplexity text (default: the project's wikitext-2 test file, under ../shared)")
    p.add_argument("--tasks", default=",".join(TASK_FILES))
    p.add_argument("--limit", type=int, default=None, help="MC items per task (per subject for MMLU)")
    p.add_argument("--mmlu-limit", type=int, default=None, help="items per MMLU subject (default: --limit)")
    p.add_argument("--mc-data-dir", type=Path, default=MC_DATA_DIR)
    p.add_argument("--mc-source", choices=("local", "hub"), default="local")
    p.add_argument("--mc-batch-size", type=int, default=8)
    p.add_argument("--needle-lengths", type=ints, default=(1024, 2048, 4096))
    p.add_argument("--needle-depths", type=floats, default=(0.0, 0.25, 0.5, 0.75, 1.0))
    p.add_argument("--needle-trials", type=int, default=1)
    p.add_argument("--contexts", type=ints, default=(512, 2048))
    p.add_argument("--batch-sizes", type=ints, default=(1, 4))
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="measurements per speed point; the best is kept")
    p.add_argument("--kv-probe-tokens", type=int, default=4096,
                   help="KV bytes/token are read from the cache after a forward of this many tokens: past a quantized "
                        "cache's full-precision residual window, so an int4 cache shows its own bytes")
    return p.parse_args()


def eval_configs(args: argparse.Namespace) -> list[EvalConfig]:
    """The suite, split in two when MMLU has its own limit (lm-eval's limit is per task)."""
    skip = set(filter(None, args.skip.split(",")))
    tasks = tuple(filter(None, args.tasks.split(",")))
    mc = dict(data_dir=args.mc_data_dir, source=args.mc_source, batch_size=args.mc_batch_size)
    ppl = PerplexityConfig() if args.ppl_text is None else PerplexityConfig(text_path=args.ppl_text)
    base = EvalConfig(
        perplexity=None if "ppl" in skip else ppl,
        multiple_choice=MCConfig(tasks=tasks, limit=args.limit, **mc) if "mc" not in skip else None,
        needle=None
        if "needle" in skip
        else NeedleConfig(lengths=args.needle_lengths, depths=args.needle_depths, trials=args.needle_trials),
        inference=None
        if "inference" in skip
        else InferenceConfig(args.contexts, args.batch_sizes, args.decode_steps, args.repeats),
        kv_probe_tokens=args.kv_probe_tokens,
    )
    if "mc" in skip or args.mmlu_limit is None or "mmlu" not in tasks or tasks == ("mmlu",):
        return [base]
    others = tuple(t for t in tasks if t != "mmlu")
    return [
        replace(base, multiple_choice=MCConfig(tasks=others, limit=args.limit, **mc)),
        EvalConfig(None, MCConfig(tasks=("mmlu",), limit=args.mmlu_limit, **mc), None, None),
    ]


def evaluate(model, tokenizer, configs: list[EvalConfig], name: str) -> EvalResult:
    """evaluate_model per config, the MC scores and stage seconds of the later parts merged into the first."""
    result, *rest = [evaluate_model(model, tokenizer, cfg, name) for cfg in configs]
    for part in rest:
        seconds = {k: result.seconds.get(k, 0) + part.seconds.get(k, 0) for k in {*result.seconds, *part.seconds}}
        result = replace(result, multiple_choice={**result.multiple_choice, **part.multiple_choice}, seconds=seconds)
    return result


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lists every MMLU subtask
    configs = eval_configs(args)
    quant = KVCacheQuantConfig(nbits=args.kv_bits, backend=args.kv_backend) if args.kv_bits else None
    torch.manual_seed(0)
    if args.no_original and not (args.candidate or args.convert):
        raise SystemExit("--no-original needs a model to evaluate: add --candidate NAME=PATH or --convert NAME=SPEC")
    results = {}
    if not args.no_original or args.convert:
        model, tokenizer = load_model(args.model, device=args.device)
    if not args.no_original:
        results["original"] = evaluate(model, tokenizer, configs, "original")
    for name, path in args.candidate:
        candidate, candidate_tokenizer = load_model(path, device=args.device)
        results.update(evaluate_mla(candidate, candidate_tokenizer, configs, name, quant))
        del candidate
    if args.convert:
        from bench.zero_shot import calibration_ids

        calib, _ = calibration_ids(model, tokenizer, "books")
        for name, spec in args.convert:
            mla = convert_to_mla(model, mla_config(spec), calib)
            results.update(evaluate_mla(mla, tokenizer, configs, name, quant))
    write(results, args.out)


def evaluate_mla(model, tokenizer, configs: list[EvalConfig], name: str,
                 quant: KVCacheQuantConfig | None) -> dict[str, EvalResult]:
    """`name`'s result, and with `quant` also `name-intN`'s: the stages that read the cache, run again with the
    latent cache quantized (multiple choice scores in one forward, which never reads it)."""
    results = {name: evaluate(model, tokenizer, configs, name)}
    through_cache = [replace(c, multiple_choice=None) for c in configs if c.perplexity or c.needle or c.inference]
    if quant and through_cache and hasattr(model.config, "kv_cache_quant"):
        stored, model.config.kv_cache_quant = model.config.kv_cache_quant, quant.to_dict()
        label = f"{name}-int{quant.nbits}"
        results[label] = evaluate(model, tokenizer, through_cache, label)
        model.config.kv_cache_quant = stored  # the model as it came
    return results


def write(results: dict[str, EvalResult], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = compare(results)
    for name, result in results.items():
        (out / f"{name}.json").write_text(result.to_json())
        if result.needle:
            (out / f"needle_{name}.png").write_bytes(plots.needle_heatmap(result.needle, f"needle: {name}"))
    if any(r.inference for r in results.values()):
        (out / "decode_speed.png").write_bytes(plots.decode_speed(results))
    if any(r.kv_bytes_per_token is not None for r in results.values()):
        (out / "kv_cache.png").write_bytes(plots.kv_cache(results))
    (out / "comparison.json").write_text(table.to_json())
    (out / "table.md").write_text(table.to_markdown())
    print(table.to_markdown())
    print(f"wrote {out}/")


if __name__ == "__main__":
    main()
