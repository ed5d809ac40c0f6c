"""Real fine-tuning runs of the MLA-converted SmolLM2-135M on one GPU: PPL vs tokens, throughput, MFU.

    # here, once: tokenize the fine-tuning text, copy the evaluation and calibration text (for the GPU machine)
    .venv/bin/python bench/finetune.py prepare --out .carry_data
    # GPU: training tokens/s and MFU at seq 2048, with and without the teacher (a randomly initialised
    # SmolLM2-135M shape is enough for speed: --gguf '' ; or the real model)
    python3 bench/finetune.py throughput --out $OUT
    # GPU: named variants (VARIANTS below); each writes <name>.json with its command, PPL stages and curve
    python3 bench/finetune.py run kd-aware-kv16-5m lm-aware-kv16-5m --gguf /root/ft/model.gguf --data .carry_data --out $OUT
    # GPU: where a training step's time goes (kernels by GPU time, the GPU's busy share)
    python3 bench/finetune.py profile
    # here: the markdown table and the PPL-vs-tokens figure from the JSON results
    .venv/bin/python bench/finetune.py report bench/results/finetune

Protocol (as bench/zero_shot.py): wikitext-2 raw test read as stored (CRLF kept), tokenized whole, first
16,384 tokens, non-overlapping windows of 512 predicted tokens, fp32 (mha2mla_core.evaluation.perplexity).
Conversion: 2-norm, rope_dims 8, kv_rank per KV head, calibrated on 65,536 tokens hash-sampled from three
Gutenberg books (text_calib), or (calib="teacher") on those windows continued by the original model. Fine-tuning
text: ../shared/data/text_train (OpenStax + Stacks Project), packed in rows of 1,024 tokens; never the evaluation
text. The teacher is the original model (bf16 autocast).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from mha2mla_core import MLAConfig, convert_to_mla, load_model, sample_calibration
from mha2mla_core.conversion.calibration import CalibrationSample, continue_with_model
from mha2mla_core.evaluation.perplexity import perplexity_of_ids
from mha2mla_core.training.loop import FinetuneConfig, finetune
from mha2mla_core.modeling.modeling_mla import GroupedLinear
from mha2mla_core.training import ReconstructConfig, TrainEvent
from mha2mla_core.training.reconstruct import reconstruct_attention
from mha2mla_core.training.synthetic import mix_in_continuations, num_sampled_rows

from bench.latent_fade import LatentFade
from bench.shapes import SMOLLM2_135M

logger = logging.getLogger("bench.finetune")
app = typer.Typer(add_completion=False, no_args_is_help=True)

# ---- defaults ----------------------------------------------------------------------------------------------------
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIB_BOOKS = ("pg1342.txt", "pg1661.txt", "pg98.txt")  # Austen, Doyle, Dickens
CALIB_TOKENS = 65_536
EVAL_TOKENS, EVAL_WINDOW = 16_384, 512
SEQ_LEN, MICRO_BATCH = 1024, 16  # 16,384 tokens per optimizer step, as the independent probe
RECON_ROWS, RECON_SEQ = 128, 512  # calibration rows the attention layers are fitted on
H100_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of an H100 SXM (datasheet)


@dataclass(frozen=True)
class Variant:
    kv_rank: int = 16  # per KV head: 16 -> 81.25% KV saving, 8 -> 87.5%
    rope: str = "2-norm"  # or "rotated": one RoPE key shared by all heads, same budget (Hkv * rope_dims dims)
    rope_dims: int = 8
    rope_window: int | None = None  # rotated: rank slots by energy x what losing the rotation costs over this window
    svd: str = "aware"
    layout: str = "shared"
    refit_values: bool = False  # MLAConfig.refit_values; every variant measured before session 9 ran without it
    recon_steps: int = 300  # block-wise reconstruction steps before end-to-end training; 0 = none
    recon_lr: float = 1e-3
    tokens: int = 5_000_000
    kd_weight: float = 1.0  # 0 = LM loss only, no teacher
    lr: float = 6e-4
    trainable: str = "all"
    eval_every_tokens: int = 1_000_000
    synthetic_frac: float = 0.0  # share of training rows sampled from the original (data-free, LLM-QAT style)
    calib: str = "books"  # or "teacher": the book windows continued by the original (data-free calibration)
    decay_frac: float = 0.2  # share of the steps in the WSD schedule's final decay
    recon_on: str = "calib"  # reconstruction rows: the calibration windows, or "train": the first training rows (the
    # pipeline's `finetune` stage)
    recon_rows: int = RECON_ROWS  # rows of RECON_SEQ tokens (more than the calibration's 128 need recon_on="train")
    recon_micro: int = 8  # rows per reconstruction step
    hidden_weight: float = 0.0  # hidden-state distillation of every layer's residual stream, beside the logits KD
    anneal_to: int | None = None  # convert at kv_rank, fade the latent down to anneal_to per KV head (LatentFade)
    anneal_frac: float = 0.6  # share of the steps over which the extra latent dims fade to zero


ROT = dict(svd="output-aware", rope="rotated", rope_window=512)  # rotated partial RoPE, position-aware slots
EROT = dict(svd="output-aware", rope="rotated", calib="teacher")  # the default conversion, data-free calibration
VARIANTS = {
    "kd-aware-kv16-5m": Variant(),
    "kd-aware-kv16-20m": Variant(tokens=20_000_000, eval_every_tokens=2_000_000),
    "kd-aware-kv16-50m": Variant(tokens=50_000_000, eval_every_tokens=5_000_000),
    "kd-aware-kv16-norecon-5m": Variant(recon_steps=0),
    "lm-aware-kv16-5m": Variant(kd_weight=0.0),
    "kd-joint-kv16-5m": Variant(svd="joint"),
    "kd-aware-kv16-perhead-5m": Variant(layout="per_head"),
    "kd-aware-kv8-5m": Variant(kv_rank=8),
    "kd-aware-kv8-20m": Variant(kv_rank=8, tokens=20_000_000, eval_every_tokens=2_000_000),
    "kd-aware-kv16-datafree50-5m": Variant(synthetic_frac=0.5),
    # output-aware SVD (the default init since session 2), with real, mixed and sampled (data-free) text
    "kd-oaware-kv16-5m": Variant(svd="output-aware"),
    "kd-oaware-kv16-datafree50-5m": Variant(svd="output-aware", synthetic_frac=0.5),
    "kd-oaware-kv16-datafree-5m": Variant(svd="output-aware", synthetic_frac=1.0),
    "kd-oaware-kv16-attn-5m": Variant(svd="output-aware", trainable="attention", lr=1e-3),
    "kd-oaware-kv16-20m": Variant(svd="output-aware", tokens=20_000_000, eval_every_tokens=2_000_000),
    "kd-oaware-kv16-datafree50-20m": Variant(svd="output-aware", synthetic_frac=0.5, tokens=20_000_000,
                                             eval_every_tokens=2_000_000),
    "kd-oaware-kv16-datafree-20m": Variant(svd="output-aware", synthetic_frac=1.0, tokens=20_000_000,
                                           eval_every_tokens=2_000_000),
    "kd-oaware-kv16-datafree-50m": Variant(svd="output-aware", synthetic_frac=1.0, tokens=50_000_000,
                                           eval_every_tokens=5_000_000),
    "kd-oaware-kv8-datafree-20m": Variant(svd="output-aware", kv_rank=8, synthetic_frac=1.0, tokens=20_000_000,
                                          eval_every_tokens=2_000_000),
    # data-free calibration (zero shot: 652.6 against 917.0 on books), then real or data-free training rows
    "kd-oaware-kv16-tcalib-5m": Variant(svd="output-aware", calib="teacher"),
    "kd-oaware-kv16-tcalib-datafree-5m": Variant(svd="output-aware", calib="teacher", synthetic_frac=1.0),
    "kd-oaware-kv16-tcalib-20m": Variant(svd="output-aware", calib="teacher", tokens=20_000_000,
                                         eval_every_tokens=2_000_000),
    "kd-oaware-kv16-tcalib-datafree-20m": Variant(svd="output-aware", calib="teacher", synthetic_frac=1.0,
                                                  tokens=20_000_000, eval_every_tokens=2_000_000),
    "kd-oaware-kv16-tcalib-datafree-20m-decay50": Variant(svd="output-aware", calib="teacher", synthetic_frac=1.0,
                                                          tokens=20_000_000, eval_every_tokens=2_000_000,
                                                          decay_frac=0.5),
    "kd-oaware-kv16-datafree-reconrows-5m": Variant(svd="output-aware", synthetic_frac=1.0, recon_on="train"),
    "kd-oaware-kv8-tcalib-datafree-20m": Variant(svd="output-aware", kv_rank=8, calib="teacher", synthetic_frac=1.0,
                                                 tokens=20_000_000, eval_every_tokens=2_000_000),
    "kd-rot-kv16-5m": Variant(**ROT),
    "kd-rot-kv16-tcalib-datafree-5m": Variant(**ROT, calib="teacher", synthetic_frac=1.0),
    "kd-rot-kv16-tcalib-datafree-20m": Variant(**ROT, calib="teacher", synthetic_frac=1.0, tokens=20_000_000,
                                               eval_every_tokens=2_000_000, decay_frac=0.5),
    "kd-rot-kv8-tcalib-datafree-5m": Variant(**ROT, kv_rank=8, calib="teacher", synthetic_frac=1.0),
    # rotated without a window: the fastest frequencies, one component each, in every layer (the default; exportable)
    "kd-erot-kv16-tcalib-datafree-5m": Variant(svd="output-aware", rope="rotated", calib="teacher", synthetic_frac=1.0),
    "kd-erot-kv8-tcalib-datafree-5m": Variant(svd="output-aware", rope="rotated", kv_rank=8, calib="teacher",
                                              synthetic_frac=1.0),
    "kd-erot-kv16-tcalib-datafree-20m": Variant(svd="output-aware", rope="rotated", calib="teacher", synthetic_frac=1.0,
                                                tokens=20_000_000, eval_every_tokens=2_000_000, decay_frac=0.5),
    # session 6 sweep on real rows (no sampling time): learning rate, hidden-state distillation, longer
    # reconstruction on more rows, attention-only training
    **{f"kd-erot-kv16-tcalib-{tag}-5m": Variant(**EROT, **kw) for tag, kw in {
        "base": {}, "lr15e4": dict(lr=1.5e-3), "lr3e4": dict(lr=3e-4), "hid1": dict(hidden_weight=1.0),
        "hid5": dict(hidden_weight=5.0), "attn": dict(trainable="attention", lr=1e-3),
        "recon512x600": dict(recon_on="train", recon_rows=512, recon_steps=600, recon_micro=16),
        "hid5-lr15e4": dict(hidden_weight=5.0, lr=1.5e-3), "hid5-lr3e4": dict(hidden_weight=5.0, lr=3e-4),
    }.items()},
    "kd-erot-kv16-tcalib-hid5-20m": Variant(**EROT, hidden_weight=5.0, tokens=20_000_000, eval_every_tokens=4_000_000,
                                            decay_frac=0.5),
    # session 9: the value refit (zero shot 503.6 -> 303.9 on the CPU, but worse after a CPU reconstruction), before
    # the gpu recipe's reconstruction and distillation, with and without the reconstruction
    "kd-erot-kv16-tcalib-hid5-refit-5m": Variant(**EROT, hidden_weight=5.0, refit_values=True),
    "kd-erot-kv16-tcalib-hid5-refit-norecon-5m": Variant(**EROT, hidden_weight=5.0, refit_values=True, recon_steps=0),
    # session 10: how far tokens alone carry the best real-row recipe (2.7 epochs of text_train), and a heavier
    # hidden-state term
    "kd-erot-kv16-tcalib-hid5-40m": Variant(**EROT, hidden_weight=5.0, tokens=40_000_000, eval_every_tokens=5_000_000,
                                            decay_frac=0.5),
    "kd-erot-kv16-tcalib-hid20-5m": Variant(**EROT, hidden_weight=20.0),
    # session 11: what limits the plateau. The latent's width (kv_rank 32: 120 cached values, 68.75% saving, as a
    # capacity probe), the lower learning rate that won at 5M carried to 20M, and the kv_rank 8 (87.5%) curve
    "kd-erot-kv32-tcalib-hid5-5m": Variant(**EROT, hidden_weight=5.0, kv_rank=32),
    "kd-erot-kv16-tcalib-hid5-lr3e4-20m": Variant(**EROT, hidden_weight=5.0, lr=3e-4, tokens=20_000_000,
                                                  eval_every_tokens=4_000_000, decay_frac=0.5),
    "kd-erot-kv8-tcalib-hid5-20m": Variant(**EROT, hidden_weight=5.0, kv_rank=8, tokens=20_000_000,
                                           eval_every_tokens=4_000_000, decay_frac=0.5),
    # the same 72 values split with fewer RoPE dims and a wider latent, after training (zero shot, 24 + 48 was best)
    "kd-erot-r4-kv20-tcalib-hid5-5m": Variant(**EROT, hidden_weight=5.0, rope_dims=4, kv_rank=20),  # 12 + 60
    "kd-erot-r2-kv22-tcalib-hid5-5m": Variant(**EROT, hidden_weight=5.0, rope_dims=2, kv_rank=22),  # 6 + 66
    # a wider latent that fades to the 72-value one during distillation (LatentFade): kv_rank 32 learns fast (37.1 at
    # 5M), and the fade moves what its extra dims carry into the 48 kept ones before they are dropped. It lost, during
    # the CPU reconstruction (159.2 against 155.1) and here (50.3 at 5M against 46.8; session 12)
    "kd-erot-kv32to16-tcalib-hid5-5m": Variant(**EROT, hidden_weight=5.0, kv_rank=32, anneal_to=16),
    "kd-erot-kv32to16-tcalib-hid5-lr3e4-20m": Variant(**EROT, hidden_weight=5.0, kv_rank=32, anneal_to=16, lr=3e-4,
                                                      tokens=20_000_000, eval_every_tokens=4_000_000, decay_frac=0.5),
    # session 12: the 68.75% budget (120 values) on the 72-value recipe's 20M tokens (33.0; six tasks -0.84 points);
    # and the 72-value recipe at the 100M-token ceiling (six tasks -1.6 after 20M): ~11 min at 160k tok/s
    # on one H200, over two calls (`--deadline-s`, resumed from its checkpoint), 6.7 epochs of the 15M real tokens
    "kd-erot-kv32-tcalib-hid5-lr3e4-20m": Variant(**EROT, hidden_weight=5.0, kv_rank=32, lr=3e-4, tokens=20_000_000,
                                                  eval_every_tokens=4_000_000, decay_frac=0.5),
    "kd-erot-kv16-tcalib-hid5-lr3e4-100m": Variant(**EROT, hidden_weight=5.0, lr=3e-4, tokens=100_000_000,
                                                   eval_every_tokens=10_000_000, decay_frac=0.5),
    # the gpu recipe as the pipeline runs it (flows/recipes/gpu.yaml: rows sampled from the original), never measured
    # with hidden-state distillation: does it beat the textbook rows (41.35 at 20M) as it did without (45.5 vs 47.9)?
    "kd-erot-kv16-tcalib-datafree-hid5-lr3e4-20m": Variant(**EROT, synthetic_frac=1.0, hidden_weight=5.0, lr=3e-4,
                                                           tokens=20_000_000, eval_every_tokens=4_000_000,
                                                           decay_frac=0.5),
    # session 13: sampled rows lost to the textbook rows (six tasks 39.5 against 41.3), and 100M tokens left the six
    # tasks where 20M had them. Next: half and half, and the 87.5% budget on today's recipe (six tasks never measured)
    "kd-erot-kv16-tcalib-mix50-hid5-lr3e4-20m": Variant(**EROT, synthetic_frac=0.5, hidden_weight=5.0, lr=3e-4,
                                                        tokens=20_000_000, eval_every_tokens=4_000_000, decay_frac=0.5),
    "kd-erot-kv8-tcalib-hid5-lr3e4-20m": Variant(**EROT, hidden_weight=5.0, kv_rank=8, lr=3e-4, tokens=20_000_000,
                                                 eval_every_tokens=4_000_000, decay_frac=0.5),
    # session 14: the mix gave the best 20M PPL (39.6) and a worse six-task average (40.6 against 41.3). Does training
    # the whole model drift its knowledge? At 5M tokens the attention alone trained as far as every weight (48.1 against
    # 47.9, no hidden-state loss): train only the attention and the norms, the MLPs and embeddings frozen
    **{f"kd-erot-kv16-tcalib-attn-hid5-{tag}-20m": Variant(**EROT, trainable="attention+norms", hidden_weight=5.0,
                                                           lr=lr, tokens=20_000_000, eval_every_tokens=4_000_000,
                                                           decay_frac=0.5)
       for tag, lr in {"lr6e4": 6e-4, "lr1e3": 1e-3}.items()},
    # a budget in bytes: a wider latent in an int4 cache (KV_BITS=4 in gpu_pipeline.sh's quality mode) caches fewer
    # bytes than the 72-value bf16 latent: 120 values -> 91% less than the original, 216 values -> 84%
    "kd-erot-kv32-tcalib-hid5-lr3e4-100m": Variant(**EROT, hidden_weight=5.0, kv_rank=32, lr=3e-4, tokens=100_000_000,
                                                   eval_every_tokens=10_000_000, decay_frac=0.5),
    "kd-erot-kv64-tcalib-hid5-lr3e4-20m": Variant(**EROT, hidden_weight=5.0, kv_rank=64, lr=3e-4, tokens=20_000_000,
                                                  eval_every_tokens=4_000_000, decay_frac=0.5),
    # session 15: rank 64 in int4 met target 1 in bytes on textbook rows (29.50, 29.89 in int4; six tasks -0.3), and
    # both recipes convert that way now. Next: the gpu recipe exactly as it runs (rows sampled from the original),
    # how few tokens it needs (30.4 after 4M of the 20M schedule), and 87.5% counted in bytes (rank 48 in int4:
    # 168 values, 2,835 bytes a token, 87.7% less than the original)
    "kd-erot-kv64-tcalib-datafree-hid5-lr3e4-20m": Variant(**EROT, synthetic_frac=1.0, hidden_weight=5.0, kv_rank=64,
                                                           lr=3e-4, tokens=20_000_000, eval_every_tokens=4_000_000,
                                                           decay_frac=0.5),
    "kd-erot-kv64-tcalib-hid5-lr3e4-5m": Variant(**EROT, hidden_weight=5.0, kv_rank=64, lr=3e-4, decay_frac=0.5),
    "kd-erot-kv48-tcalib-hid5-lr3e4-20m": Variant(**EROT, hidden_weight=5.0, kv_rank=48, lr=3e-4, tokens=20_000_000,
                                                  eval_every_tokens=4_000_000, decay_frac=0.5),
}


# ---- data ----------------------------------------------------------------------------------------------------------
@app.command()
def prepare(out: Path = Path(".carry_data"), model: str = "smollm2-135m") -> None:
    """Tokenize text_train into one uint16 id stream; copy the wikitext test file and calibration books."""
    from transformers import AutoTokenizer

    from mha2mla_core.data import load_texts
    from mha2mla_core.loading import packaged_model_file
    from mha2mla_core.training import pack_texts

    gguf = packaged_model_file(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.mkdir(parents=True, exist_ok=True)
    stream = pack_texts(tokenizer, load_texts(SHARED / "text_train"), seq_len=1).flatten()  # documents + EOS
    np.savez_compressed(out / "text_train_ids.npz", ids=stream.numpy().astype(np.uint16))  # zlib: half the bytes
    shutil.copy(SHARED / "text_eval" / "wikitext-2-raw" / "wiki.test.raw", out / "wiki.test.raw")
    for book in CALIB_BOOKS:
        shutil.copy(SHARED / "text_calib" / "gutenberg" / book, out / book)
    print(f"{stream.numel():,} training tokens -> {out}")


def training_rows(data: Path, seq_len: int) -> torch.Tensor:
    stream = torch.from_numpy(np.load(data / "text_train_ids.npz")["ids"].astype(np.int64))
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)  # (N, seq_len)


def eval_ids(tokenizer, data: Path) -> torch.Tensor:
    with open(data / "wiki.test.raw", encoding="utf-8", newline="") as f:  # CRLF kept
        return torch.tensor(tokenizer(f.read(), verbose=False)["input_ids"][:EVAL_TOKENS])


def calib_texts(data: Path) -> list[str]:
    return [(data / book).read_text(encoding="utf-8") for book in CALIB_BOOKS]


# ---- measurements --------------------------------------------------------------------------------------------------
def wikitext_ppl(model: nn.Module, ids: torch.Tensor) -> float:
    nll, _, _ = perplexity_of_ids(model, ids, EVAL_WINDOW)
    return round(math.exp(nll), 3)


def train_flops_per_token(model: nn.Module, seq_len: int, backward: bool = True) -> float:
    """6 (or 2 for forward only) x matmul parameters + causal attention scores and values (PaLM appendix B)."""
    c = model.config
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, GroupedLinear)))
    attention = c.num_hidden_layers * c.num_attention_heads * seq_len * 2 * c.head_dim  # (q.k + p.v), causal half
    forward = 2 * params + attention
    return 3 * forward if backward else forward


def convert(source: nn.Module, variant: Variant, calib: torch.Tensor) -> nn.Module:
    cfg = MLAConfig(rope_strategy=variant.rope, rope_dims=variant.rope_dims, rope_window=variant.rope_window,
                    kv_rank=variant.kv_rank, svd=variant.svd, layout=variant.layout,
                    refit_values=variant.refit_values, calib_seq_len=512)
    return convert_to_mla(copy.deepcopy(source), cfg, calib)


# ---- throughput ----------------------------------------------------------------------------------------------------
@app.command()
def throughput(out: Path = Path("runs/finetune"), gguf: str = "", seq_len: int = 2048, micro_batch: int = 16,
               steps: int = 30) -> None:
    """Training tokens/s and MFU at `seq_len`, with and without the teacher, compiled and eager."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = (load_model(gguf)[0] if gguf else LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))).cuda().eval()
    calib = torch.randint(0, 49152, (8192,), generator=torch.Generator().manual_seed(0))
    rows = torch.randint(0, 49152, (4 * micro_batch * steps, seq_len), generator=torch.Generator().manual_seed(1))
    results = []
    for with_teacher, compile_ in [(False, True), (True, True), (False, False)]:
        student = convert(teacher, Variant(), calib.cuda())
        cfg = FinetuneConfig(max_tokens=steps * micro_batch * seq_len, seq_len=seq_len, micro_batch_size=micro_batch,
                             kd_weight=1.0 if with_teacher else 0.0, compile=compile_, log_every=5)
        windows: list[float] = []
        torch.cuda.reset_peak_memory_stats()
        finetune(student, teacher if with_teacher else None, rows, cfg,
                 callbacks=[lambda e: windows.append(e.metrics["tokens_per_s"]) if e.kind == "log" else None])
        tok_s = statistics.median(windows[2:])  # after compilation and warm-up
        flops = train_flops_per_token(student, seq_len) + (train_flops_per_token(teacher, seq_len, False)
                                                             if with_teacher else 0)
        row = {"teacher": with_teacher, "compile": compile_, "seq_len": seq_len, "micro_batch": micro_batch,
               "tokens_per_s": round(tok_s), "flops_per_token": flops, "mfu": round(tok_s * flops / H100_BF16_PEAK, 4),
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
               "device": torch.cuda.get_device_name(), "command": "python3 " + shlex.join(sys.argv)}
        print(json.dumps(row), flush=True)
        results.append(row)
        del student
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(results, indent=1))


# ---- where a training step's time goes ------------------------------------------------------------------------------
@app.command()
def profile(seq_len: int = 1024, micro_batch: int = 16, steps: int = 10, hidden_weight: float = 5.0, top: int = 15,
            tiny: bool = False) -> None:
    """The gpu recipe's training step (KD + hidden-state distillation, compiled, bf16) on the random SmolLM2-135M
    shape: ms a step, the share of it the GPU is busy (kernel time over wall time: low means launch- or host-bound),
    and the kernels by GPU time over the last 3 steps. `--tiny`: a 2-layer shape, a smoke run that also works on the
    CPU (CPU operators instead of kernels)."""
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    shape = {**SMOLLM2_135M, **(dict(num_hidden_layers=2, vocab_size=512) if tiny else {})}
    teacher = LlamaForCausalLM(LlamaConfig(**shape)).to("cuda" if cuda else "cpu").eval()
    calib = torch.randint(0, shape["vocab_size"], (4 * 512,), generator=torch.Generator().manual_seed(0))
    student = convert(teacher, Variant(**EROT), calib.to(teacher.device))  # the default conversion's layout
    rows = torch.randint(0, shape["vocab_size"], (micro_batch * steps, seq_len),
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
    cfg = FinetuneConfig(max_tokens=steps * micro_batch * seq_len, seq_len=seq_len, micro_batch_size=micro_batch,
                         hidden_weight=hidden_weight, compile=cuda, bf16=cuda, log_every=1)
    active = 3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    tok_s: list[float] = []
    window = schedule(wait=steps - active - 1, warmup=1, active=active)  # the last `active` steps, compiled
    with torch_profile(activities=activities, schedule=window) as prof:
        def on_event(event: TrainEvent) -> None:
            if event.kind == "log":
                tok_s.append(event.metrics["tokens_per_s"])
                prof.step()

        finetune(student, teacher, rows, cfg, callbacks=[on_event])
    step_ms = 1e3 * micro_batch * seq_len / statistics.median(tok_s[-active:])
    events = [e for e in prof.key_averages()
              if (e.device_type.name == "CUDA") == cuda and not e.key.startswith("ProfilerStep")]

    def busy(e) -> float:  # µs over the `active` steps
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    total_ms = sum(busy(e) for e in events) / 1e3 / active
    flops = train_flops_per_token(student, seq_len) + train_flops_per_token(teacher, seq_len, False)
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}: {step_ms:.1f} ms a step ({micro_batch} x {seq_len}), "
          f"{'kernels' if cuda else 'CPU operators'} {total_ms:.1f} ms of it ({100 * total_ms / step_ms:.0f}% busy); "
          f"MFU {micro_batch * seq_len / step_ms * 1e3 * flops / H100_BF16_PEAK:.1%}", flush=True)
    for e in sorted(events, key=busy, reverse=True)[:top]:
        print(f"  {busy(e) / 1e3 / active:8.2f} ms {e.count // active:5d}x  {e.key[:110]}", flush=True)


# ---- zero-shot conversions on the GPU ------------------------------------------------------------------------------
@app.command("zero-shot")
def zero_shot(configs: list[str], gguf: str = "smollm2-135m", data: Path = Path(".carry_data"),
              out: Path = Path("runs/finetune"), cache: Path = Path("runs/finetune/cache"), calib: str = "books") -> None:
    """Wikitext PPL of each conversion, given as MLAConfig JSON (e.g. '{"rope_strategy": "rotated"}'), on the GPU.

    The bench protocol with the 65,536 calibration tokens of `run` (`--calib teacher`: continued by the original)."""
    ctx = _context(gguf, data, cache)
    ids = calibration(ctx, calib)
    rows = []
    for spec in configs:
        cfg = MLAConfig(**{"calib_seq_len": 512, **json.loads(spec)})
        start = time.perf_counter()
        student = convert_to_mla(copy.deepcopy(ctx.teacher), cfg, ids)
        seconds = time.perf_counter() - start
        rows.append({"config": cfg.to_dict(), "calib": calib, "ppl": wikitext_ppl(student, ctx.eval_ids),
                     "original_ppl": ctx.original_ppl, "kv_bytes_per_token": student.kv_bytes_per_token(),
                     "convert_s": round(seconds, 1), "device": torch.cuda.get_device_name()})
        print(json.dumps(rows[-1]), flush=True)
        del student
    out.mkdir(parents=True, exist_ok=True)
    (out / f"zero_shot_{calib}.json").write_text(json.dumps(rows, indent=1))


# ---- named runs ----------------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the deadline callback after a checkpoint, so that a later call resumes the run."""


@dataclass
class _Context:
    teacher: nn.Module
    tokenizer: object
    eval_ids: torch.Tensor
    calib: torch.Tensor  # (CALIB_TOKENS,) book windows
    rows: torch.Tensor
    cache: Path
    original_ppl: float


@app.command()
def run(names: list[str], gguf: str = "smollm2-135m", data: Path = Path(".carry_data"),
        out: Path = Path("runs/finetune"), cache: Path = Path("runs/finetune/cache"), deadline_s: float = 480.0,
        save_dir: Path | None = None) -> None:
    """Convert, reconstruct, fine-tune and evaluate each named variant; write <out>/<name>.json.

    A run still going at `deadline_s` stops after its next checkpoint: the same command resumes it.
    """
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise typer.BadParameter(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    deadline = time.monotonic() + deadline_s
    ctx = _context(gguf, data, cache)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if time.monotonic() > deadline:
            print(f"{name}: not started, past the deadline", flush=True)
            continue
        result, student = run_variant(name, VARIANTS[name], ctx, deadline)
        result["command"] = (f"python3 bench/finetune.py run {name} --gguf {gguf} --data {data} --cache {cache}"
                             + (f" --save-dir {save_dir}" if save_dir else ""))
        if save_dir is not None and result["finished"]:
            result["saved"] = save_and_reload(ctx, save_dir / name, student)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))


def _context(gguf: str, data: Path, cache: Path) -> _Context:
    teacher, tokenizer = load_model(gguf, device="cuda")
    ids = eval_ids(tokenizer, data)
    calib = sample_calibration(calib_texts(data), tokenizer, num_tokens=CALIB_TOKENS, seq_len=512, seed=0)
    ctx = _Context(teacher, tokenizer, ids, calib.input_ids.cuda(), training_rows(data, SEQ_LEN), cache,
                   wikitext_ppl(teacher, ids))
    print(f"original PPL {ctx.original_ppl}; {ctx.rows.shape[0]:,} training rows of {SEQ_LEN}", flush=True)
    return ctx


def calibration(ctx: _Context, source: str) -> torch.Tensor:
    """The book windows, or (teacher) the same windows continued by the original from their first 4 tokens."""
    if source == "books":
        return ctx.calib
    if source != "teacher":
        raise ValueError(f"calib={source!r}: use books or teacher")
    path = ctx.cache / "calib-teacher.pt"
    if not path.is_file():
        ctx.cache.mkdir(parents=True, exist_ok=True)
        sample = continue_with_model(ctx.teacher, CalibrationSample(ctx.calib.cpu(), "books"), RECON_SEQ)
        torch.save(sample.input_ids, path)
    return torch.load(path, weights_only=True).to(ctx.calib.device)


def initial_student(ctx: _Context, variant: Variant) -> tuple[nn.Module, dict]:
    """The converted (and reconstructed) student, from the disk cache when an earlier call made it."""
    key = f"{variant.svd}-{variant.layout}-kv{variant.kv_rank}-recon{variant.recon_steps}-lr{variant.recon_lr:g}"
    key += "" if (variant.rope, variant.rope_dims) == ("2-norm", 8) else f"-{variant.rope}{variant.rope_dims}"
    key += "" if variant.rope_window is None else f"-w{variant.rope_window}"
    key += "-engine" if variant.rope == "rotated" and variant.rope_window is None else ""
    key += "" if variant.calib == "books" else f"-calib{variant.calib}"
    key += "-refit" if variant.refit_values else ""
    if variant.recon_on == "train":
        key += f"-recontrain-mix{variant.synthetic_frac:g}-{variant.tokens}"
    if (variant.recon_rows, variant.recon_micro) != (RECON_ROWS, 8):
        key += f"-rows{variant.recon_rows}-micro{variant.recon_micro}"
    path = ctx.cache / f"{key}.pt"
    calib = calibration(ctx, variant.calib)
    student = convert(ctx.teacher, variant, calib)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        student.load_state_dict(saved["state"])
        return student, saved["stages"]
    stages = {"converted_ppl": wikitext_ppl(student, ctx.eval_ids), "kv_bytes_per_token": student.kv_bytes_per_token()}
    if variant.recon_steps:
        if variant.recon_on == "train":
            rows = training_mix(ctx, variant)[: variant.recon_rows * RECON_SEQ // SEQ_LEN].to(calib.device)
            rows = rows.reshape(-1, RECON_SEQ)
        else:
            if variant.recon_rows * RECON_SEQ > calib.numel():
                raise ValueError(f"recon_rows={variant.recon_rows} needs more than the {calib.numel():,} calibration "
                                 f"tokens; set recon_on='train'")
            rows = calib.reshape(-1)[: variant.recon_rows * RECON_SEQ].view(-1, RECON_SEQ)
        recon = reconstruct_attention(student, ctx.teacher, rows, ReconstructConfig(
            steps=variant.recon_steps, lr=variant.recon_lr, micro_batch_size=variant.recon_micro))
        stages |= {"reconstructed_ppl": wikitext_ppl(student, ctx.eval_ids), "recon_seconds": round(recon.seconds, 1),
                   "recon_rel_mse_before": _mean(recon.rel_mse_before), "recon_rel_mse_after": _mean(recon.rel_mse_after)}
    ctx.cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state": student.state_dict(), "stages": stages}, path)
    print(f"{key}: {stages}", flush=True)
    return student, stages


def run_variant(name: str, variant: Variant, ctx: _Context, deadline: float) -> tuple[dict, nn.Module]:
    student, stages = initial_student(ctx, variant)
    steps = variant.tokens // (SEQ_LEN * MICRO_BATCH)
    fade = None
    if variant.anneal_to is not None:  # the shared latent is kv_rank x the KV heads wide
        heads = student.config.num_key_value_heads
        fade = LatentFade(student, variant.anneal_to * heads, round(variant.anneal_frac * steps))
    cfg = FinetuneConfig(max_tokens=variant.tokens, seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, lr=variant.lr,
                         kd_weight=variant.kd_weight, hidden_weight=variant.hidden_weight,
                         trainable=variant.trainable, decay_frac=variant.decay_frac,
                         # compiling pays off from ~20M tokens; not with a fade, whose scale changes every step
                         compile=variant.tokens >= 20_000_000 and fade is None, log_every=25,
                         eval_every=max(1, variant.eval_every_tokens // (SEQ_LEN * MICRO_BATCH)),
                         checkpoint_every=max(1, steps // 4) if variant.tokens >= 20_000_000 else 0, keep_last=1)
    curve = [{"tokens": 0, "ppl": stages.get("reconstructed_ppl", stages["converted_ppl"])}]

    def on_event(event: TrainEvent) -> None:
        if event.kind == "eval":
            curve.append({"tokens": event.tokens, "ppl": event.metrics["ppl"]})
        if event.kind in ("eval", "log"):
            print(f"{name} step {event.step}/{event.total_steps} {json.dumps(event.metrics)}", flush=True)
        if fade is not None and event.kind == "log":
            fade.step = event.step  # from the trainer: right after a resume too
        if event.kind == "checkpoint" and time.monotonic() > deadline and event.step < event.total_steps:
            raise _Stop

    result = {"variant": name, **asdict(variant), "original_ppl": ctx.original_ppl,
              **stages, "finetune_config": asdict(cfg), "device": torch.cuda.get_device_name()}
    try:
        rows = training_mix(ctx, variant)
        fit = finetune(student, ctx.teacher if cfg.needs_teacher else None, rows, cfg,
                       checkpoint_dir=ctx.cache / "ckpt" / name, callbacks=[on_event],
                       evaluate=lambda m: {"ppl": wikitext_ppl(m, ctx.eval_ids)})
    except _Stop:
        print(f"{name}: stopped at the deadline after a checkpoint; run the same command again to resume", flush=True)
        return {**result, "finished": False, "curve": curve}, student
    flops = train_flops_per_token(student, SEQ_LEN) + (
        train_flops_per_token(ctx.teacher, SEQ_LEN, False) if cfg.needs_teacher else 0)
    evals = [h for h in fit.history if h["kind"] == "eval"]
    if fade is not None:  # the faded dims dropped: the final figures are the narrow model's
        fade.truncate(student)
        narrow = {"ppl": wikitext_ppl(student, ctx.eval_ids), "tokens": evals[-1]["tokens"]}
        result |= {"ppl_before_truncation": evals[-1]["ppl"], "kv_bytes_per_token": student.kv_bytes_per_token()}
        evals[-1] = {**evals[-1], **narrow}
    windows = [h["tokens_per_s"] for h in fit.history if h["kind"] == "log"][1:]  # the first one compiles
    tok_s = statistics.median(windows) if windows else fit.tokens_per_s
    return {**result, "finished": True, "final_ppl": evals[-1]["ppl"], "tokens_trained": fit.tokens,
            "curve": [{"tokens": 0, "ppl": curve[0]["ppl"]}] + [{"tokens": h["tokens"], "ppl": h["ppl"]} for h in evals],
            "tokens_per_s": round(tok_s), "mfu": round(tok_s * flops / H100_BF16_PEAK, 4),
            "train_seconds": round(fit.seconds, 1), "resumed_from_step": fit.resumed_from_step,
            "loss_curve": [{"tokens": h["tokens"], "loss": h["loss"]} for h in fit.history if h["kind"] == "log"]}, student


def training_mix(ctx: _Context, variant: Variant) -> torch.Tensor:
    """The variant's training rows: real, or with a share sampled from the teacher (in bf16, cached on disk)."""
    if variant.synthetic_frac == 0:
        return ctx.rows
    num_rows = variant.tokens // SEQ_LEN + 1
    path = ctx.cache / f"mix-{variant.synthetic_frac:g}-{num_rows}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    start = time.perf_counter()
    sampler = copy.deepcopy(ctx.teacher).to(torch.bfloat16)
    rows = mix_in_continuations(sampler, ctx.rows, variant.synthetic_frac, num_rows, batch_size=512)
    del sampler
    torch.cuda.empty_cache()
    ctx.cache.mkdir(parents=True, exist_ok=True)
    torch.save(rows, path)
    seconds = time.perf_counter() - start
    sampled = num_sampled_rows(variant.synthetic_frac, num_rows) * SEQ_LEN
    print(f"sampled {sampled:,} tokens from the teacher in {seconds:.0f} s ({sampled / seconds:,.0f} tok/s)", flush=True)
    return rows


def save_and_reload(ctx: _Context, path: Path, student: nn.Module) -> dict:
    """save_pretrained in the MLA format, reload with from_pretrained, check PPL and a greedy generate()."""
    from transformers import AutoModelForCausalLM

    student.save_pretrained(path)
    ctx.tokenizer.save_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path).cuda().eval()
    prompt = ctx.tokenizer("The history of the city begins", return_tensors="pt").to("cuda")
    generated = reloaded.generate(**prompt, max_new_tokens=40, do_sample=False)
    return {"path": str(path), "model_type": reloaded.config.model_type, "reloaded_ppl": wikitext_ppl(reloaded, ctx.eval_ids),
            "kv_bytes_per_token": reloaded.kv_bytes_per_token(),
            "size_mb": round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6, 1),
            "greedy_sample": ctx.tokenizer.decode(generated[0], skip_special_tokens=True)}


# ---- report --------------------------------------------------------------------------------------------------------
@app.command()
def report(results: Path = typer.Argument(Path("bench/results/finetune"))) -> None:
    """A markdown table of every <name>.json and ppl_vs_tokens.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(results.glob("*.json")) if p.name != "throughput.json"]
    print("| variant | KV saving | converted | + recon | final | tokens | tok/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(runs):
        kv_rank = r.get("anneal_to") or r["kv_rank"]  # a faded latent ends at anneal_to
        saving = 100 * (1 - (kv_rank + r.get("rope_dims", 8)) * 3 / (2 * 3 * 64))  # SmolLM2: 3 KV heads of 64
        final, tokens = r.get("final_ppl", "-"), f"{r.get('tokens_trained', 0) / 1e6:.0f}M"
        if not r.get("finished") and len(r["curve"]) > 1:  # stopped at the deadline: its last evaluation
            last = r["curve"][-1]
            final, tokens = f"{last['ppl']} (stopped)", f"{last['tokens'] / 1e6:.1f}M of {r['tokens'] / 1e6:.0f}M"
        print(f"| {r['variant']} | {saving:.2f}% | {r['converted_ppl']} | {r.get('reconstructed_ppl', '-')} | "
              f"{final} | {tokens} | {r.get('tokens_per_s', '-')} | {r.get('mfu', '-')} |")
        ax.plot([max(c["tokens"], 1e5) / 1e6 for c in r["curve"]], [c["ppl"] for c in r["curve"]], marker="o",
                label=r["variant"], markersize=3, color=colors[i % len(colors)])
    if runs:
        ax.axhline(runs[0]["original_ppl"], color="k", ls="--", label=f"original {runs[0]['original_ppl']}")
        ax.axhline(1.1 * runs[0]["original_ppl"], color="gray", ls=":", label="original + 10%")
    probe = [(2, 171), (5, 88), (10, 69), (20, 56)]
    ax.plot(*zip(*probe), "kx-", label="independent probe (plain KD)")
    ax.set(xscale="log", yscale="log", xlabel="training tokens (M; 0.1 = start)", ylabel="wikitext-2 PPL",
           title="SmolLM2-135M -> MLA: PPL vs fine-tuning tokens")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(results / "ppl_vs_tokens.png", dpi=120)


def _mean(values) -> float:
    return round(sum(values) / len(values), 4)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    app()
