"""MLflow wrapper on sqlite in a temp dir: nested runs, params without secrets, datasets,
registry versions and lineage lookups."""

import dataclasses
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from pydantic import SecretStr

from eval_tiny import tiny_lm, tiny_tokenizer

from infra.artifacts import LocalStore
from infra.settings import Settings
from infra.tracking import (
    CACHE_TAG,
    configure,
    LIBRARIES,
    flatten_params,
    lineage,
    log_dataset,
    log_metrics,
    log_json,
    log_output,
    log_table_markdown,
    log_text,
    parent_run,
    recent_runs,
    register_checkpoint,
    run_tags,
    stage_run,
    stored_config,
)
from mha2mla_core import MLAConfig, convert_to_mla
from mha2mla_core.hub_code import bundle_code
from tiny_models import calib_ids

pytestmark = pytest.mark.services

SECRET = "wJalrXUtnFEMI-not-a-real-key"


@dataclasses.dataclass(frozen=True)
class _MLAConfig:
    kv_lora_rank: int = 8
    rope_dims: tuple = (0, 1)


@pytest.fixture
def settings(tracking_settings):
    return tracking_settings.model_copy(update={"aws_secret_access_key": SecretStr(SECRET)})


def test_flatten_params_drops_secrets():
    settings = Settings(
        _env_file=None, aws_secret_access_key=SECRET, tracking_uri="postgresql://u:hunter2@db/m"
    )
    flat = flatten_params(
        {"mla": _MLAConfig(), "settings": settings, "hf_token": "hf_abc", "note": "x" * 7000,
         "eval": {"max_tokens": 4096, "token": "t0", "aws_session_token": "t1", "kv_bytes_per_token": 4320}}
    )  # fmt: skip
    assert flat["mla.kv_lora_rank"] == "8" and flat["mla.rope_dims"] == "[0, 1]"
    assert flat["settings.tracking_uri"] == "postgresql://u:***@db/m"
    assert not any(SECRET in v or "hunter2" in v for v in flat.values())
    assert "hf_token" not in flat and "settings.aws_secret_access_key" not in flat and "eval.token" not in flat
    assert "eval.aws_session_token" not in flat
    assert flat["eval.max_tokens"] == "4096" and flat["eval.kv_bytes_per_token"] == "4320"  # counts, not secrets
    assert len(flat["note"]) == 6000


def test_nested_runs_params_tags(settings):
    with parent_run("tiny-llama", params={"model": "tiny", "settings": settings}) as flow_id:
        with stage_run("svd-init", {"mla": _MLAConfig()}, parent_run_id=flow_id) as stage_id:
            log_metrics({"eval": {"ppl": 12.5, "tokens": 100}, "label": "not a number"})
    client = MlflowClient()
    flow, stage = client.get_run(flow_id), client.get_run(stage_id)
    assert stage.data.tags["mlflow.parentRunId"] == flow_id
    assert stage.data.params == {"mla.kv_lora_rank": "8", "mla.rope_dims": "[0, 1]"}
    assert stage.data.metrics == {"eval.ppl": 12.5, "eval.tokens": 100.0}
    assert flow.data.params["settings.artifact_root"] == settings.artifact_root
    everything = str(flow.data.params) + str(flow.data.tags)
    assert SECRET not in everything and "aws_secret_access_key" not in everything
    assert flow.data.tags["mha2mla.code_version"] == run_tags()["mha2mla.code_version"]
    assert all(f"mha2mla.version.{lib}" in flow.data.tags for lib in LIBRARIES)


def test_stage_run_from_a_worker_thread(settings):
    with parent_run("threads") as flow_id:
        with ThreadPoolExecutor(2) as pool:

            def stage(name):
                with stage_run(name, parent_run_id=flow_id) as stage_id:
                    mlflow.log_metric("x", 1.0)
                    return stage_id

            stage_ids = list(pool.map(stage, ["a", "b"]))
    client = MlflowClient()
    assert {client.get_run(i).data.tags["mlflow.parentRunId"] for i in stage_ids} == {flow_id}


def test_stage_run_needs_a_parent(settings):
    with pytest.raises(RuntimeError, match="parent_run_id"):
        with stage_run("orphan"):
            pass


def test_a_dataset_logged_by_two_runs_at_once_links_in_both(settings, monkeypatch):
    """Two converts in one directory log the same new dataset at once: MLflow looks it up, then inserts it, and the
    loser's insert fails on the unique constraint (CI, session 15). The loser tries again and links the winner's row."""
    real, failures = mlflow.log_input, []

    def racing(dataset, **kwargs):
        if not failures:
            failures.append(dataset.name)
            raise mlflow.exceptions.MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.name")
        return real(dataset, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with parent_run("race") as flow_id:
        with stage_run("sample-calibration", parent_run_id=flow_id) as run_id:
            log_dataset("calibration", "d" * 64, "file:///tmp/books.txt", context="calibration")
    assert failures == ["calibration"]
    assert [i.dataset.name for i in MlflowClient().get_run(run_id).inputs.dataset_inputs] == ["calibration"]

    def broken(dataset, **kwargs):
        raise mlflow.exceptions.MlflowException("the tracking server is read-only")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with parent_run("broken") as flow_id, stage_run("svd-init", parent_run_id=flow_id):
        with pytest.raises(mlflow.exceptions.MlflowException, match="read-only"):  # any other error is not retried
            log_dataset("calibration", "d" * 64, "file:///tmp/books.txt")


def test_lineage_of_a_registered_checkpoint(settings, tmp_path):
    store = LocalStore(settings.artifact_root)
    calib = store.put_bytes(b"calibration tokens", "tiny/calibration.bin")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    ckpt = store.put_dir(tmp_path / "ckpt", "tiny/mla")

    model_tags = {"mha2mla.model_sha256": "ab"}
    with parent_run("lineage", params={"model": "tiny"}, tags=model_tags) as flow_id:
        with stage_run("sample-calibration", {"n": 4}, parent_run_id=flow_id):
            log_dataset("wikitext-sample", calib.sha256, calib.uri)
            log_output(calib)
        with stage_run("svd-init", {"rank": 8}, parent_run_id=flow_id) as svd_id:
            log_dataset("calibration", calib.sha256, calib.uri, context="calibration")
            log_dataset("smollm-corpus", "c" * 64, "HuggingFaceTB/smollm-corpus")
            log_output(ckpt)
            mlflow.set_tag(CACHE_TAG, "miss")
        first = register_checkpoint(tmp_path / "ckpt", ckpt, "tiny-mla", description="tiny")
    with parent_run("lineage-rerun") as rerun_id:
        with stage_run("svd-init", {"rank": 8}, parent_run_id=rerun_id):  # a cache hit logs the same output
            log_output(ckpt)
            mlflow.set_tag(CACHE_TAG, "hit")
        again = register_checkpoint(tmp_path / "ckpt", ckpt, "tiny-mla")
    assert (first.version, first.logged, again.version, again.logged) == (1, True, 1, False)

    found = lineage(ckpt.uri)
    assert found.producer.run_id == svd_id and found.sha256 == ckpt.sha256  # the run that wrote it, not the hit
    assert found.producer.params == {"rank": "8"}
    assert {(d.name, d.sha256, d.context) for d in found.producer.datasets} == {
        ("calibration", calib.sha256, "calibration"),
        ("smollm-corpus", "c" * 64, "training"),
    }
    assert calib.uri in found.producer.datasets[0].source + found.producer.datasets[1].source
    assert found.flow.run.run_id == flow_id
    assert found.flow.run.tags["mha2mla.model_sha256"] == "ab"
    assert [s.name for s in found.flow.stages] == ["sample-calibration", "svd-init"]
    assert found.model_versions == ("tiny-mla/1",)
    folder = Path(settings.artifact_root) / "tiny" / "mla"
    for target in ("models:/tiny-mla/1", "models:/tiny-mla@candidate", str(folder)):
        assert lineage(target).producer.run_id == svd_id, target
    copied = shutil.copytree(folder, tmp_path / "a copied store" / "mla")  # found by its manifest's digest
    for target in (str(copied), copied.as_uri()):
        moved = lineage(target)
        assert (moved.producer.run_id, moved.uri, moved.model_versions) == (svd_id, ckpt.uri, ("tiny-mla/1",))
    with pytest.raises(LookupError, match="no run logged output"):
        lineage(store.uri("tiny/never-written"))
    with pytest.raises(LookupError, match="models:/tiny-mla/7: no such registered model version"):
        lineage("models:/tiny-mla/7")
    with pytest.raises(LookupError, match="not a models:/ URI, an artifact URI"):
        lineage(str(tmp_path / "nowhere"))


@pytest.fixture
def stored_tiny_mla(settings, tmp_path):
    """(model, tokenizer, local folder, stored ref) of a tiny converted checkpoint in the settings' store."""
    tok = tiny_tokenizer()
    model = convert_to_mla(tiny_lm(tok), MLAConfig(rope_dims=4, kv_rank=4, svd="aware", calib_seq_len=64),
                           calib_ids(512).clamp(max=len(tok) - 1)).eval()  # fmt: skip
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    bundle_code(tmp_path / "ckpt")
    return model, tok, tmp_path / "ckpt", LocalStore(settings.artifact_root).put_dir(tmp_path / "ckpt", "tiny/mla")


def _generates_as(uri: str, model, tok) -> None:
    """The pyfunc at `uri` continues prompts exactly as `model.generate` does (greedy, left padding)."""
    prompts = ["the river ran past the old mill", "she wrote"]
    loaded = mlflow.pyfunc.load_model(uri)
    texts = loaded.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 5})["text"].tolist()
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert texts == tok.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)


def test_registered_checkpoint_is_an_mlflow_model_that_generates(settings, stored_tiny_mla):
    model, tok, folder, ckpt = stored_tiny_mla
    with parent_run("register"):
        registered = register_checkpoint(folder, ckpt, "tiny-mla-r4", description="PPL 12.5", champion=True)
    assert registered.uri == "models:/tiny-mla-r4/1" and registered.aliases == ("candidate", "champion")

    version = MlflowClient().get_model_version_by_alias("tiny-mla-r4", "champion")
    assert version.description == "PPL 12.5" and version.tags["mha2mla.checkpoint_sha256"] == ckpt.sha256
    assert mlflow.models.get_model_info("models:/tiny-mla-r4@candidate").signature.inputs.input_names() == ["prompt"]
    _generates_as("models:/tiny-mla-r4/1", model, tok)


def test_a_checkpoint_registered_by_reference_loads_from_the_store_and_notices_a_change(settings, stored_tiny_mla, tmp_path):
    model, tok, _, ckpt = stored_tiny_mla
    beside = tmp_path / "card" / "checkpoint"  # the artifact is named after the folder, as publish names it
    beside.mkdir(parents=True)
    (beside / "README.md").write_text("card")
    with parent_run("register"):
        register_checkpoint(beside, ckpt, "tiny-mla-ref", by_reference=True)
    artifact = Path(mlflow.artifacts.download_artifacts("models:/tiny-mla-ref/1")) / "artifacts" / "checkpoint"
    assert sorted(p.name for p in artifact.iterdir()) == ["README.md", "checkpoint.json"]  # no weights copied
    _generates_as("models:/tiny-mla-ref/1", model, tok)

    manifest = Path(unquote(urlsplit(ckpt.uri).path)) / "_manifest.json"  # the stored folder's list of files
    manifest.chmod(0o644)
    manifest.write_text(manifest.read_text() + " ")
    with pytest.raises(ValueError, match="changed since it was registered"):
        mlflow.pyfunc.load_model("models:/tiny-mla-ref/1")


def test_recent_runs_lists_flows_with_stages(settings):
    with parent_run("older"):
        pass
    with parent_run("newest") as flow_id:
        with stage_run("score-rope", parent_run_id=flow_id):
            pass
    runs = recent_runs(limit=5)
    assert [r.run.name for r in runs] == ["newest", "older"] and runs[0].run.run_id == flow_id
    assert [(s.name, s.status) for s in runs[0].stages] == [("score-rope", "FINISHED")]


def test_markdown_table_artifact(settings):
    rows = [{"model": "tiny", "ppl": 12.3456789}, {"model": "a|b", "status": "failed"}]
    with parent_run("catalog") as flow_id:
        markdown = log_table_markdown(rows, "summary.md")
    assert markdown.splitlines()[0] == "| model | ppl | status |"
    assert "| a\\|b |  | failed |" in markdown and "12.35" in markdown
    artifact_uri = MlflowClient().get_run(flow_id).info.artifact_uri
    assert artifact_uri.startswith(settings.experiment_artifact_location())
    assert mlflow.artifacts.load_text(f"{artifact_uri}/summary.md") == markdown


def test_a_moved_store_reads_its_runs_and_writes_new_ones_in_its_own_place(mlflow_db_template, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    shutil.copyfile(mlflow_db_template, old / "mlflow.db")
    configure(Settings(_env_file=None, home=str(old)))
    with parent_run("before") as before:
        log_json({"flow": "convert", "params": {"model": "tiny"}}, "config.json")
    shutil.copytree(old, new)
    shutil.rmtree(old)
    configure(Settings(_env_file=None, home=str(new)), create=False)
    assert [r.run.name for r in recent_runs()] == ["before"]
    assert stored_config(before, ("config.json",))["params"] == {"model": "tiny"}  # read from the new place
    configure(Settings(_env_file=None, home=str(new)))
    with parent_run("after") as run_id:
        log_text("x", "x.txt")
    assert MlflowClient().get_run(run_id).info.artifact_uri.startswith((new / "mlruns").as_uri())
    assert not old.exists()


def test_a_tracking_server_s_local_artifacts_of_another_store_are_not_written(settings, tmp_path):
    elsewhere = settings.model_copy(update={"mlflow_artifact_root": str(tmp_path / "other-mlruns")})
    with pytest.raises(ValueError, match="the store was copied or moved.*set MHA2MLA_EXPERIMENT"):
        configure(elsewhere)


def test_requirements_pin_the_variant_that_provides_an_import(monkeypatch):
    from importlib import metadata

    from infra.tracking import registry

    real_version = metadata.version

    def version(name):  # an environment with mlflow-skinny but no `mlflow` distribution
        if name == "mlflow":
            raise metadata.PackageNotFoundError(name)
        return "3.17.2" if name == "mlflow-skinny" else real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(metadata, "packages_distributions", lambda: {"mlflow": ["mlflow-tracing", "mlflow-skinny"]})
    pins = registry._requirements()
    assert "mlflow-skinny==3.17.2" in pins and not any(p.startswith("mlflow==") for p in pins)


def test_code_version_of_a_copied_tree_without_git_or_install(monkeypatch):
    from importlib import metadata

    from infra.tracking import runs

    def no_git(*args):
        raise OSError("git: not found")

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(runs, "_git", no_git)
    monkeypatch.setattr(metadata, "version", not_installed)
    runs.code_version.cache_clear()
    try:
        assert runs.code_version() == "unknown"
    finally:
        runs.code_version.cache_clear()
