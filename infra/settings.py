"""Deployment settings: where artifacts, runs and Prefect state live, and how to reach S3.

Every knob has one source: an `MHA2MLA_*` environment variable, or the same name in a `.env`
file in the working directory, or the default below. The defaults are the embedded set-up
(no server): local artifacts, MLflow on sqlite, Prefect's ephemeral API, all under the store's
folder `MHA2MLA_HOME` (default `./.mha2mla/`; the CLI's `--home`), each of which can also be set on its own.
`mlflow ui --backend-store-uri sqlite:///.mha2mla/mlflow.db` shows the runs.

Production points the same names at the services of `infra/docker-compose.yml`:

    MHA2MLA_ARTIFACT_ROOT=s3://mha2mla/artifacts
    MHA2MLA_S3_ENDPOINT_URL=http://localhost:9000
    MHA2MLA_AWS_ACCESS_KEY_ID=...  MHA2MLA_AWS_SECRET_ACCESS_KEY=...
    MHA2MLA_TRACKING_URI=http://localhost:5000

Credentials are `SecretStr`: they never appear in `repr`, logs, or `public_dict()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MHA2MLA_"
COMPOSE_ACCESS_KEY_ID = "mha2mla-pipeline"  # infra/docker-compose.yml's default for MHA2MLA_AWS_ACCESS_KEY_ID


class Settings(BaseSettings):
    """Resolved deployment settings; build once at start-up and pass down explicitly."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # the store's folder: the defaults of artifact_root, tracking_uri and prefect_home lie below it
    home: str = "./.mha2mla"
    # artifacts: a local directory, or s3://bucket/prefix (any S3-compatible store); None: HOME/artifacts
    artifact_root: str | None = None
    # MLflow: backend store URI (sqlite:///..., http://host:5000, postgresql://...); None: sqlite:///HOME/mlflow.db
    tracking_uri: str | None = None
    experiment: str = "mha2mla"
    # where a new experiment keeps run artifacts (PNG, tables); None: mlruns/ beside a sqlite
    # database, else the tracking server's default (its --artifacts-destination)
    mlflow_artifact_root: str | None = None
    # PREFECT_HOME for the embedded default: ephemeral API database and local result storage; None: HOME/prefect
    prefect_home: Path | None = None
    # a registered model holds a copy of its checkpoint up to this many GiB; a larger one (a 7B+ model) is registered
    # by reference: its artifact URI and digest, read from the artifact store when the model is loaded
    registry_copy_max_gib: float = Field(4.0, ge=0)
    # the stages of a process keep up to 3 loaded models (the source, its checkpoints) for the next stage; past this
    # many GiB of host memory they keep fewer (the newest always). None: half of this machine's memory, so that a 70B
    # flow on a 256 GiB host holds one 131 GiB model, not two
    model_memo_max_gib: float | None = Field(None, gt=0)

    # S3: endpoint_url for MinIO / moto / other S3-compatible stores; None = AWS
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # None: boto3's default chain (AWS_* env vars, ~/.aws, instance role)
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    # botocore attempts per request (standard retry mode: 5xx, throttling, connection errors)
    s3_max_attempts: int = 3
    # files larger than this upload (and copy) in parts of this size; S3's minimum part is 5 MiB
    s3_multipart_mb: int = 64

    # where this worker runs the model stages (data-free calibration, svd-init, reconstruct, finetune): auto (the
    # CUDA device when there is one, else the CPU), cpu, cuda, cuda:N
    device: str = "auto"
    # processes the training stages spread over on this worker: finetune-data samples and finetune trains (FSDP) as
    # this many processes under torchrun, one per GPU (with device cpu: gloo processes); 1 = in the worker's process
    gpus: int = Field(1, ge=1)
    # the recovery `mha2mla convert MODEL` runs when the command names none (--recipe): auto (the gpu recipe on a
    # worker whose device is a GPU, the cpu recipe elsewhere), none (conversion only), or a packaged recipe's name
    recipe: str = "auto"

    @model_validator(mode="after")
    def _below_home(self) -> "Settings":
        """What is not set on its own lies in the store's folder."""
        home = self.home.rstrip("/") or "/"
        self.artifact_root = self.artifact_root or f"{home}/artifacts"
        self.tracking_uri = self.tracking_uri or f"sqlite:///{home}/mlflow.db"
        self.prefect_home = self.prefect_home or Path(f"{home}/prefect")
        return self

    @field_validator("artifact_root")
    @classmethod
    def _check_artifact_root(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme, bucket = urlsplit(value).scheme, urlsplit(value).netloc
        if (scheme == "s3" and not bucket) or scheme not in ("", "s3"):
            raise ValueError(
                f"{ENV_PREFIX}ARTIFACT_ROOT={value!r}: use a local directory or s3://BUCKET/PREFIX"
            )
        return value

    @model_validator(mode="after")
    def _complete_credentials(self) -> "Settings":
        """A secret alone is the compose file's pipeline user (its default key id, as the compose file reads the same
        .env); a key id alone is an error, not a half-configured boto3 client."""
        if self.aws_secret_access_key and self.aws_access_key_id is None:
            self.aws_access_key_id = SecretStr(COMPOSE_ACCESS_KEY_ID)
        elif self.aws_access_key_id and not self.aws_secret_access_key:
            raise ValueError(f"{ENV_PREFIX}AWS_ACCESS_KEY_ID is set but {ENV_PREFIX}AWS_SECRET_ACCESS_KEY is not: set "
                             "both (see .env.example), or neither for boto3's own credential chain")  # fmt: skip
        return self

    @field_validator("s3_max_attempts")
    @classmethod
    def _check_attempts(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"s3_max_attempts={value}; use >= 1 (1 = no retries)")
        return value

    @field_validator("s3_multipart_mb")
    @classmethod
    def _check_multipart(cls, value: int) -> int:
        if value < 5:
            raise ValueError(f"s3_multipart_mb={value} < 5, S3's minimum part size; use >= 5")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        kind, _, index = value.partition(":")
        if value != "auto" and (kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index)):
            raise ValueError(f"{ENV_PREFIX}DEVICE={value!r}: use auto, cpu, cuda or cuda:N")
        return value

    def experiment_artifact_location(self) -> str | None:
        """Artifact location for a new MLflow experiment (an absolute file URI when local)."""
        if self.mlflow_artifact_root is not None:
            root = self.mlflow_artifact_root
        elif self.tracking_uri.startswith("sqlite:///"):
            root = str(sqlite_path(self.tracking_uri).parent / "mlruns")
        else:
            return None
        return root if urlsplit(root).scheme else Path(root).resolve().as_uri()

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """repr/str mask URI passwords too (SecretStr fields already print as '**********')."""
        for name, value in super().__repr_args__():
            yield name, redact_uri(value) if isinstance(value, str) else value

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-safe values with secrets removed and URI passwords masked.

        Safe for MLflow params, tags and logs.
        """
        public = {}
        for name, value in self.model_dump(mode="python").items():
            if isinstance(value, SecretStr):
                continue
            public[name] = redact_uri(value) if isinstance(value, str) else _jsonable(value)
        return public


def redact_uri(uri: str) -> str:
    """Mask a URI's password: postgresql://u:pw@h/db -> postgresql://u:***@h/db."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def check_local_store(settings: Settings) -> None:
    """LookupError when the tracking URI names a sqlite database that does not exist: no store here (a server's
    store is checked by asking it)."""
    if settings.tracking_uri.startswith("sqlite:///"):
        path = sqlite_path(settings.tracking_uri)
        if not path.is_file():
            raise LookupError(f"no store here: {path.resolve()} does not exist ({ENV_PREFIX}TRACKING_URI="
                              f"{redact_uri(settings.tracking_uri)}); set {ENV_PREFIX}HOME or pass --home to the "
                              "store's folder (or run where .mha2mla/ is)")  # fmt: skip


def sqlite_path(tracking_uri: str) -> Path:
    """The database file of a sqlite:///PATH URI (relative to the working directory)."""
    return Path(tracking_uri.removeprefix("sqlite:///"))


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value
