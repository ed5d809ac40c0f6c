"""The training stages on a worker with MHA2MLA_GPUS=2 (here 2 gloo processes on the CPU): `finetune-data` samples its
data-free rows and `finetune` trains under torchrun, their metrics reach MLflow, and the GPU count is no part of the
result's identity (the same call in one process is a cache hit)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

pytest_plugins = ["pipeline_fixtures"]
pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_training_stages_on_two_processes_keep_their_cache_key(local_env, tiny_source, tiny_params, monkeypatch):
    from flows.convert import convert
    from infra.stage import context

    monkeypatch.setenv("MHA2MLA_GPUS", "2")
    monkeypatch.setenv("MHA2MLA_DEVICE", "cpu")
    context.cache_clear()
    base = tiny_params(tiny_source)
    params = type(base).model_validate({
        **base.model_dump(mode="json"),
        "finetune": {"synthetic_fraction": 1, "reconstruct": None,
                     "train": {"max_tokens": 512, "seq_len": 64, "micro_batch_size": 4, "bf16": False, "log_every": 1}},
    })  # fmt: skip
    outcome = convert(params)
    assert outcome.cache["finetune-data"] == outcome.cache["finetune"] == "miss"
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`mlflow.parentRunId` = '{outcome.run_id}'")  # fmt: skip
    stages = {run.info.run_name: run for run in runs}
    assert stages["finetune"].data.params["gpus"] == stages["finetune-data"].data.params["gpus"] == "2"
    assert len(client.get_metric_history(stages["finetune"].info.run_id, "loss")) == 2  # each step, from rank 0
    assert stages["finetune-data"].data.metrics["sampled_rows"] == 8

    monkeypatch.setenv("MHA2MLA_GPUS", "1")
    context.cache_clear()
    again = convert(params)
    assert again.cache["finetune-data"] == again.cache["finetune"] == "hit"
