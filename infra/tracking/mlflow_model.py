"""The MLflow model of a registered checkpoint: a pyfunc that generates text (logged as code, see
`infra.tracking.registry.register_checkpoint`).

    model = mlflow.pyfunc.load_model("models:/smollm2-135m-mla-r8-k16@candidate")
    model.predict(pd.DataFrame({"prompt": ["The capital of France is"]}), params={"max_new_tokens": 16})

The checkpoint sits in the model's artifacts as a self-contained Hugging Face folder (weights, tokenizer, the
modeling code with `auto_map`, README.md card, recipe.yaml), so this file needs torch, transformers and mlflow only:
`mlflow.artifacts.download_artifacts("models:/NAME/VERSION")` + `artifacts/checkpoint` is also what
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` loads.

A checkpoint larger than the registry's copy limit is registered by reference instead: `artifacts/checkpoint` then
holds the card, the recipe and `checkpoint.json`, the checkpoint's artifact URI (file:// or s3://) and digest, and
loading reads the weights from the artifact store (s3 through MLflow's own client: `MLFLOW_S3_ENDPOINT_URL` for
MinIO), after checking that the stored checkpoint's manifest still hashes to that digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

CHECKPOINT = "checkpoint"  # the artifact holding the Hugging Face folder
REFERENCE = "checkpoint.json"  # in a checkpoint registered by reference: {"uri": ..., "sha256": ...}
MANIFEST = "_manifest.json"  # the artifact store's list of a stored folder's files; its sha256 is the folder's digest
DEFAULTS = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0}  # temperature 0 = greedy


def checkpoint_folder(artifact: str) -> str:
    """The Hugging Face folder of the `checkpoint` artifact: the artifact itself, or for a checkpoint registered by
    reference, the stored folder it names (a local path for file://, else downloaded), its manifest checked."""
    pointer = Path(artifact) / REFERENCE
    if not pointer.is_file():
        return artifact
    ref = json.loads(pointer.read_text())
    uri = ref["uri"]
    if urlsplit(uri).scheme == "file":
        folder = unquote(urlsplit(uri).path)
    else:
        folder = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"the registered checkpoint {uri} is gone from the artifact store (no {MANIFEST})")
    if hashlib.sha256(manifest.read_bytes()).hexdigest() != ref["sha256"]:
        raise ValueError(f"the registered checkpoint {uri} changed since it was registered: its manifest no longer "
                         f"hashes to {ref['sha256']}; register the checkpoint again")  # fmt: skip
    return folder


class MLACheckpoint(PythonModel):
    """Prompts (column `prompt`) in, continuations (column `text`) out; batched with left padding."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = checkpoint_folder(context.artifacts[CHECKPOINT])
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        options = {**DEFAULTS, **(params or {})}
        sampled = options["temperature"] > 0
        sampling = {"do_sample": True, "temperature": options["temperature"], "top_p": options["top_p"]} if sampled else {}
        batch = self.tokenizer(list(model_input["prompt"]), return_tensors="pt", padding=True)
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=int(options["max_new_tokens"]), do_sample=sampled,
                                      pad_token_id=self.tokenizer.pad_token_id, **sampling)  # fmt: skip
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return pd.DataFrame({"text": texts})


mlflow.models.set_model(MLACheckpoint())
