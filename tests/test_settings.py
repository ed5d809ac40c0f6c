"""Settings: defaults, MHA2MLA_ env vars and .env, validation, no secret in public_dict."""

import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from infra.settings import Settings, redact_uri

SECRET = "wJalrXUtnFEMI-not-a-real-key"


def test_defaults_are_the_embedded_setup(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)
    assert settings.artifact_root == "./.mha2mla/artifacts"
    assert settings.tracking_uri == "sqlite:///./.mha2mla/mlflow.db"
    assert settings.experiment_artifact_location() == (tmp_path / ".mha2mla/mlruns").as_uri()
    assert settings.aws_secret_access_key is None and settings.s3_endpoint_url is None


def test_env_vars_and_dotenv(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        f"MHA2MLA_AWS_SECRET_ACCESS_KEY={SECRET}\nMHA2MLA_S3_ENDPOINT_URL=http://minio:9000\n"
    )
    monkeypatch.setenv("MHA2MLA_ARTIFACT_ROOT", "s3://mha2mla/artifacts")
    monkeypatch.setenv("MHA2MLA_TRACKING_URI", "http://localhost:5000")
    settings = Settings()
    assert settings.artifact_root == "s3://mha2mla/artifacts"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.aws_secret_access_key.get_secret_value() == SECRET
    assert settings.experiment_artifact_location() is None  # the tracking server decides


def test_secrets_never_show(monkeypatch):
    settings = Settings(
        _env_file=None,
        aws_access_key_id="AKIA-not-real",
        aws_secret_access_key=SECRET,
        tracking_uri="postgresql://mlflow:hunter2@db:5432/mlflow",
    )
    public = settings.public_dict()
    text = repr(settings) + str(settings) + json.dumps(public)
    assert SECRET not in text and "AKIA-not-real" not in text and "hunter2" not in text
    assert "aws_secret_access_key" not in public and "aws_access_key_id" not in public
    assert public["tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"


@pytest.mark.parametrize(
    "field, value",
    [
        ("artifact_root", "s3://"),
        ("artifact_root", "gs://bucket/x"),
        ("s3_max_attempts", 0),
        ("s3_multipart_mb", 4),
        ("device", "gpu"),
        ("device", "cuda:x"),
        ("device", "cpu:0"),
        ("gpus", 0),
    ],
)
def test_bad_values_are_refused_with_the_fix(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(_env_file=None, **{field: value})


def test_redact_uri_leaves_plain_uris_alone():
    assert redact_uri("sqlite:///./x.db") == "sqlite:///./x.db"
    assert redact_uri("http://user@host:5000") == "http://user@host:5000"


def test_compose_file_speaks_the_settings_names():
    compose = Path(__file__).parents[1] / "infra" / "docker-compose.yml"
    spec = yaml.safe_load(compose.read_text())
    assert {"postgres", "prefect-server", "mlflow", "minio", "createbuckets"} <= set(spec["services"])
    names = set(re.findall(r"MHA2MLA_(\w+)", compose.read_text()))
    assert names and all(name.lower() in Settings.model_fields for name in names)
