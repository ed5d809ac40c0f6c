"""Thin MLflow wrapper, the one package of the pipeline that imports mlflow: runs (runs.py: a parent run per flow,
a nested run per stage, what they log), the registry (registry.py, and the registered model's own code
mlflow_model.py), lineage lookups (lineage.py), and the tags they share (tags.py).

    configure(settings)
    with parent_run("smollm2-135m", params=config) as flow_id:
        with stage_run("svd-init", stage_config, parent_run_id=flow_id) as stage_id:
            log_dataset("calibration", calib_ref.sha256, calib_ref.uri)
            ...
            log_output(ckpt_ref, key)          # key: the output's key in the artifact store
        log_metrics(headline)                      # on the flow's run: what the runs table sorts by
        register_checkpoint(local_dir, ckpt_ref, "smollm2-135m-mla-...", description="...", champion=passed)

- MLflow's active run is per thread, so a stage running in a Prefect worker thread or another
  process passes `parent_run_id` explicitly; inside the `with`, fluent `mlflow.*` calls and the
  helpers below act on the stage run.
- Parent runs carry tag `mha2mla.kind=flow` plus the code and library versions (`run_tags`);
  stage runs carry `mha2mla.kind=stage` and `mha2mla.stage=NAME`.
- A stage records its primary output with `log_output(ref, key)` (tags `mha2mla.output_uri`,
  `mha2mla.output_sha256` and `mha2mla.output_key`); `lineage(uri)` finds that run (in a copied or moved store
  by its key, or its digest), then its flow and sibling stages.
- A sqlite store copied or moved with its `mlruns/` is re-pointed at the copy on `configure` (`_rehome`).
- A checkpoint is registered as an MLflow model: a pyfunc that generates (`infra/tracking/mlflow_model.py`, logged as
  code) with the Hugging Face folder as its artifact, a signature, a description, the tags
  `mha2mla.checkpoint_uri` / `mha2mla.checkpoint_sha256` and the alias `candidate` (`champion` when the
  flow's quality gate passed). `mlflow.pyfunc.load_model("models:/NAME@candidate")` loads it.
- Params are flattened (`{"mla": {"rank": 8}}` -> `mla.rank`) and secrets are dropped: SecretStr
  values, keys that name a secret, passwords inside URIs.
"""

from __future__ import annotations

from infra.tracking.lineage import (  # noqa: F401
    DatasetRecord,
    FlowRun,
    Lineage,
    RunRecord,
    lineage,
    recent_runs,
    stored_config,
    stored_params,
)
from infra.tracking.registry import (  # noqa: F401
    MODEL_CODE,
    MODEL_SIGNATURE,
    REPOINTED_TAG,
    SUPERSEDED_TAG,
    RegisteredCheckpoint,
    checkpoint_version,
    mark_registered,
    model_version_of,
    model_versions,
    register_checkpoint,
    registered_source,
    repoint,
    resolve_checkpoint,
    resolve_checkpoint_uri,
    settle_corrupt_versions,
)
from infra.tracking.runs import (  # noqa: F401
    LIBRARIES,
    check_store_exists,
    code_version,
    configure,
    flatten_params,
    log_dataset,
    log_file,
    log_json,
    log_metrics,
    log_output,
    log_params,
    log_table_markdown,
    log_text,
    parent_run,
    run_tags,
    set_tags,
    stage_run,
)
from infra.tracking.tags import (  # noqa: F401
    CACHE_TAG,
    CANDIDATE,
    CHAMPION,
    CHECKPOINT_SHA256_TAG,
    CHECKPOINT_TAGS,
    CHECKPOINT_URI_TAG,
    CODE_VERSION_TAG,
    DATASET_SHA256_TAG,
    INTEGRITY_TAG,
    KIND_TAG,
    OUTPUT_KEY_TAG,
    OUTPUT_SHA256_TAG,
    OUTPUT_URI_TAG,
    STAGE_TAG,
    quoted,
)
