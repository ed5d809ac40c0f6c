import os
import shutil
import socket
import uuid

import pytest
import torch

from infra.settings import Settings

# Without a CUDA device, Triton (scripts/setup.sh installs it) runs kernels in its interpreter, on CPU tensors, so the
# CPU suite checks the decode kernels too (tests/test_kernels.py). Triton reads this when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    return _free_port()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (random port), spoken to over HTTP like MinIO."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_admin(s3_endpoint):
    """A plain boto3 client for the moto server, to create buckets and look behind the store."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_settings(s3_endpoint, s3_admin) -> Settings:
    """Settings whose artifact root is a new, empty bucket on the moto server."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        _env_file=None,
        artifact_root=f"s3://{bucket}/artifacts",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        s3_multipart_mb=5,
    )
    s3_admin.create_bucket(Bucket=bucket)
    return settings


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory):
    """An initialised, empty MLflow sqlite database; copying it skips MLflow's migrations."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_settings(mlflow_db_template, tmp_path) -> Settings:
    """Settings with MLflow on a fresh sqlite database and artifacts in tmp_path, configured."""
    from infra.tracking import configure

    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    settings = Settings(
        _env_file=None,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        artifact_root=str(tmp_path / "artifacts"),
    )
    configure(settings)
    return settings
