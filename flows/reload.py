"""Reload a converted checkpoint in a fresh process and report on it (run by `mha2mla convert`).

    python -m flows.reload URI SHA256 --eval-text SPEC --max-tokens N --window W

Downloads the checkpoint from the artifact store (every file's digest checked), loads it with
`from_pretrained` (through `load_model`), and prints one JSON line: the PPL of the same evaluation text,
the KV-cache bytes per token measured on its own cache, and a greedy `generate()` sample.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import typer

from infra.artifacts import open_store
from infra.settings import Settings
from mha2mla_core import load_model
from mha2mla_core.evaluation.perplexity import perplexity
from tasks.inputs import DEFAULT_EVAL_TEXT, read_text, resolve_data

PROMPT = "The old house at the end of the lane had been empty for years, until"


def reload(
    uri: str,
    sha256: str,
    eval_text: str = typer.Option(DEFAULT_EVAL_TEXT),
    max_tokens: int = typer.Option(4096),
    window: int = typer.Option(512),
    new_tokens: int = typer.Option(40),
) -> None:
    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="mha2mla-reload-") as tmp:
        directory = open_store(settings.artifact_root, settings).get_dir(uri, Path(tmp) / "model", sha256=sha256)
        model, tokenizer = load_model(str(directory))
    ppl = perplexity(model, tokenizer, read_text(resolve_data(eval_text, DEFAULT_EVAL_TEXT)), window, max_tokens)
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    sample = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    report = {"model_class": type(model).__name__, "ppl": ppl.ppl, "kv_bytes_per_token": model.kv_bytes_per_token(),
              "prompt": PROMPT, "sample": sample}  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    typer.run(reload)
