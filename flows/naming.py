"""Names a user can tell apart: a run and its registered model are named from the model and its config
(`smollm2-135m-mla-2norm8-kv16-outputaware-shared`, `...-kv8-...`, `...-ft20M-int4`, `...-rec50`), so that a
kv_rank 8 conversion is a model of its own, not version 2 of the default one; Prefect runs carry the same name, and
each stage task its role (`svd-init`, `evaluate[original]`)."""

from __future__ import annotations

import re

from pydantic import BaseModel


def config_tag(params: BaseModel) -> str:
    """The conversion config in a few dash-separated words: RoPE strategy and dims, latent rank, SVD, layout, then
    fine-tuning tokens (or reconstruction steps without fine-tuning) and cache bits when those stages run."""
    mla = params.mla
    words = [f"{_word(mla.rope_strategy)}{mla.rope_dims}", f"kv{mla.kv_rank}" if mla.kv_rank is not None else "kvfull",
             _word(mla.svd), _word(mla.layout)]  # fmt: skip
    if params.finetune is not None:
        words.append(f"ft{_count(params.finetune.train.max_tokens)}")
    elif getattr(params, "reconstruct", None) is not None:
        words.append(f"rec{params.reconstruct.steps}")
    if params.quantize_kv is not None:
        words.append(f"int{params.quantize_kv.nbits}")
    return "-".join(words)


def default_name(params: BaseModel, slug: str) -> str:
    """`params.name`, else `<model>-mla-<config_tag>`: the MLflow run name and the registered model name."""
    return params.name or f"{slug.replace('/', '--')}-mla-{config_tag(params)}"


def _word(value: str) -> str:
    return re.sub(r"[^a-z0-9]", "", value.lower())


def _count(tokens: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if tokens >= size and tokens % (size // 10) == 0:
            return f"{tokens / size:g}{unit}"
    return str(tokens)
