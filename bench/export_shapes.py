"""DeepSeek-V3 exports at the attention shapes of Llama-3-8B and Llama-3.2-1B (random weights, 2 layers): which engine
targets accept which layout, the KV saving, and the export's logits against ours in transformers' DeepseekV3.

    .venv/bin/python bench/export_shapes.py [--out bench/results/export_shapes]

Each shape keeps its real attention (hidden, heads, KV heads, head_dim, RoPE, norm eps); the MLP (1,024) and the
vocabulary (1,024) are cut so that a 2-layer model fits on a laptop: neither changes the exported attention layout.
The MLA models are built directly (`MLAForCausalLM` of a rotated-RoPE config: the fastest frequencies, one shared key)
with random weights; speed and the checks do not depend on them. Prints one JSON line per (shape, layout, target)
and a markdown table; writes both to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mha2mla_core.conversion.export import export_deepseek_v3, kv_values
from mha2mla_core.modeling.modeling_mla import MLAForCausalLM, MLALlamaConfig

REPO = Path(__file__).resolve().parents[1]
# the attention of each model's config.json
SHAPES = {
    "Llama-3-8B": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, max_position_embeddings=8192),
    "Llama-3.2-1B": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072, tie_word_embeddings=True),
}  # fmt: skip
LAYOUTS = ((512, 64), (256, 64))  # (kv_lora_rank, qk_rope_head_dim): rope_dims = 64 / Hkv, kv_rank = Rc / Hkv
TARGETS = ("hf", "llamacpp", "vllm", "trtllm")


def random_mla(shape: dict, rank: int, rope: int) -> MLAForCausalLM:
    """A 2-layer MLA model of `shape` with one shared RoPE key on the fastest rope / 2 frequencies, seeded."""
    torch.manual_seed(0)
    config = MLALlamaConfig(
        **shape, num_hidden_layers=2, intermediate_size=1024, vocab_size=1024, shared_rope=True,
        qk_rope_head_dim=rope, kv_lora_rank=rank, rope_pairs=[[list(range(rope // 2))]] * 2,
        mla_conversion={"rope_strategy": "rotated", "rope_dims": rope // shape["num_key_value_heads"],
                        "kv_rank": rank // shape["num_key_value_heads"], "layout": "shared"},
    )  # fmt: skip
    return MLAForCausalLM(config).eval()


def run(name: str, rank: int, rope: int, target: str) -> dict:
    model = random_mla(SHAPES[name], rank, rope)
    row = {"shape": name, "layout": f"{rank} + {rope}", "target": target}
    ids = torch.randint(0, 1024, (256,), generator=torch.Generator().manual_seed(1))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = export_deepseek_v3(model, Path(tmp) / "out", calib_ids=ids, target=target)
    except ValueError as exc:
        return {**row, "kv_saving": kv_values(model.config)["kv_saving"], "exported": False, "refused": str(exc)}
    return {**row, "exported": True, "kv_saving": summary["kv_saving"], **summary["measured"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "export_shapes")
    args = parser.parse_args()
    rows = []
    for name in SHAPES:
        for rank, rope in LAYOUTS:
            for target in TARGETS:
                rows.append(run(name, rank, rope, target))
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = ["| shape | layout | target | KV saving | exported | logits max-abs diff | refused because |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        diff = f"{r['logits_max_abs_diff']:.1e}" if r["exported"] else "-"
        reason = r.get("refused", "").split(";")[0].replace("|", "/")[:140]
        table.append(f"| {r['shape']} | {r['layout']} | {r['target']} | {r['kv_saving']:.1%} | {r['exported']} | {diff} | {reason} |")
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
