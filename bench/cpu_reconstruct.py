"""What a short block-wise reconstruction buys a CPU worker: SmolLM2-135M's conversion, then the `cpu`
recipe's reconstruction (`flows/recipes/cpu.yaml`) run on for more steps, on the CPU.

    .venv/bin/python bench/cpu_reconstruct.py [--steps 50 100 200] [--kv-rank 8]
        [--calib books|model-continued|mixed] [--refit-values] [--lr 3e-4] [--calib-tokens 8192]
        [--fade-from 32] [--out bench/results/FILE.jsonl]

As the pipeline's CPU path does it: the recipe's MLAConfig (`--kv-rank`: another width) calibrated on the packaged
books (8,192 tokens unless `--calib-tokens` says otherwise, in windows of 512; `--calib model-continued`: each window
rewritten by the original from its first 4 tokens, the pipeline's `calibration.model_samples` and the `cpu` recipe's;
`mixed`: the first half of them), then `reconstruct_attention` on those windows with the recipe's settings. `--steps
50 100 200` fits 50 steps, scores, fits 50 more (a schedule of their own), scores, and so on. Scored: PPL on the
packaged held-out books (4,096 tokens, windows of 512: the pipeline's default evaluation) and on the wikitext-2
protocol (bench/zero_shot.py: 16,384 tokens). One JSON line per point, printed and appended to --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from bench.latent_fade import LatentFade
from flows.publish import read_recipe
from mha2mla_core import MLAConfig, convert_to_mla, default_calibration_texts, load_model, sample_calibration
from mha2mla_core.conversion.calibration import HELDOUT_FILE, continue_with_model, packaged_text_path
from mha2mla_core.evaluation.paths import WIKITEXT2_TEST, read_text
from mha2mla_core.evaluation.perplexity import perplexity
from mha2mla_core.training.config import ReconstructConfig
from mha2mla_core.training.reconstruct import reconstruct_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200], help="cumulative steps scored")
    recipe_rank = read_recipe("cpu").get("mla", {}).get("kv_rank", MLAConfig().kv_rank)
    parser.add_argument("--kv-rank", type=int, default=recipe_rank,
                        help="per KV head (default: the cpu recipe's; 16: 81.25%% less cache in values)")
    parser.add_argument("--calib", choices=("books", "model-continued", "mixed"), default="books",
                        help="calibration windows: the packaged books, the books continued by the original, or half "
                             "of each (the first half of the windows continued)")
    parser.add_argument("--refit-values", action="store_true",
                        help="convert with MLAConfig.refit_values (off by default) before reconstructing")
    parser.add_argument("--lr", type=float, help="reconstruction learning rate (default: the recipe's)")
    parser.add_argument("--micro-batch", type=int, help="windows a step (default: the recipe's)")
    parser.add_argument("--grad-clip", type=float, help="global grad-norm clip, 0 = none (default: the recipe's)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: the recipe's)")
    parser.add_argument("--calib-tokens", type=int, default=8192,
                        help="calibration tokens (the pipeline's calibration.num_tokens): the conversion's and the "
                             "reconstruction's windows")
    parser.add_argument("--fade-from", type=int,
                        help="convert at this kv_rank instead, and fade the extra latent dims down to --kv-rank over "
                             "the first 60%% of the last --steps (bench/latent_fade.py); the last point is the narrow "
                             "model, the faded dims dropped")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_reconstruct.jsonl"))
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    books = packaged_text_path(HELDOUT_FILE).read_text(encoding="utf-8")
    wiki = read_text(WIKITEXT2_TEST, "wikitext-2", "see ../shared/data/README.md")
    cpu_recipe = read_recipe("cpu")
    mla_cfg = MLAConfig(**{**cpu_recipe.get("mla", {}), "kv_rank": args.fade_from or args.kv_rank,  # the recipe's
                           **({"refit_values": True} if args.refit_values else {})})
    calib = sample_calibration(default_calibration_texts(), tokenizer, num_tokens=args.calib_tokens,
                               seq_len=mla_cfg.calib_seq_len)  # fmt: skip
    sampling_seconds = 0.0
    if args.calib != "books":
        start = time.perf_counter()
        n_windows = calib.num_tokens // mla_cfg.calib_seq_len
        cut = mla_cfg.calib_seq_len * (n_windows if args.calib == "model-continued" else n_windows // 2)
        head = dataclasses.replace(calib, input_ids=calib.input_ids[:cut])
        ids = torch.cat([continue_with_model(model, head, mla_cfg.calib_seq_len).input_ids, calib.input_ids[cut:]])
        calib = dataclasses.replace(calib, input_ids=ids)
        sampling_seconds = time.perf_counter() - start
    windows = calib.input_ids.view(-1, mla_cfg.calib_seq_len)  # (16, 512) by default: what the reconstruct stage fits on
    overrides = {"lr": args.lr, "micro_batch_size": args.micro_batch, "grad_clip": args.grad_clip, "bf16": args.bf16}
    recipe = ReconstructConfig(**{**cpu_recipe["reconstruct"], **{k: v for k, v in overrides.items() if v is not None}})

    def point(label: str, m: torch.nn.Module, steps: int, seconds: float) -> None:
        row = dict(model=label, kv_rank=args.kv_rank, fade_from=args.fade_from, refit_values=mla_cfg.refit_values,
                   calib=args.calib, calib_tokens=calib.num_tokens, steps=steps, seconds=round(seconds, 1),
                   sampling_seconds=round(sampling_seconds, 1),
                   ppl_books=perplexity(m, tokenizer, books, window=512, max_tokens=4096).ppl,
                   ppl_wikitext2=perplexity(m, tokenizer, wiki, window=512, max_tokens=16384).ppl,
                   cpus=os.cpu_count(), command="bench/cpu_reconstruct.py",
                   recipe=dataclasses.asdict(recipe))  # fmt: skip
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    point("original", model, 0, 0.0)
    start = time.perf_counter()
    mla = convert_to_mla(copy.deepcopy(model), mla_cfg, calib.input_ids)
    point("converted", mla, 0, time.perf_counter() - start)
    fade = None
    if args.fade_from:
        keep = args.kv_rank * model.config.num_key_value_heads  # the shared latent's width at --kv-rank
        fade = LatentFade(mla, keep, round(0.6 * args.steps[-1]))
    done = 0
    for steps in args.steps:
        start = time.perf_counter()
        reconstruct_attention(mla, model, windows, dataclasses.replace(recipe, steps=steps - done))
        done = steps
        point("reconstructed" if fade is None else f"reconstructed, fade scale {fade.scale:g}", mla, steps,
              time.perf_counter() - start)
    if fade is not None:
        fade.truncate(mla)
        point("reconstructed, faded dims dropped", mla, done, 0.0)


if __name__ == "__main__":
    main()
