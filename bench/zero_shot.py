"""Zero-shot conversion quality of SmolLM2-135M: wikitext-2 PPL, KV bytes/token, conversion time and memory.

    .venv/bin/python bench/zero_shot.py [--out bench/results/zero_shot] [--grid default|quick] [--calib-tokens 8192]

Protocol: wikitext-2 raw test read as-is (CRLF kept), tokenized whole, the first 16,384 tokens in
non-overlapping windows of 512 predicted tokens, fp32 (mha2mla_core.evaluation.perplexity). Calibration
(`--calib`, 8,192 tokens unless `--calib-tokens` says otherwise): `books` = 8,192 tokens hash-sampled (seed 0, windows of 512) from the Gutenberg books of
../shared/data/text_calib; `wikitext-tail` = the last 8,192 tokens of the same wikitext file, as the independent
reference implementation calibrated (in-domain, and disjoint from the scored first 16,384 tokens); `train` = 8,192
tokens hash-sampled the same way from the first 8M characters of the fine-tuning text (../shared/data/text_train);
`teacher` = data-free: the `books` windows of 512 tokens, each kept for its first 4 tokens and continued by the
original model itself (temperature 1, seed 0; `mha2mla_core.conversion.calibration.continue_with_model`).
Prints one JSON line per configuration and a markdown table; writes both to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from bench.memory import PeakRSS, rss
from mha2mla_core import MLAConfig, convert_to_mla, load_model, sample_calibration
from mha2mla_core.data import load_texts
from mha2mla_core.evaluation.paths import GUTENBERG_DIR, SHARED_DATA_DIR, WIKITEXT2_TEST, read_text
from mha2mla_core.evaluation.perplexity import run_perplexity
from mha2mla_core.conversion.calibration import CalibrationSample, continue_with_model

GRIDS = {
    "default": [
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=None),
        dict(rope_strategy="high", rope_dims=8, kv_rank=None),
        dict(rope_strategy="low", rope_dims=8, kv_rank=None),
        dict(rope_strategy="uniform", rope_dims=8, kv_rank=None),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="joint", layout="shared"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="aware", layout="shared"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="split", layout="per_head"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="joint", layout="per_head"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="aware", layout="per_head"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=8, svd="aware", layout="shared"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=8, svd="aware", layout="per_head"),
        dict(rope_strategy="2-norm", rope_dims=16, kv_rank=32, svd="aware", layout="shared"),
        dict(rope_strategy="2-norm", rope_dims=64, kv_rank=None),
    ],
    "output-aware": [
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="output-aware", layout="shared"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="output-aware", layout="per_head"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=8, svd="output-aware", layout="shared"),
    ],
    "rotated": [  # one shared rotated RoPE key against per-head 2-norm pairs, at the same cache budget
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=None),
        dict(rope_strategy="rotated", rope_dims=8, kv_rank=None),
        dict(rope_strategy="rotated", rope_dims=8, rope_window=512, kv_rank=None),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="output-aware", layout="shared"),
        dict(rope_strategy="rotated", rope_dims=8, kv_rank=16, svd="output-aware", layout="shared"),
        dict(rope_strategy="rotated", rope_dims=8, rope_window=512, kv_rank=16, svd="output-aware", layout="shared"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=8, svd="output-aware", layout="shared"),
        dict(rope_strategy="rotated", rope_dims=8, kv_rank=8, svd="output-aware", layout="shared"),
    ],
    "refit": [  # the default conversion without and with the least-squares value refit (MLAConfig.refit_values)
        dict(rope_strategy="rotated", rope_dims=8, kv_rank=rank, svd="output-aware", layout="shared", refit_values=refit)
        for rank in (16, 8) for refit in (False, True)
    ],
    "budget": [  # where 72 cached values per token and layer go: the shared RoPE key against the latent
        dict(rope_strategy="rotated", rope_dims=rope, kv_rank=rank, svd="output-aware", layout="shared")
        for rope, rank in ((2, 22), (4, 20), (8, 16), (12, 12))
    ],
    "quick": [
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="aware", layout="shared"),
        dict(rope_strategy="2-norm", rope_dims=8, kv_rank=16, svd="aware", layout="per_head"),
    ],
}


def calibration_ids(model, tokenizer, source: str, num_tokens: int = 8192) -> tuple[torch.Tensor, str]:
    if source == "teacher":
        sample = continue_with_model(model, CalibrationSample(*calibration_ids(model, tokenizer, "books", num_tokens)), 512)
        return sample.input_ids, sample.digest
    if source == "wikitext-tail":
        text = read_text(WIKITEXT2_TEST, "wikitext-2 test text", "see ../shared/data/README")
        ids = tokenizer(text, return_tensors="pt").input_ids[0, -num_tokens:]  # (num_tokens,)
        return ids, hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    if source == "train":
        texts = load_texts(SHARED_DATA_DIR / "text_train", limit_chars=8_000_000)  # the first ~2M tokens
    else:
        books = sorted(GUTENBERG_DIR.glob("*.txt"))
        if not books:
            raise FileNotFoundError(f"no calibration books in {GUTENBERG_DIR} (this benchmark reads ../shared/data)")
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in books]
    sample = sample_calibration(texts, tokenizer, num_tokens=num_tokens, seq_len=512, seed=0)
    return sample.input_ids, sample.digest


def measure(model, tokenizer, cfg: MLAConfig | None, calib: torch.Tensor, base_kv: float) -> dict:
    row = {"config": "original" if cfg is None else cfg.to_dict()}
    candidate = model
    if cfg is not None:
        before = rss()
        start = time.perf_counter()
        with PeakRSS() as peak:
            candidate = convert_to_mla(model, cfg, calib)
        row["convert_s"] = round(time.perf_counter() - start, 2)
        row["convert_peak_rss_delta_mb"] = round((peak.bytes - before) / 2**20, 1)
    kv = candidate.kv_bytes_per_token() if cfg is not None else base_kv
    row["kv_bytes_per_token"] = kv
    row["kv_saving_pct"] = round(100 * (1 - kv / base_kv), 2)
    row["ppl"] = round(run_perplexity(candidate, tokenizer).ppl, 3)
    return row


def original_kv_bytes(model) -> float:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize


def describe(row: dict) -> str:
    cfg = row["config"]
    if cfg == "original":
        return "original"
    rank = "-" if cfg["kv_rank"] is None else f"{cfg['kv_rank']} {cfg['svd']} {cfg['layout']}"
    window = f" window={cfg['rope_window']}" if cfg.get("rope_window") else ""
    return f"{cfg['rope_strategy']} r={cfg['rope_dims']}{window} kv_rank={rank}"


def markdown(rows: list[dict]) -> str:
    lines = ["| configuration | wikitext-2 PPL | KV bytes/token | saving | convert s | peak RSS delta MB |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {describe(r)} | {r['ppl']:,.2f} | {r['kv_bytes_per_token']:,.0f} | {r['kv_saving_pct']:.2f}% "
            f"| {r.get('convert_s', '-')} | {r.get('convert_peak_rss_delta_mb', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default")
    parser.add_argument("--calib", choices=("books", "wikitext-tail", "train", "teacher"), default="books")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("bench/results/zero_shot"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    calib, digest = calibration_ids(model, tokenizer, args.calib, args.calib_tokens)
    print(json.dumps({"model": args.model, "calibration": args.calib, "calibration_tokens": calib.numel(),
                      "calibration_sha256": digest}))  # fmt: skip
    base_kv = original_kv_bytes(model)
    rows = []
    for cfg in [None, *(MLAConfig(**g) for g in GRIDS[args.grid])]:
        rows.append(measure(model, tokenizer, cfg, calib, base_kv))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
