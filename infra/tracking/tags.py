"""The tags the pipeline puts on MLflow runs and registered model versions, and quoting for MLflow's filters."""

from __future__ import annotations

KIND_TAG = "mha2mla.kind"  # "flow" | "stage"
STAGE_TAG = "mha2mla.stage"
OUTPUT_URI_TAG = "mha2mla.output_uri"
OUTPUT_SHA256_TAG = "mha2mla.output_sha256"
OUTPUT_KEY_TAG = "mha2mla.output_key"  # the output's key in its store: found again in a copy of the store
DATASET_SHA256_TAG = "mha2mla.sha256"  # MLflow keeps only 36 chars of a dataset digest
CODE_VERSION_TAG = "mha2mla.code_version"
CACHE_TAG = "mha2mla.cache"  # on a stage run: "hit" (served from the cache) or "miss" (ran, wrote its outputs)
CHECKPOINT_URI_TAG = "mha2mla.checkpoint_uri"  # on a registered model version: the artifact-store checkpoint
CHECKPOINT_SHA256_TAG = "mha2mla.checkpoint_sha256"
CHECKPOINT_TAGS = (CHECKPOINT_URI_TAG, CHECKPOINT_SHA256_TAG)
INTEGRITY_TAG = "mha2mla.integrity"  # on a registered version whose checkpoint was found corrupt
CANDIDATE, CHAMPION = "candidate", "champion"  # registry aliases: every new version, and the ones that pass the gate


def quoted(value: str) -> str:
    """`value` for a quoted string of an MLflow filter; ValueError where it holds a quote or backslash."""
    if "'" in value or "\\" in value:
        raise ValueError(f"{value!r} holds a quote or backslash; no run can match it")
    return value
