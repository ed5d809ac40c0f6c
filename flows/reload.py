"""Reload a converted checkpoint in a fresh process and report on it (run by `mha2mla convert`).

    python -m flows.reload URI SHA256 EVALUATION_JSON

Downloads the checkpoint from the artifact store (every file's digest checked), loads it with
`from_pretrained` (through `load_model`), and prints one JSON line: the PPL of the evaluation text and the
KV-cache bytes per token measured on its own cache, both as the `evaluate` stage measures them (EvalParams),
and a greedy `generate()` sample.

`reload_command` builds the call from the parent's resolved settings: it runs in the parent's directory, with
the artifact root, tracking URI and Prefect home as absolute paths, so it opens the parent's store from wherever
the parent was started.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from infra.artifacts import ArtifactRef
from infra.settings import ENV_PREFIX, Settings, sqlite_path
from infra.stage import context
from mha2mla_core import load_model
from mha2mla_core.evaluation.inference import probe_kv_bytes_per_token
from mha2mla_core.evaluation.perplexity import perplexity
from tasks.evaluate import EvalParams
from tasks.inputs import DEFAULT_EVAL_TEXT, read_text, resolve_data

PROMPT = "The old house at the end of the lane had been empty for years, until"
NEW_TOKENS = 40
REPO = Path(__file__).resolve().parents[1]


def reload_command(checkpoint: ArtifactRef, evaluation: EvalParams, settings: Settings) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run this module in a fresh interpreter on the store and data of `settings`."""
    text = Path(evaluation.text).expanduser() if evaluation.text else None
    if text is not None and text.exists():  # a path relative to the parent's directory
        evaluation = evaluation.model_copy(update={"text": str(text.resolve())})
    argv = [sys.executable, "-m", __name__, checkpoint.uri, checkpoint.sha256, evaluation.model_dump_json()]
    env = {**os.environ, **absolute_settings(settings)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return argv, env


def absolute_settings(settings: Settings) -> dict[str, str]:
    """The `MHA2MLA_*` variables that name where runs live, with relative paths made absolute here."""
    root, tracking = settings.artifact_root, settings.tracking_uri
    return {
        f"{ENV_PREFIX}ARTIFACT_ROOT": root if root.startswith("s3://") else str(Path(root).resolve()),
        f"{ENV_PREFIX}TRACKING_URI": f"sqlite:///{sqlite_path(tracking).resolve()}" if tracking.startswith("sqlite:///") else tracking,
        f"{ENV_PREFIX}PREFECT_HOME": str(Path(settings.prefect_home).resolve()),
    }


def reload(uri: str, sha256: str, evaluation: EvalParams) -> dict:
    with tempfile.TemporaryDirectory(prefix="mha2mla-reload-") as tmp:
        directory = context().store.get_dir(uri, Path(tmp) / "model", sha256=sha256)
        model, tokenizer = load_model(str(directory))
    text = read_text(resolve_data(evaluation.text, DEFAULT_EVAL_TEXT))
    ppl = perplexity(model, tokenizer, text, window=evaluation.window, max_tokens=evaluation.max_tokens)
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return {
        "model_class": type(model).__name__,
        "ppl": ppl.ppl,
        "kv_bytes_per_token": probe_kv_bytes_per_token(model, evaluation.kv_probe_tokens),
        "prompt": PROMPT,
        "sample": tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True),
    }


if __name__ == "__main__":
    uri, sha256, evaluation = sys.argv[1:4]
    print(json.dumps(reload(uri, sha256, EvalParams.model_validate_json(evaluation))))
