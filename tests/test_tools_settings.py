"""The settings agree with infra/docker-compose.yml: a .env holding what the compose file needs is a working
pipeline .env, .env.example names every variable the compose file reads, and every image is pinned."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from infra.artifacts import s3_client
from infra.settings import COMPOSE_ACCESS_KEY_ID, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = (ROOT / "infra" / "docker-compose.yml").read_text()


def test_a_dot_env_with_what_compose_needs_gives_whole_credentials(tmp_path):
    env = tmp_path / ".env"
    env.write_text("POSTGRES_PASSWORD=a1\nMINIO_ROOT_PASSWORD=b2\nMHA2MLA_AWS_SECRET_ACCESS_KEY=c3\n")
    settings = Settings(_env_file=env)
    assert settings.aws_access_key_id.get_secret_value() == COMPOSE_ACCESS_KEY_ID
    assert "${MHA2MLA_AWS_ACCESS_KEY_ID:-" + COMPOSE_ACCESS_KEY_ID + "}" in COMPOSE  # the user compose creates
    credentials = s3_client(settings)._request_signer._credentials  # built without PartialCredentialsError
    assert (credentials.access_key, credentials.secret_key) == (COMPOSE_ACCESS_KEY_ID, "c3")


def test_a_key_id_without_its_secret_is_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID is set but MHA2MLA_AWS_SECRET_ACCESS_KEY is not"):
        Settings(_env_file=None, aws_access_key_id="someone")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MHA2MLA_AWS_ACCESS_KEY_ID=someone\n")
    result = CliRunner().invoke(app, ["runs"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "AWS_ACCESS_KEY_ID is set but MHA2MLA_AWS_SECRET_ACCESS_KEY is not" in result.output


def test_env_example_names_every_compose_variable_and_images_are_pinned():
    example = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, flags=re.M))
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", COMPOSE))
    assert used <= named, f"missing from .env.example: {sorted(used - named)}"
    images = re.findall(r"^\s*(?:image:|FROM)\s*(\S+)", COMPOSE, flags=re.M)
    assert len(images) == 5 and all(re.search(r":\$\{\w+:-[\w.-]+\}|:v?\$\{", i) for i in images), images
    assert "latest" not in COMPOSE
