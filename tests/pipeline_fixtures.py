"""Fixtures of the pipeline tests (a pytest plugin, shared by test_flow*.py and test_cli.py).

One Prefect test server for the session (it takes seconds to start); per test, a fresh artifact root (a temp
directory, or a new bucket on the moto S3 server) and a fresh MLflow sqlite database, handed to the pipeline
through `MHA2MLA_*` environment variables exactly as a user would. `executions` counts the core calls each
stage makes, so a cache hit is an absence of calls.
"""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from eval_tiny import tiny_lm, tiny_tokenizer

S3_SECRET = "s3cr3t-that-must-never-be-logged"
# 2-norm, so that the flow runs every stage (score-rope too); the default (rotated) has a test of its own
TINY_MLA = {"rope_strategy": "2-norm", "rope_dims": 4, "kv_rank": 4, "calib_seq_len": 64}
# stage -> (task module, name of the core function it calls)
CORE_CALLS = {
    "sample-calibration": ("tasks.sample_calibration", "sample_ids"),
    "score-rope": ("tasks.score_rope", "score_pairs"),
    "svd-init": ("tasks.svd_init", "convert_to_mla_with_report"),
    "evaluate": ("tasks.evaluate", "evaluate_model"),
}


@pytest.fixture(scope="session")
def prefect_api():
    """The session's Prefect API URL (a temporary server and database)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """A tiny seeded Llama (2 layers, hidden 64) with its word-level tokenizer, saved as a HF directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tiny_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_params(model, name=None, **mla):
    """`convert` parameters sized for the tiny model: 512 calibration tokens, 256 scored, 64-token windows."""
    from flows.convert import ConvertParams

    return ConvertParams(
        model=str(model), name=name, mla={**TINY_MLA, **mla},
        calibration={"num_tokens": 512}, evaluation={"max_tokens": 256, "window": 64},
    )  # fmt: skip


@pytest.fixture
def tiny_params():
    return make_tiny_params


def write_tiny_catalog(path, model, configs: str):
    """A catalog of `model` with two entries at a time and the tiny model's sizes; `configs` is the YAML list of
    its entries (one flow-style mapping a line). Returns `path`."""
    entries = "\n".join(f"      - {line.strip()}" for line in configs.strip().splitlines())
    path.write_text(
        "max_concurrency: 2\n"
        "defaults:\n"
        f"  mla: {{rope_strategy: {TINY_MLA['rope_strategy']}, rope_dims: 4, calib_seq_len: 64}}\n"
        "  calibration: {num_tokens: 512}\n"
        "  evaluation: {max_tokens: 256, window: 64}\n"
        f"models:\n  - model: {model}\n    configs:\n{entries}\n"
    )
    return path


def _reset_process_state(reopen: bool = True):
    """Forget the process's store, MLflow target and loaded models; reopen them from the environment."""
    from infra import stage as common

    common.context.cache_clear()
    if reopen:
        common.context()


@pytest.fixture
def local_env(prefect_api, mlflow_db_template, tmp_path, monkeypatch):
    """Artifacts in tmp_path/artifacts, MLflow in tmp_path/mlflow.db; returns the artifact root."""
    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("MHA2MLA_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MHA2MLA_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MHA2MLA_PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("MHA2MLA_RECIPE", "none")  # conversions recover only where a test asks (cpu: reconstruction)
    for name, value in {"PREFECT_HOME": tmp_path / "prefect", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
        monkeypatch.setenv(name, str(value))  # what the CLI would set, undone after the test
    _reset_process_state()
    yield tmp_path / "artifacts"
    _reset_process_state(reopen=False)



@pytest.fixture
def s3_env(local_env, s3_settings, monkeypatch):
    """As local_env, with the artifact root in a new bucket of the moto S3 server (HTTP, 127.0.0.1)."""
    monkeypatch.setenv("MHA2MLA_ARTIFACT_ROOT", s3_settings.artifact_root)
    monkeypatch.setenv("MHA2MLA_S3_ENDPOINT_URL", s3_settings.s3_endpoint_url)
    monkeypatch.setenv("MHA2MLA_S3_REGION", "us-east-1")
    monkeypatch.setenv("MHA2MLA_AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("MHA2MLA_AWS_SECRET_ACCESS_KEY", S3_SECRET)  # moto accepts any secret
    _reset_process_state()
    return s3_settings


class Executions(Counter):
    """Core calls per stage; `fail(stage, exc, times)` makes that stage's next calls raise `exc`."""

    def __init__(self):
        super().__init__()
        self.failures: dict[str, list[BaseException]] = {}

    def fail(self, stage: str, exc: BaseException, times: int = 1) -> None:
        self.failures.setdefault(stage, []).extend([exc] * times)

    def wrap(self, stage: str, fn):
        def counted(*args, **kwargs):
            self[stage] += 1
            if self.failures.get(stage):
                raise self.failures[stage].pop(0)
            return fn(*args, **kwargs)

        return counted


@pytest.fixture
def executions(monkeypatch) -> Executions:
    import importlib

    counts = Executions()
    for stage, (module, name) in CORE_CALLS.items():
        mod = importlib.import_module(module)
        monkeypatch.setattr(mod, name, counts.wrap(stage, getattr(mod, name)))
    return counts
