"""The model registry: a checkpoint registered as an MLflow model (a pyfunc that generates, `mlflow_model.py`) with
a description, its checkpoint tags and aliases; finding a checkpoint from what a user holds; marking versions whose
checkpoint was found corrupt, and settling them once a good copy is registered."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from infra.artifacts import MANIFEST_NAME, ArtifactRef, sha256_file
from infra.tracking.tags import (
    CANDIDATE,
    CHAMPION,
    CHECKPOINT_SHA256_TAG,
    CHECKPOINT_TAGS,
    CHECKPOINT_URI_TAG,
    INTEGRITY_TAG,
    quoted,
)

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).resolve().with_name("mlflow_model.py")
REFERENCE = "checkpoint.json"  # as `mlflow_model.REFERENCE`: that file is logged as code, so it imports nothing of ours
MODEL_REQUIREMENTS = ("torch", "transformers", "mlflow", "pandas", "safetensors")
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "prompt")]),
    outputs=Schema([ColSpec(DataType.string, "text")]),
    params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, 32), ParamSpec("temperature", DataType.double, 0.0),
                        ParamSpec("top_p", DataType.double, 1.0)]),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RegisteredCheckpoint:
    name: str
    version: int
    aliases: tuple[str, ...]
    logged: bool  # False: the version already existed (a rerun of the same checkpoint)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_checkpoint(
    directory: str | Path | None, ref: ArtifactRef, name: str, *, description: str = "", champion: bool = False,
    by_reference: bool = False,
) -> RegisteredCheckpoint:
    """Register the Hugging Face folder `directory` (the checkpoint `ref`) as a version of model `name`: logged as
    a pyfunc model on the active run, unless a version of `name` already holds this checkpoint (then `directory`
    may be None). The version gets `description`, the checkpoint tags and the alias `candidate`; `champion` moves
    that alias to it too.

    `by_reference`: the model holds no copy of the weights. `directory` then holds only what goes beside them (the
    card, the recipe); `checkpoint.json` with `ref`'s URI and digest is written into it, and loading the model reads
    the checkpoint from the artifact store (`mlflow_model.checkpoint_folder`). For checkpoints of many GB, which
    MLflow would otherwise copy twice more (a temp folder, then its artifact store)."""
    client = MlflowClient()
    version = checkpoint_version(name, ref.sha256)
    logged = version is None
    if version is None:
        if directory is None:
            raise ValueError(f"{name} has no version of checkpoint {ref.uri} yet; give its folder to log it")
        if by_reference:
            (Path(directory) / REFERENCE).write_text(json.dumps({"uri": ref.uri, "sha256": ref.sha256}, indent=1))
        with warnings.catch_warnings():  # the signature is given; an input example would load the model to check it
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), artifacts={"checkpoint": str(directory)},
                signature=MODEL_SIGNATURE, pip_requirements=_requirements(s3=by_reference and ref.uri.startswith("s3://")),
            )  # fmt: skip
        tags = {CHECKPOINT_URI_TAG: ref.uri, CHECKPOINT_SHA256_TAG: ref.sha256}
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    if description:
        client.update_model_version(name, version.version, description=description)
    aliases = [CANDIDATE, CHAMPION] if champion else [CANDIDATE]
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    log.info("registered %s as model %s version %s (%s)", ref.uri, name, version.version, ", ".join(aliases))
    return RegisteredCheckpoint(name, int(version.version), tuple(aliases), logged)


def checkpoint_version(name: str, sha256: str) -> ModelVersion | None:
    """The version of registered model `name` that holds the checkpoint of digest `sha256`, if any."""
    filter_string = f"name = '{quoted(name)}' and tags.`{CHECKPOINT_SHA256_TAG}` = '{quoted(sha256)}'"
    versions = MlflowClient().search_model_versions(filter_string)
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _requirements(s3: bool = False) -> list[str]:
    """Pinned requirements of the pyfunc: the distributions and versions this process runs (local labels such as
    +cpu dropped). Where only a variant provides an import (mlflow-skinny for mlflow), the variant is pinned. `s3`:
    boto3 too, to read a checkpoint registered by reference from S3."""
    names = MODEL_REQUIREMENTS + (("boto3",) if s3 else ())
    return [f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in map(_distribution, names)]


def _distribution(name: str) -> str:
    """The installed distribution that provides import `name`: `name` itself, else the first one named after it."""
    try:
        metadata.version(name)
        return name
    except metadata.PackageNotFoundError:
        providers = sorted(d for d in metadata.packages_distributions().get(name, []) if d.startswith(name))
        if not providers:
            raise
        return providers[0]


def resolve_checkpoint(target: str) -> tuple[str, str | None]:
    """(artifact URI, sha256 or None) from what a user holds: `models:/NAME/VERSION` or `models:/NAME@ALIAS` (the
    version's checkpoint tags), a local folder or file:// URI (its manifest's digest, when it is a stored
    checkpoint), or an s3:// URI (no digest)."""
    if target.startswith("models:/"):
        uri = resolve_checkpoint_uri(target)
        return uri, _registered_sha256(target)
    uri = resolve_checkpoint_uri(target)
    manifest = Path(unquote(urlsplit(uri).path)) / MANIFEST_NAME if uri.startswith("file://") else None
    return uri, sha256_file(manifest)[0] if manifest is not None and manifest.is_file() else None


def _registered_sha256(target: str) -> str | None:
    name, _, version = target.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    client = MlflowClient()
    found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return found.tags.get(CHECKPOINT_SHA256_TAG)


def resolve_checkpoint_uri(target: str) -> str:
    """An artifact URI from what a user holds: `models:/NAME/VERSION` or `models:/NAME@ALIAS` (the version's
    checkpoint tag), a local folder (its file:// URI), or an artifact URI as it is."""
    if target.startswith("models:/"):
        name, _, version = target.removeprefix("models:/").partition("/")
        name, _, alias = name.partition("@")
        client = MlflowClient()
        try:
            found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except MlflowException:
            raise LookupError(f"{target}: no such registered model version; `mha2mla runs` lists the flows") from None
        if CHECKPOINT_URI_TAG not in found.tags:
            raise LookupError(f"{target} was not registered by mha2mla (no {CHECKPOINT_URI_TAG} tag)")
        return found.tags[CHECKPOINT_URI_TAG]
    if urlsplit(target).scheme in ("file", "s3"):
        return target
    path = Path(target)
    if not path.exists():
        raise LookupError(f"{target}: not a models:/ URI, an artifact URI (file://, s3://) or an existing folder")
    return path.resolve().as_uri()



# ------------------------------------------------------------------------------ registry integrity
SUPERSEDED_TAG = "mha2mla.superseded_by"  # on a version marked corrupt: the version registered in its place
REPOINTED_TAG = "mha2mla.repointed_from"  # on a version pointed at a good copy: the corrupt copy it pointed at


def model_versions(name: str) -> list[ModelVersion]:
    """Every version of registered model `name`."""
    return MlflowClient().search_model_versions(f"name = '{quoted(name)}'")


def model_version_of(name: str, number: str | int) -> ModelVersion:
    return MlflowClient().get_model_version(name, str(number))


def settle_corrupt_versions(versions: Sequence[ModelVersion], number: int, good: ArtifactRef) -> None:
    """After `good` was registered as version `number`: of `versions` marked corrupt (`mha2mla.integrity`), the one
    that holds `good`'s bytes is pointed at `good` (`repoint`); the others get `mha2mla.superseded_by` = it."""
    client = MlflowClient()
    for version in versions:
        if INTEGRITY_TAG not in version.tags or SUPERSEDED_TAG in version.tags:
            continue
        if int(version.version) == int(number):
            repoint(version, good)
        else:
            client.set_model_version_tag(version.name, version.version, SUPERSEDED_TAG, f"{version.name}/{number}")


def repoint(version: ModelVersion, good: ArtifactRef) -> None:
    """Point a registered version whose checkpoint copy was found corrupt at a good copy of the same bytes: its
    checkpoint tag becomes `good.uri`, the mark goes, `mha2mla.repointed_from` keeps the corrupt copy's URI."""
    corrupt, sha256 = registered_source(version)
    if sha256 != good.sha256:
        raise ValueError(f"{version.name}/{version.version} holds sha256 {sha256}, not {good.sha256}; not re-pointed")
    client = MlflowClient()
    client.set_model_version_tag(version.name, version.version, REPOINTED_TAG, corrupt)
    client.set_model_version_tag(version.name, version.version, CHECKPOINT_TAGS[0], good.uri)
    client.delete_model_version_tag(version.name, version.version, INTEGRITY_TAG)


def registered_source(version) -> tuple[str, str]:
    """(artifact URI, sha256) of the checkpoint a registered MLflow model version stands for: its checkpoint
    tags, or for a version registered straight from the store, its source and `sha256` tag."""
    uri_tag, sha_tag = CHECKPOINT_TAGS
    return version.tags.get(uri_tag, version.source), version.tags.get(sha_tag, version.tags.get("sha256", ""))


def mark_registered(uri: str, note: str) -> list[str]:
    """Tag every registered model version whose checkpoint is `uri` with `mha2mla.integrity=note`; "name/version"s."""
    client, marked = MlflowClient(), []
    quoted = uri.replace("'", "")  # a store URI holds no quote (safe_key); never let one end the filter
    found = {(v.name, v.version): v for filter_string in (f"source_path = '{quoted}'", f"tags.`{CHECKPOINT_TAGS[0]}` = '{quoted}'")
             for v in client.search_model_versions(filter_string)}  # fmt: skip
    for (name, number), version in sorted(found.items()):
        if registered_source(version)[0] == uri:
            client.set_model_version_tag(name, number, INTEGRITY_TAG, note)
            marked.append(f"{name}/{number}")
    return marked
