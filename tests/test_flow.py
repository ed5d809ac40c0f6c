"""The convert and catalog flows on a tiny seeded Llama: tracking, caching, retries, faults, resumption.

Prefect runs on one test server for the session, MLflow on sqlite in a temp dir, artifacts in a temp dir or
on moto's S3 server over HTTP (fixtures in pipeline_fixtures.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from infra.artifacts import DigestMismatchError, StoreCheckError
from infra.tracking import lineage
from pipeline_fixtures import write_tiny_catalog

pytest_plugins = ["pipeline_fixtures"]
pytestmark = [pytest.mark.services, pytest.mark.slow]

STAGES = ("sample-calibration", "score-rope", "svd-init", "evaluate[original]", "evaluate[mla]")


def run_convert(params):
    from flows.convert import convert

    return convert(params)


def stage_runs(parent_run_id: str) -> dict[str, object]:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {run.info.run_name: run for run in runs if run.info.status == "FINISHED"}


def flow_runs() -> list:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`mha2mla.flow` = 'convert'")


def stage_output(parent_run_id: str, stage: str) -> tuple[str, str]:
    tags = stage_runs(parent_run_id)[stage].data.tags
    return tags["mha2mla.output_uri"], tags["mha2mla.output_sha256"]


def test_convert_on_s3_tracks_everything_and_reruns_from_cache(s3_env, s3_admin, tiny_source, executions, tiny_params):
    from tasks.inputs import resolve_model

    outcome = run_convert(tiny_params(tiny_source))
    assert outcome.cache == dict.fromkeys(STAGES, "miss")
    assert dict(executions) == {"sample-calibration": 1, "score-rope": 1, "svd-init": 1, "evaluate": 2}

    client = MlflowClient()
    parent = client.get_run(outcome.run_id)
    assert parent.data.params["mla.kv_rank"] == "4" and parent.data.params["calibration.seed"] == "0"
    stored = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/config.json")
    assert stored["params"]["calibration"]["num_tokens"] == 512 and stored["sources"]["model"]["digest"]
    model_digest = resolve_model(str(tiny_source)).digest
    assert parent.data.tags["mha2mla.model_digest"] == model_digest
    assert parent.data.tags["mha2mla.code_version"] and parent.data.tags["mha2mla.version.torch"]
    assert {"config.json", "eval_table.md", "eval_table.json"} <= {a.path for a in client.list_artifacts(outcome.run_id)}
    runs = stage_runs(outcome.run_id)
    assert set(runs) == set(STAGES)
    assert [a.path for a in client.list_artifacts(runs["score-rope"].info.run_id)] == ["rope_scores.png"]
    assert [a.path for a in client.list_artifacts(runs["svd-init"].info.run_id)] == ["svd_spectrum.png"]
    assert runs["svd-init"].data.params["svd"] == "output-aware"
    calibration = runs["sample-calibration"].inputs.dataset_inputs[0]
    assert calibration.dataset.name == "calibration"

    # every stored object hashes to the digest its stage recorded
    bucket = s3_env.artifact_root.removeprefix("s3://").split("/")[0]
    for stage in STAGES:
        uri, sha = stage_output(outcome.run_id, stage)
        key = uri.removeprefix(f"s3://{bucket}/")
        if stage == "svd-init":
            key += "/_manifest.json"
        body = s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha, stage
    manifest = json.loads(s3_admin.get_object(Bucket=bucket, Key=f"{outcome.checkpoint.uri.removeprefix(f's3://{bucket}/')}/_manifest.json")["Body"].read())
    for rel, entry in manifest["files"].items():
        key = f"{outcome.checkpoint.uri.removeprefix(f's3://{bucket}/')}/{rel}"
        assert hashlib.sha256(s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest() == entry["sha256"]

    secret = os.environ["MHA2MLA_AWS_SECRET_ACCESS_KEY"]
    for run in [parent, *runs.values()]:  # no secret in any param, tag or logged config
        logged = json.dumps([run.data.params, run.data.tags, mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/config.json")])
        assert secret not in logged

    [version] = client.search_model_versions(f"name = '{outcome.model_version.split('/')[0]}'")
    assert version.tags["mha2mla.checkpoint_uri"] == outcome.checkpoint.uri
    assert client.get_model_version(version.name, version.version).aliases == ["candidate"]
    assert parent.data.metrics["kv_saving_pct"] > 0 and parent.data.metrics["ppl"] == outcome.table["rows"][0]["values"]["mla"]

    found = lineage(outcome.checkpoint.uri)
    assert found.flow.run.tags["mha2mla.model_digest"] == model_digest
    assert found.flow.run.params["mla.rope_dims"] == "4"
    datasets = [d for stage in found.flow.stages for d in stage.datasets]
    assert [d.name for d in datasets] == ["calibration"] and len(datasets[0].sha256) == 64

    executions.clear()
    again = run_convert(tiny_params(tiny_source))
    assert again.cache == dict.fromkeys(STAGES, "hit") and not executions
    assert again.checkpoint == outcome.checkpoint and again.table == outcome.table
    assert set(stage_runs(again.run_id)) == set(STAGES)  # cached stages are still recorded per flow run


def test_data_free_calibration_is_the_models_own_continuations(local_env, tiny_source, tiny_params):
    from safetensors.torch import load

    from infra.stage import context

    base = tiny_params(tiny_source)
    plain = run_convert(base)
    data_free = run_convert(base.model_copy(update={"calibration": base.calibration.model_copy(
        update={"model_samples": True})}))  # fmt: skip
    assert data_free.cache["sample-calibration"] == "miss" and data_free.cache["svd-init"] == "miss"
    calib_run = stage_runs(data_free.run_id)["sample-calibration"]
    assert calib_run.data.params["model_samples"] == "True"

    def ids(outcome) -> torch.Tensor:
        tags = stage_runs(outcome.run_id)["sample-calibration"].data.tags
        data = context().store.get_bytes(tags["mha2mla.output_uri"], sha256=tags["mha2mla.output_sha256"])
        return load(data)["input_ids"].view(-1, 64)  # (windows, calib_seq_len)

    a, b = ids(plain), ids(data_free)
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.equal(a[:, 4:], b[:, 4:])  # same prompts, sampled rest


def test_default_rotated_rope_runs_without_score_rope_and_reruns_from_cache(local_env, tiny_source, executions, tiny_params):
    """The default MLAConfig (rotated RoPE) ranks nothing across layers, so the flow skips the score-rope stage."""
    params = tiny_params(tiny_source, rope_strategy=None)
    assert params.mla.rope_strategy == "rotated"
    stages = tuple(stage for stage in STAGES if stage != "score-rope")
    outcome = run_convert(params)
    assert outcome.cache == dict.fromkeys(stages, "miss")
    assert dict(executions) == {"sample-calibration": 1, "svd-init": 1, "evaluate": 2}
    peaks = {name: run.data.metrics["memory.peak_rss_gib"] for name, run in stage_runs(outcome.run_id).items()}
    assert set(peaks) == set(stages) and min(peaks.values()) > 0.1  # the process's host memory while each ran
    executions.clear()
    assert run_convert(params).cache == dict.fromkeys(stages, "hit")
    assert not executions


def test_a_checkpoint_over_the_copy_limit_is_registered_by_reference(local_env, tiny_source, tiny_params, monkeypatch):
    """A registered model holds a copy of its checkpoint up to MHA2MLA_REGISTRY_COPY_MAX_GIB; past it (here 0 GiB)
    it names the stored checkpoint, and loading the model reads the weights from the artifact store."""
    from infra.stage import context

    monkeypatch.setenv("MHA2MLA_REGISTRY_COPY_MAX_GIB", "0")
    context.cache_clear()  # settings are read once per process
    outcome = run_convert(tiny_params(tiny_source))
    uri = f"models:/{outcome.model_version}"
    folder = Path(mlflow.artifacts.download_artifacts(uri)) / "artifacts" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "checkpoint.json", "recipe.yaml"]
    assert json.loads((folder / "checkpoint.json").read_text()) == {"uri": outcome.checkpoint.uri, "sha256": outcome.checkpoint.sha256}
    texts = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": ["the mill"]}), params={"max_new_tokens": 3})["text"]
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_config_change_reruns_that_stage_and_downstream_only(local_env, tiny_source, executions, tiny_params):
    run_convert(tiny_params(tiny_source))
    executions.clear()
    outcome = run_convert(tiny_params(tiny_source, kv_rank=2))
    assert outcome.cache == {"sample-calibration": "hit", "score-rope": "hit", "svd-init": "miss",
                             "evaluate[original]": "hit", "evaluate[mla]": "miss"}  # fmt: skip
    assert dict(executions) == {"svd-init": 1, "evaluate": 1}


def test_eval_suites_rerun_only_evaluate_and_fill_the_table(local_env, tiny_source, executions, tiny_params, tmp_path):
    """MC (a 10-item local task), needle and speed on the tiny model, switched on after a plain run."""
    from eval_tiny import HAYSTACK, write_arc_items
    from mha2mla_core.evaluation import EvalResult
    from infra.stage import context

    write_arc_items(tmp_path)
    (tmp_path / "hay.txt").write_text(HAYSTACK * 8)
    base = tiny_params(tiny_source)
    run_convert(base)
    executions.clear()
    evaluation = {**base.evaluation.model_dump(), "mc_tasks": ["arc_easy"], "mc_data_dir": str(tmp_path),
                  "needle": {"lengths": [64, 96], "depths": [0.0, 1.0], "haystack": str(tmp_path / "hay.txt")},
                  "speed": {"contexts": [16, 32], "batch_sizes": [1, 2], "decode_steps": 2}}  # fmt: skip
    with_suites = base.model_copy(update={"evaluation": type(base.evaluation)(**evaluation)})
    outcome = run_convert(with_suites)
    assert outcome.cache == {**dict.fromkeys(STAGES[:3], "hit"), "evaluate[original]": "miss", "evaluate[mla]": "miss"}
    assert dict(executions) == {"evaluate": 2}

    runs = stage_runs(outcome.run_id)
    for label in ("original", "mla"):
        metrics = runs[f"evaluate[{label}]"].data.metrics
        assert metrics["mc.arc_easy.samples"] == 10 and 0 <= metrics["mc.arc_easy.acc"] <= 100
        assert 0 < metrics["mc.arc_easy.acc_stderr"] < 100 and 0 <= metrics["needle.acc.len96"] <= 100
        assert metrics["speed.b2_t32.prefill_tok_s"] > 0 and metrics["speed.b2_t32.decode_tok_s"] > 0
        assert metrics["ppl"] > 1 and metrics["kv_bytes_per_token"] > 0
        artifacts = [a.path for a in MlflowClient().list_artifacts(runs[f"evaluate[{label}]"].info.run_id)]
        assert artifacts == [f"needle_{label}.png"]
        uri, sha = stage_output(outcome.run_id, f"evaluate[{label}]")
        result = EvalResult.from_json(context().store.get_bytes(uri, sha256=sha).decode())
        assert len(result.needle.trials) == 2 * 2 and len(result.inference) == 4 and result.name == label
        assert result.device.split(":")[0] == ("cuda" if torch.cuda.is_available() else "cpu")  # the worker's device

    rows = {row["key"]: row for row in outcome.table["rows"]}
    acc = rows["mc.arc_easy.acc"]
    assert acc["deltas"]["mla"] == pytest.approx(acc["values"]["mla"] - acc["values"]["original"])
    kv = rows["kv_bytes_per_token"]
    assert kv["deltas"]["mla"] == pytest.approx(100 * (kv["values"]["mla"] / kv["values"]["original"] - 1))
    assert kv["deltas"]["mla"] < 0

    executions.clear()
    (tmp_path / "hay.txt").write_text(HAYSTACK * 9)  # same path, new content: the evaluate stages rerun
    assert run_convert(with_suites).cache == outcome.cache and dict(executions) == {"evaluate": 2}
    assert {"needle.acc", "speed.b1_t16.decode_tok_s", "speed.b2_t32.peak_mib"} <= set(rows)
    parent = {a.path for a in MlflowClient().list_artifacts(outcome.run_id)}
    assert {"eval_table.md", "eval_table.json", "kv_cache.png", "decode_speed.png"} <= parent
    markdown = mlflow.artifacts.load_text(f"{MlflowClient().get_run(outcome.run_id).info.artifact_uri}/eval_table.md")
    assert "| arc_easy acc |" in markdown and "| needle acc @ 96 tokens |" in markdown


def test_finetune_and_quantize_kv_stages(local_env, tiny_source, tmp_path, tiny_params):
    from mha2mla_core import load_model
    from infra.stage import context

    train = tmp_path / "train.txt"
    train.write_text("the river ran past the old mill and the children watched the boats go by . " * 200)
    base = tiny_params(tiny_source)
    params = type(base).model_validate({
        **base.model_dump(mode="json"),
        "finetune": {"data": str(train), "synthetic_fraction": 0.25, "reconstruct": {"steps": 30, "bf16": False},
                     "reconstruct_tokens": 100,
                     "train": {"max_tokens": 2048, "seq_len": 64, "micro_batch_size": 4, "bf16": False, "lr": 1e-3,
                               "log_every": 2}},
        "quantize_kv": {"nbits": 4, "group_size": 16, "residual_length": 16},
    })  # fmt: skip
    outcome = run_convert(params)
    assert outcome.table["models"] == ["original", "mla", "finetuned", "int4"]
    assert outcome.cache["finetune-data"] == outcome.cache["reconstruct"] == outcome.cache["finetune"] == "miss"
    assert outcome.cache["quantize-kv"] == "miss"
    kv = next(row for row in outcome.table["rows"] if row["key"] == "kv_bytes_per_token")["values"]
    assert kv["int4"] < kv["mla"] / 2
    runs = stage_runs(outcome.run_id)
    finetune_run, data_run = runs["finetune"], runs["finetune-data"]
    assert len(MlflowClient().get_metric_history(finetune_run.info.run_id, "loss")) >= 2
    recon = runs["reconstruct"].data.metrics  # block-wise reconstruction ran first, on the first rows
    assert recon["rel_mse_after"] < recon["rel_mse_before"] and recon["tokens"] == 64 * 2  # 2 rows of 64 >= 100
    assert [d.dataset.name for d in finetune_run.inputs.dataset_inputs] == ["finetune"]  # the rows it trained on
    assert [d.dataset.name for d in data_run.inputs.dataset_inputs] == ["finetune-text"]
    assert data_run.data.params["synthetic_fraction"] == "0.25"
    assert data_run.data.metrics["sampled_rows"] == 8  # of the 32 rows, sampled from the original
    assert data_run.data.params["device"] == finetune_run.data.params["device"]
    assert finetune_run.data.params["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # MHA2MLA_DEVICE=auto
    # another learning rate re-trains on the cached rows: nothing is sampled again
    retrained = params.model_copy(update={"finetune": params.finetune.model_copy(
        update={"train": dataclasses.replace(params.finetune.train, lr=5e-4)})})  # fmt: skip
    again = run_convert(retrained)
    assert again.cache["finetune-data"] == again.cache["reconstruct"] == "hit" and again.cache["finetune"] == "miss"
    final, _ = load_model(str(context().store.get_dir(outcome.checkpoint.uri, tmp_path / "final", outcome.checkpoint.sha256)))
    assert final.config.kv_cache_quant["nbits"] == 4


def test_data_free_finetune_needs_no_text(local_env, tiny_source, tiny_params):
    base = tiny_params(tiny_source)
    params = type(base).model_validate({
        **base.model_dump(mode="json"),
        "finetune": {"synthetic_fraction": 1, "reconstruct": None,
                     "train": {"max_tokens": 512, "seq_len": 64, "micro_batch_size": 4, "bf16": False}},
    })  # fmt: skip
    outcome = run_convert(params)
    assert outcome.table["models"] == ["original", "mla", "finetuned"]
    assert "reconstruct" not in outcome.cache  # switched off: svd-init's checkpoint goes straight to finetune
    data_run = stage_runs(outcome.run_id)["finetune-data"]
    assert data_run.data.metrics["sampled_rows"] == data_run.data.metrics["rows"] == 8  # every row sampled
    assert "calibration_books" in data_run.data.params["source"]  # the prompts' source: the packaged books


def test_a_conversion_without_fine_tuning_is_reconstructed_on_its_calibration(local_env, tiny_source, tiny_params):
    base = tiny_params(tiny_source)
    params = type(base).model_validate({**base.model_dump(mode="json"),
                                        "reconstruct": {"steps": 20, "micro_batch_size": 2, "bf16": False, "lr": 1e-4}})  # fmt: skip
    outcome = run_convert(params)
    assert outcome.table["models"] == ["original", "mla", "reconstructed"]
    assert "finetune-data" not in outcome.cache and outcome.cache["reconstruct"] == "miss"
    ppl = next(row for row in outcome.table["rows"] if row["key"] == "ppl")["values"]
    assert ppl["reconstructed"] < ppl["mla"]  # fitted to the original's attention outputs
    recon = stage_runs(outcome.run_id)["reconstruct"]
    assert recon.data.metrics["rel_mse_after"] < recon.data.metrics["rel_mse_before"]
    assert recon.data.metrics["tokens"] == params.calibration.num_tokens  # every calibration window
    assert [d.dataset.name for d in recon.inputs.dataset_inputs] == ["calibration"]
    with pytest.raises(ValueError, match="with fine-tuning set finetune.reconstruct"):
        type(base).model_validate({**params.model_dump(mode="json"), "finetune": {"synthetic_fraction": 1}})


def test_a_bf16_sources_checkpoints_are_written_in_bf16(local_env, tiny_source, tiny_params, tmp_path):
    """svd-init writes a 16-bit source's checkpoint in its dtype (half the bytes of fp32), and the stage after it
    keeps the dtype it was given; the fp32 tiny source's checkpoints stay fp32."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_source, dtype=torch.bfloat16).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_source).save_pretrained(source)
    base = tiny_params(source, name="tiny-bf16")
    params = type(base).model_validate({**base.model_dump(mode="json"), "reconstruct": {"steps": 2, "bf16": False}})
    outcome = run_convert(params)

    def stored_dtypes(uri: str) -> set[str]:  # of the floating-point tensors (the MLA layers also store int indices)
        folder = Path(unquote(urlsplit(uri).path))
        with safe_open(folder / "model.safetensors", "pt") as weights:
            dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
        return {dtype for dtype in dtypes if dtype.startswith(("F", "BF"))}

    assert stored_dtypes(stage_output(outcome.run_id, "svd-init")[0]) == {"BF16"}
    assert stored_dtypes(outcome.checkpoint.uri) == {"BF16"}  # the reconstructed checkpoint
    fp32 = run_convert(tiny_params(tiny_source))
    assert stored_dtypes(fp32.checkpoint.uri) == {"F32"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_training_on_a_missing_device_fails_before_any_stage(local_env, tiny_source, executions, tiny_params, monkeypatch):
    from infra.stage import context

    monkeypatch.setenv("MHA2MLA_DEVICE", "cuda")
    context.cache_clear()
    base = tiny_params(tiny_source)
    params = type(base).model_validate({**base.model_dump(mode="json"), "finetune": {"data": str(tiny_source)}})
    with pytest.raises(ValueError, match="MHA2MLA_DEVICE='cuda' but this worker has no CUDA device; set it to auto"):
        run_convert(params)
    assert not executions


def test_transient_fault_is_retried(local_env, tiny_source, executions, tiny_params):
    executions.fail("svd-init", ConnectionResetError("connection reset by peer"))
    outcome = run_convert(tiny_params(tiny_source))
    assert executions["svd-init"] == 2 and outcome.cache["svd-init"] == "miss"


def test_permanent_failure_keeps_earlier_stages_and_rerun_starts_at_it(local_env, tiny_source, executions, tiny_params):
    from infra.stage import context

    executions.fail("score-rope", ValueError("bad input, no retry"))
    with pytest.raises(ValueError, match="bad input"):
        run_convert(tiny_params(tiny_source))
    assert dict(executions) == {"sample-calibration": 1, "score-rope": 1}  # not retried
    executions.clear()
    outcome = run_convert(tiny_params(tiny_source))
    assert outcome.cache["sample-calibration"] == "hit" and executions["sample-calibration"] == 0
    assert dict(executions) == {"score-rope": 1, "svd-init": 1, "evaluate": 2}
    assert context().store.verify(outcome.checkpoint)


def _fail_s3_requests(client, operation: str, count: int) -> list[str]:
    """Answer the next `count` `operation` requests with HTTP 500 without sending them."""
    from botocore.awsrequest import AWSResponse

    class Body:
        def stream(self, **_):
            yield b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"

    failed: list[str] = []

    def inject(request, **_):
        if len(failed) < count:
            failed.append(request.url)
            return AWSResponse(request.url, 500, {}, Body())
        return None

    client.meta.events.register(f"before-send.s3.{operation}", inject)
    return failed


def test_s3_server_errors_are_retried_with_nothing_lost(s3_env, tiny_source, executions, tiny_params):
    from infra.stage import context

    store = context().store
    # 4 failures outlast botocore's 3 attempts once: one request fails for good, the stage's retry recovers
    puts, gets = _fail_s3_requests(store.client, "PutObject", 4), _fail_s3_requests(store.client, "GetObject", 2)
    outcome = run_convert(tiny_params(tiny_source))
    assert len(puts) == 4 and len(gets) == 2 and executions["sample-calibration"] == 2
    assert store.verify(outcome.checkpoint)
    for stage in STAGES:
        uri, sha = stage_output(outcome.run_id, stage)
        if stage != "svd-init":
            store.get_bytes(uri, sha256=sha)


def test_corrupted_artifact_is_a_cache_miss(local_env, tiny_source, executions, tiny_params):
    from infra.stage import context

    first = run_convert(tiny_params(tiny_source))
    calib_uri, calib_sha = stage_output(first.run_id, "sample-calibration")
    path = Path(calib_uri.removeprefix("file://"))
    path.write_bytes(path.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(DigestMismatchError, match="digest mismatch"):
        context().store.get_bytes(calib_uri, sha256=calib_sha)
    (Path(first.checkpoint.uri.removeprefix("file://")) / "model.safetensors").unlink()

    executions.clear()
    second = run_convert(tiny_params(tiny_source))
    assert second.cache["sample-calibration"] == "miss" and second.cache["svd-init"] == "miss"
    assert executions["sample-calibration"] == 1 and executions["svd-init"] == 1
    assert context().store.verify(second.checkpoint)
    executions.clear()
    assert set(run_convert(tiny_params(tiny_source)).cache.values()) == {"hit"} and not executions


KILLED_FLOW = """
import sys, time
from pathlib import Path
import tasks.svd_init as stage
from pipeline_fixtures import make_tiny_params

def hang(*args, **kwargs):
    Path(sys.argv[2]).touch()
    time.sleep(600)

stage.convert_to_mla_with_report = hang
from flows.convert import convert
convert(make_tiny_params(sys.argv[1]))
"""


def test_killed_flow_is_resumed(local_env, prefect_api, tiny_source, tmp_path, executions):
    from typer.testing import CliRunner

    from flows.cli import app

    script, marker = tmp_path / "killed.py", tmp_path / "svd-init-started"
    script.write_text(textwrap.dedent(KILLED_FLOW))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.getcwd()])}
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_source), str(marker)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the flow ended before svd-init started"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    [killed] = flow_runs()
    assert killed.info.status == "RUNNING"  # SIGKILL left no chance to close it
    result = CliRunner().invoke(app, ["resume", killed.info.run_id])
    assert result.exit_code == 0, result.output
    assert dict(executions) == {"svd-init": 1, "evaluate": 2}  # calibration and scores came from the cache
    assert "3 ran, 2 cached" in result.output


def test_bad_input_fails_before_any_stage(local_env, tiny_source, executions, free_port, s3_admin, s3_endpoint, monkeypatch, tiny_params):
    from infra.stage import context

    with pytest.raises(ValueError, match="unknown model 'no-such-org/no-such-model'"):
        run_convert(tiny_params("no-such-org/no-such-model"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        run_convert(tiny_params(tiny_source / "missing"))
    with pytest.raises(ValueError, match="kv_rank"):
        tiny_params(tiny_source, kv_rank=0)
    monkeypatch.setenv("MHA2MLA_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port}")
    monkeypatch.setenv("MHA2MLA_ARTIFACT_ROOT", "s3://mha2mla/artifacts")
    monkeypatch.setenv("MHA2MLA_AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("MHA2MLA_AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("MHA2MLA_S3_MAX_ATTEMPTS", "1")
    context.cache_clear()
    with pytest.raises(StoreCheckError, match="unreachable"):
        run_convert(tiny_params(tiny_source))
    monkeypatch.setenv("MHA2MLA_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("MHA2MLA_ARTIFACT_ROOT", "s3://no-such-bucket/artifacts")
    context.cache_clear()
    with pytest.raises(StoreCheckError, match="does not exist"):
        run_convert(tiny_params(tiny_source))
    assert not executions


def test_catalog_runs_every_entry_and_survives_a_failure(local_env, tiny_source, tmp_path, executions):
    from flows.catalog import catalog

    file = write_tiny_catalog(tmp_path / "tiny.yaml", tiny_source, """
        {name: k4, mla: {kv_rank: 4}, evaluation: {speed: {contexts: [16], batch_sizes: [1]}}}
        {name: k60, mla: {kv_rank: 60, svd: joint}}
    """)  # k60 > 2*16-4 = 28 rows per KV head: fails in svd-init
    outcome = catalog(str(file))
    rows = {row["entry"].rsplit("-", 1)[1]: row for row in outcome.rows}
    assert outcome.failed == 1 and rows["k4"]["status"] == "ok" and rows["k60"]["status"] == "failed"
    assert "kv_rank=60" in rows["k60"]["error"]
    assert any(label.startswith("decode tok/s") and "%)" in cell for label, cell in rows["k4"]["suites"].items())
    artifacts = {a.path for a in MlflowClient().list_artifacts(outcome.run_id)}
    assert {"catalog_summary.md", "catalog.json"} <= artifacts


def test_catalog_export_section_reaches_the_convert_params(tmp_path):
    from flows.catalog import load_catalog
    from tasks.export import ExportParams

    file = tmp_path / "export.yaml"
    entry = "        mla: {kv_rank: 64}\n        export: {target: llamacpp, kv_block: 32}\n"
    file.write_text(f"models:\n  - model: smollm2-135m\n    configs:\n      - name: a\n{entry}      - name: b\n")
    a, b = load_catalog(file)[1]
    assert a.export == ExportParams(target="llamacpp", kv_block=32) and b.export is None
    file.write_text("models:\n  - model: smollm2-135m\n    configs:\n      - name: a\n        export: {kv_blok: 32}\n")
    with pytest.raises(ValueError, match=r"(?s)models\.0\.configs\.0 \('a'\).*kv_blok"):
        load_catalog(file)


def test_catalog_typo_is_a_clear_error(tmp_path):
    from flows.catalog import load_catalog

    file = tmp_path / "typo.yaml"
    file.write_text("models:\n  - model: smollm2-135m\n    configs:\n      - name: a\n        mla: {kv_rnak: 8}\n")
    with pytest.raises(ValueError, match=r"(?s)models\.0\.configs\.0 \('a'\).*kv_rnak"):
        load_catalog(file)
    file.write_text("max_concurency: 2\nmodels: []\n")
    with pytest.raises(ValueError, match="max_concurency"):
        load_catalog(file)


def test_deployments_match_prefect_yaml_and_apply_to_a_work_pool(prefect_api):
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import CATALOG_CRON, WORK_POOL, deployments

    spec = yaml.safe_load(Path("prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["catalog-nightly"]["schedules"][0]["cron"] == CATALOG_CRON
    assert {d["work_pool"]["name"] for d in by_name.values()} == {WORK_POOL}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"), overwrite=True)
        for deployment in deployments():
            assert deployment.name in by_name
            deployment.apply(work_pool_name=WORK_POOL)
        stored = client.read_deployment_by_name("catalog/catalog-nightly")
    assert stored.work_pool_name == WORK_POOL and stored.schedules[0].schedule.cron == CATALOG_CRON
    assert stored.parameters == {"file": "catalog.example.yaml"}
