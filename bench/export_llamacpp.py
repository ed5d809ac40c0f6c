"""The DeepSeek-V3 export of the real SmolLM2-135M run by clients no one here wrote: transformers and llama.cpp.

    .venv/bin/python bench/export_llamacpp.py [--work /tmp/mha2mla-export-bench] [--out bench/results/export_llamacpp]
    .venv/bin/python bench/export_llamacpp.py --kv-rank 64     # the recipes' latent; out: export_llamacpp_r64
    .venv/bin/python bench/export_llamacpp.py --kv-rank 64 --kv-block 32 --reconstruct-steps 100 \
        --cache-types f16 q8_0 q4_0                            # llama.cpp's quantized caches; out: ..._r64_b32_rec100

1. SmolLM2-135M (`load_model("smollm2-135m")`, the packaged GGUF, fp32) converted with the engine-compatible rotated
   config MLAConfig(rope_strategy="rotated", rope_dims=8, kv_rank=16), no rope_window (Dr = 24, Rc = 48: 72 cached
   values per token and layer vs 384; `--kv-rank 64`, the recipes' rank: Rc = 192, 216 values), calibrated on 8,192
   tokens of the packaged texts; with `--reconstruct-steps N`, then N steps of the cpu recipe's block-wise
   reconstruction on those windows; exported with `export_deepseek_v3(target="llamacpp", kv_block=--kv-block)`, the
   latent turned for quantized caches unless `--no-rotate-latent`.
2. transformers: a fresh interpreter that never imports mha2mla_core loads the export with
   `AutoModelForCausalLM.from_pretrained` (no trust_remote_code).
3. llama.cpp: the export converted by the `convert_hf_to_gguf.py` that ships in the llama-cpp-python sdist (architecture
   deepseek2, `--outtype f32`), run with llama-cpp-python built on this CPU (pinned LLAMA_CPP_PYTHON; the sdist is
   fetched with `pip download` and built with `pip install --target` into --work unless it is there already); the
   original SmolLM2 GGUF runs the same protocol for its KV cache size. Each GGUF runs once per `--cache-types` entry
   (llama.cpp's K and V cache type; quantized ones with flash attention, which llama.cpp requires for them).
Protocol: wikitext-2 raw test as stored, tokenized whole by the HF tokenizer, the first 4,096 tokens in non-overlapping
windows of 512 predicted tokens (`mha2mla_core.evaluation.perplexity`'s spans; every client gets the same token ids);
greedy continuation of PROMPT for 32 tokens (argmax of each client's own logits). KV bytes per token: llama.cpp's own
`llama_kv_cache` log line at context creation (size / n_ctx), ours from `MLAForCausalLM.kv_bytes_per_token`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import torch

from flows.publish import read_recipe
from mha2mla_core import MLAConfig, convert_to_mla, default_calibration_texts, load_model, sample_calibration
from mha2mla_core.evaluation.paths import WIKITEXT2_TEST, read_text
from mha2mla_core.evaluation.perplexity import perplexity_of_ids, window_spans
from mha2mla_core.conversion.export import export_deepseek_v3
from mha2mla_core.loading import packaged_model_file
from mha2mla_core.training.config import ReconstructConfig
from mha2mla_core.training.reconstruct import reconstruct_attention

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose sdist (llama.cpp + convert_hf_to_gguf.py) is used
DISKCACHE = "5.6.3"  # llama-cpp-python's one dependency that the project's environment lacks
KV_RANK = 16  # MLAConfig's default: 72 values a token and layer
PROMPT = "The old house at the end of the lane had been empty for years, until"
NEW_TOKENS, EVAL_TOKENS, WINDOW, N_CTX = 32, 4096, 512, 1024
REPO = Path(__file__).resolve().parents[1]

# each client gets {"spans": [[input ids, offset of the first scored logit]], "prompt": ids} on stdin and prints
# {"nll": summed NLL, "predicted": n, "greedy": ids}
HF_CLIENT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    job = json.load(sys.stdin)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    nll, predicted = 0.0, 0
    with torch.no_grad():
        for ids, first in job["spans"]:
            logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[first:-1], torch.tensor(ids[first + 1:]), reduction="sum").item()
            predicted += len(ids) - first - 1
        greedy = model.generate(torch.tensor([job["prompt"]]), max_new_tokens=job["new"], do_sample=False)
        cache = model(torch.tensor([job["prompt"]]), use_cache=True).past_key_values
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert not any(name.startswith("mha2mla") for name in sys.modules)
    print(json.dumps({"class": type(model).__name__, "nll": nll, "predicted": predicted,
                      "greedy": greedy[0, len(job["prompt"]):].tolist(),
                      "kv_bytes_per_token": cached / len(job["prompt"])}))
""")
LLAMA_CPP_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import llama_cpp
    job, cache = json.load(sys.stdin), sys.argv[3]
    ggml_type = getattr(llama_cpp, f"GGML_TYPE_{cache.upper()}")  # the cache's K and V type; quantized V needs flash attention
    llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), logits_all=True, n_threads=2, verbose=True,
                          seed=0, type_k=ggml_type, type_v=ggml_type, flash_attn=cache != "f16")
    nll, predicted = 0.0, 0
    for ids, first in job["spans"]:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        targets = np.asarray(ids[first + 1:])
        nll -= logp[np.arange(first, len(ids) - 1), targets].sum()
        predicted += len(targets)
    llm.reset()
    llm.eval(job["prompt"])
    greedy = []
    for _ in range(job["new"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    print(json.dumps({"nll": nll, "predicted": predicted, "greedy": greedy}))
""")


def build_llama_cpp(work: Path) -> tuple[Path, Path]:
    """(site dir with llama_cpp built on this CPU, llama.cpp source dir of the sdist); downloaded/built if absent."""
    site, src = work / "site", work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    sdist = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    pip = [sys.executable, "-m", "pip"]
    if not sdist.exists():
        subprocess.run([*pip, "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "-d", str(work)], check=True)  # fmt: skip
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
    if not (site / "llama_cpp").exists():
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
               "-DLLAMA_BUILD_TOOLS=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}  # fmt: skip
        subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(sdist), f"diskcache=={DISKCACHE}"],
                       check=True, env=env)  # fmt: skip
    return site, src / "vendor" / "llama.cpp"


def run_client(code: str, args: list[str], job: dict, pythonpath: str | None = None) -> tuple[dict, str]:
    """(the client's JSON, its stderr) from a fresh interpreter that never imports mha2mla_core."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    run = subprocess.run([sys.executable, "-c", code, *args], input=json.dumps(job), capture_output=True, text=True,
                         env=env, cwd="/")  # fmt: skip
    if run.returncode:
        raise RuntimeError(f"client failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


def kv_bytes_per_token(log: str, n_ctx: int) -> tuple[float, str]:
    """llama.cpp's KV cache size per token from its `llama_kv_cache: size = X MiB (...)` line, and the line."""
    line = next(l for l in log.splitlines() if re.search(r"llama_kv_cache: size\s*=", l))
    mib = float(re.search(r"size\s*=\s*([\d.]+)\s*MiB", line).group(1))
    return mib * 2**20 / n_ctx, line.strip()


def spans_job(ids: torch.Tensor, prompt: list[int]) -> dict:
    """The protocol's windows as (input ids, offset of the logit that predicts the first target)."""
    spans = [(ids[start:end].tolist(), first - 1 - start) for start, first, end in window_spans(ids.numel(), WINDOW, WINDOW)]
    return {"spans": spans, "prompt": prompt, "new": NEW_TOKENS}


@torch.no_grad()
def ours(model, job: dict, ids: torch.Tensor) -> dict:
    nll, predicted, _ = perplexity_of_ids(model, ids, WINDOW)
    out = model.generate(torch.tensor([job["prompt"]]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return {"nll": nll * predicted, "predicted": predicted, "greedy": out[0, len(job["prompt"]) :].tolist()}


@torch.no_grad()
def cache_bytes(model, tokens: int = 8) -> float:
    """Bytes per token of a plain transformers model's DynamicCache, measured on its own tensors."""
    cache = model(torch.zeros(1, tokens, dtype=torch.long), use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) / tokens


def report(name: str, found: dict, reference: dict) -> dict:
    ppl = math.exp(found["nll"] / found["predicted"])
    same = next((i for i, (a, b) in enumerate(zip(found["greedy"], reference["greedy"])) if a != b), NEW_TOKENS)
    return {"client": name, "ppl": ppl, "predicted": found["predicted"], "greedy_same_steps": same, **{
        k: v for k, v in found.items() if k in ("kv_bytes_per_token", "kv_log", "class")}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mha2mla-export-bench"))
    parser.add_argument("--out", type=Path, help="default: bench/results/export_llamacpp + _r<kv-rank> unless 16, "
                        "_b<kv-block> unless 1, _plain without the rotation, _rec<steps> with a reconstruction")
    parser.add_argument("--kv-rank", type=int, default=KV_RANK, help="latent dims per KV head (the recipes: 64)")
    parser.add_argument("--kv-block", type=int, default=1, help="export_deepseek_v3's kv_block: 32 pads the RoPE key "
                        "so that llama.cpp's quantized cache types take the export (needs --kv-rank 32 or 64)")
    parser.add_argument("--reconstruct-steps", type=int, default=0, help="block-wise reconstruction steps after the "
                        "conversion, with the cpu recipe's settings (100: the cpu recipe's model)")
    parser.add_argument("--rotate-latent", action=argparse.BooleanOptionalAction, default=True,
                        help="export_deepseek_v3's rotate_latent (default on)")
    parser.add_argument("--cache-types", nargs="+", default=["f16"], help="llama.cpp KV cache types to run each GGUF "
                        "with (f16, q8_0, q4_0, ...; quantized ones with flash attention)")
    args = parser.parse_args()
    parts = [(f"_r{args.kv_rank}", args.kv_rank != KV_RANK), (f"_b{args.kv_block}", args.kv_block != 1),
             ("_plain", not args.rotate_latent), (f"_rec{args.reconstruct_steps}", args.reconstruct_steps)]
    suffix = "".join(part for part, on in parts if on)
    out = args.out or REPO / "bench" / "results" / f"export_llamacpp{suffix}"
    config = MLAConfig(rope_strategy="rotated", rope_dims=8, kv_rank=args.kv_rank)  # no rope_window: fastest pairs
    args.work.mkdir(parents=True, exist_ok=True)
    site, llama_cpp_src = build_llama_cpp(args.work)

    source, tokenizer = load_model("smollm2-135m")
    calib = sample_calibration(default_calibration_texts(), tokenizer, 8192)
    start = time.perf_counter()
    mla = convert_to_mla(copy.deepcopy(source), config, calib.input_ids)
    if args.reconstruct_steps:
        recipe = ReconstructConfig(**{**read_recipe("cpu")["reconstruct"], "steps": args.reconstruct_steps})
        reconstruct_attention(mla, source, calib.input_ids.view(-1, config.calib_seq_len), recipe)
    export_dir = args.work / "smollm2-135m-deepseek_v3"
    if export_dir.exists():
        for f in export_dir.iterdir():
            f.unlink()
    summary = export_deepseek_v3(mla, export_dir, tokenizer, calib.input_ids, target="llamacpp", kv_block=args.kv_block,
                                 rotate_latent=args.rotate_latent)
    print(json.dumps({"export": summary, "seconds": time.perf_counter() - start}), flush=True)

    ids = torch.tensor(tokenizer(read_text(WIKITEXT2_TEST, "wikitext-2", "see ../shared/data/README.md"))["input_ids"][:EVAL_TOKENS])
    job = spans_job(ids, tokenizer(PROMPT)["input_ids"])
    reference = {**ours(mla, job, ids), "kv_bytes_per_token": mla.kv_bytes_per_token()}
    rows = [report("ours (MLAForCausalLM, torch fp32)", reference, reference),
            report("original SmolLM2 (torch fp32)", {**ours(source, job, ids), "kv_bytes_per_token": cache_bytes(source)}, reference)]
    hf, _ = run_client(HF_CLIENT, [str(export_dir)], job)
    rows.append(report("transformers DeepseekV3ForCausalLM (fp32)", hf, reference))

    gguf = args.work / "smollm2-135m-deepseek_v3-f32.gguf"
    subprocess.run([sys.executable, str(llama_cpp_src / "convert_hf_to_gguf.py"), str(export_dir), "--outtype", "f32",
                    "--outfile", str(gguf)], check=True, env={**os.environ, "PYTHONPATH": str(llama_cpp_src / "gguf-py")})  # fmt: skip
    ggufs = [("llama.cpp deepseek2 export (f32 GGUF)", gguf), ("llama.cpp original SmolLM2 (Q4_1 GGUF)", packaged_model_file("smollm2-135m"))]
    for (name, path), cache in itertools.product(ggufs, args.cache_types):
        found, log = run_client(LLAMA_CPP_CLIENT, [str(path), str(N_CTX), cache], job, pythonpath=str(site))
        found["kv_bytes_per_token"], found["kv_log"] = kv_bytes_per_token(log, N_CTX)
        rows.append(report(f"{name}, {cache} cache", found, reference))
        print(json.dumps(rows[-1]), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"export": summary, "rows": rows}, indent=2) + "\n")
    table = ["| client | PPL (wikitext-2, 4,096 tokens) | vs ours | greedy steps equal to ours (of 32) | KV bytes / token |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    table += [f"| {r['client']} | {r['ppl']:.4f} | {r['ppl'] / rows[0]['ppl'] - 1:+.4%} | {r['greedy_same_steps']} | "
              f"{r['kv_bytes_per_token']:,.0f} |" for r in rows]  # fmt: skip
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
