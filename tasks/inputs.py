"""Inputs of the stages: model and data sources resolved to content digests, and artifact reads/writes.

Resolution (`resolve_model`, `resolve_data`) runs in the flow before any stage, so an unknown model or a
missing file fails in seconds with the fix. A source's digest is its content's (a file's sha256, a directory's
manifest hash); a hub model or dataset counts as its commit sha; an s3:// object as its ETag.

Models are read once per stage runtime: `load_source` / `load_checkpoint` keep the last few in the runtime's
memo (`context().models`, keyed by digest; a model is immutable once loaded: stages never train a source in
place), so the flow's stages do not reload the same 135M-parameter model three times. On a GPU worker the memo
holds them in the dtype they are stored in (`host_dtype`) and the stages work on device copies; on a CPU worker,
whose stages compute on the memo's copy itself, in fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from infra.artifacts import ArtifactRef, s3_client, safe_key, sha256_file
from infra.stage import StageResult, context, host_bytes, scratch_dir

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
DEFAULT_CALIBRATION = PACKAGE_PREFIX + "calibration_books.txt"
DEFAULT_EVAL_TEXT = PACKAGE_PREFIX + "heldout_books.txt"


class ModelSource(BaseModel):
    """A source model by name (hub id, local dir, .gguf, packaged shorthand) and content digest."""

    model_config = ConfigDict(frozen=True)

    name: str
    digest: str

    def cache_token(self) -> str:
        return self.digest

    @property
    def slug(self) -> str:
        return model_slug(self.name)


class DataSource(BaseModel):
    """A text source (package file, local path, s3:// URI, hub dataset id) and its digest."""

    model_config = ConfigDict(frozen=True)

    source: str
    digest: str

    def cache_token(self) -> str:
        return self.digest

    @property
    def uri(self) -> str:
        """The source as a URI for MLflow's dataset record: file:// for package and local files."""
        if self.source.startswith(PACKAGE_PREFIX):
            return _package_file(self.source).resolve().as_uri()
        return Path(self.source).as_uri() if Path(self.source).is_absolute() else self.source


def model_slug(name: str) -> str:
    """A store-safe folder name for a model: its id, or a local path's last part; odd characters -> '-'."""
    path = Path(name)
    base = path.stem if path.suffix == ".gguf" else (path.name if path.is_absolute() or name.startswith(".") else name)
    cleaned = "/".join(
        "".join(c if c.isascii() and (c.isalnum() or c in "._=+-") else "-" for c in part).lstrip(".-") or "model"
        for part in base.split("/")
    )
    return safe_key(cleaned)


# ------------------------------------------------------------------------------------------- resolution


def dir_digest(path: Path) -> str:
    """sha256 of a directory's sorted (relative path, file sha256) list."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    listing = [(p.relative_to(path).as_posix(), sha256_file(p)[0]) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def resolve_model(name: str) -> ModelSource:
    """The model's digest, or a clear error naming what `name` was tried as."""
    from mha2mla_core.loading import PACKAGED_MODELS, packaged_model_file

    path = Path(name).expanduser()
    if name in PACKAGED_MODELS:
        return ModelSource(name=name, digest=sha256_file(packaged_model_file(name))[0])
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=str(path.resolve()), digest=sha256_file(path)[0])
    if path.is_dir():
        return ModelSource(name=str(path.resolve()), digest=dir_digest(path))
    if path.is_absolute() or name.startswith((".", "~")) or path.suffix == ".gguf":
        raise FileNotFoundError(f"model {name!r}: no such file or directory (give a model directory or .gguf file)")
    return ModelSource(name=name, digest="hf:" + _hub_sha(name, "model", f"known packaged models: {sorted(PACKAGED_MODELS)}"))


def _hub_sha(repo_id: str, repo_type: str, hint: str) -> str:
    from huggingface_hub import HfApi

    try:
        info = HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10)
    except Exception as exc:  # offline, unknown id, gated: all mean "cannot use it"
        raise ValueError(
            f"unknown {repo_type} {repo_id!r}: not a local path and not reachable on the Hugging Face hub "
            f"({type(exc).__name__}); give a local path or a reachable hub id; {hint}"
        ) from exc
    return info.sha


def resolve_data(spec: str | None, default: str) -> DataSource:
    """`spec` (None = the packaged `default`) with its digest; missing files and buckets fail here."""
    spec = spec or default
    if spec.startswith(PACKAGE_PREFIX):
        return DataSource(source=spec, digest=hashlib.sha256(_package_file(spec).read_bytes()).hexdigest())
    if spec.startswith("s3://"):
        bucket, key = _s3_parts(spec)
        head = s3_client(context().settings).head_object(Bucket=bucket, Key=key)
        return DataSource(source=spec, digest=f"s3-etag:{head['ETag'].strip(chr(34))}:{head['ContentLength']}")
    path = Path(spec).expanduser()
    if path.is_file():
        return DataSource(source=str(path.resolve()), digest=sha256_file(path)[0])
    if path.is_dir():
        return DataSource(source=str(path.resolve()), digest=dir_digest(path))
    if path.is_absolute() or spec.startswith((".", "~")) or path.suffix:
        raise FileNotFoundError(f"data {spec!r}: no such file or directory")
    return DataSource(source=spec, digest="hf:" + _hub_sha(spec, "dataset", "or a local txt/jsonl/parquet file"))


def _package_file(spec: str) -> Path:
    from mha2mla_core.conversion.calibration import packaged_text_path

    return Path(str(packaged_text_path(spec.removeprefix(PACKAGE_PREFIX))))


def _s3_parts(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if not parts.netloc or not parts.path.strip("/"):
        raise ValueError(f"{uri!r}: use s3://BUCKET/KEY")
    return parts.netloc, parts.path.lstrip("/")


# ------------------------------------------------------------------------------------------------ reading


def local_copy(data: DataSource, tmp: Path) -> Path:
    """A local path holding `data`: the path itself, the package file, or the s3 object downloaded."""
    if data.source.startswith(PACKAGE_PREFIX):
        return _package_file(data.source)
    if data.source.startswith("s3://"):
        bucket, key = _s3_parts(data.source)
        dest = tmp / Path(key).name
        s3_client(context().settings).download_file(bucket, key, str(dest))
        return dest
    return Path(data.source)


def read_documents(data: DataSource, text_field: str = "text", split: str = "train", limit_chars: int | None = None) -> list[str]:
    """The documents of `data` (the packaged calibration text is split at its form feeds)."""
    from mha2mla_core import default_calibration_texts
    from mha2mla_core.data import load_texts

    if data.source == DEFAULT_CALIBRATION:
        return default_calibration_texts()
    with scratch_dir() as tmp:
        is_file = data.source.startswith(("s3://", PACKAGE_PREFIX)) or Path(data.source).exists()
        source = local_copy(data, tmp) if is_file else data.source
        return load_texts(source, text_field=text_field, split=split, limit_chars=limit_chars)


def read_text(data: DataSource) -> str:
    """One text: a plain-text file (.txt, .raw, ...) exactly as stored (CRLF kept), other sources' documents joined
    by blank lines."""
    from mha2mla_core.data import is_plain_text

    with scratch_dir() as tmp:
        path = local_copy(data, tmp) if data.source.startswith(("s3://", PACKAGE_PREFIX)) else Path(data.source)
        if path.is_file() and is_plain_text(path):
            with open(path, encoding="utf-8", newline="") as f:
                return f.read()
    return "\n\n".join(read_documents(data))


# ------------------------------------------------------------------------------------------------ models


def load_source(source: ModelSource):
    """(model, tokenizer) of a source model, eval mode, in `host_dtype`."""
    from mha2mla_core import load_model

    return context().models.get(source.digest, lambda: load_model(source.name, dtype=host_dtype(source_dtype(source))))


def load_source_tokenizer(source: ModelSource):
    """The source model's tokenizer alone (the memoised model's when it is loaded): a stage that only tokenizes does
    not load 8B parameters."""
    from mha2mla_core.loading import load_tokenizer

    loaded = context().models.peek(source.digest)
    return loaded[1] if loaded is not None else load_tokenizer(source.name)


def host_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype this worker holds a model stored in `stored` in: as stored on a GPU worker, whose stages copy it to
    the GPU (`on_device`) and cast their copy as they need (a bf16 Llama-3-8B takes 16 GB of host memory, not 32);
    fp32 on a CPU worker, whose stages compute on the shared copy itself."""
    return stored if worker_device(context().settings.device).type == "cuda" else torch.float32


def load_model_config(source: ModelSource):
    """The source model's transformers config, without its weights (a .gguf file: read from its header)."""
    from mha2mla_core.loading import load_config

    return load_config(source.name)


def load_checkpoint(result: StageResult, shared: bool = True):
    """(model, tokenizer) of a model directory written by a stage, every file's digest checked.

    Shared (memoised, read-only) in `host_dtype`; `shared=False` loads a private fp32 copy, for a stage that changes
    the model (training's master weights, config edits).
    """
    from mha2mla_core import load_model

    def fetch():
        with scratch_dir() as tmp:
            directory = context().store.get_dir(result.uri, tmp / "model", sha256=result.sha256)
            stored = _half_or_fp32(_config_dtype(json.loads((directory / "config.json").read_text())))
            return load_model(str(directory), dtype=host_dtype(stored) if shared else torch.float32)

    return context().models.get(result.sha256, fetch) if shared else fetch()


def load_model_input(model: ModelSource | StageResult):
    return load_source(model) if isinstance(model, ModelSource) else load_checkpoint(model)


def save_checkpoint(model, tokenizer, key: str, dtype: torch.dtype = torch.float32) -> ArtifactRef:
    """`save_pretrained` (safetensors + config + tokenizer) plus the modeling code and `auto_map` (`bundle_code`:
    loads with transformers alone, `trust_remote_code=True`) into the store as one directory.

    The weights are written in `dtype` (`source_dtype` / `checkpoint_dtype`: a bf16 source's checkpoints stay bf16).
    The model is memoised as `load_checkpoint` would give it: in `host_dtype(dtype)`, holding the rounded values, so
    the stages it is handed to in this process see what loading the checkpoint gives. Weights svd-init's model
    shares with the memoised source (embeddings, MLPs, o_proj) were loaded from that same dtype, so the round trip
    leaves them, and the source, exactly as they were."""
    from mha2mla_core.hub_code import bundle_code

    with scratch_dir() as tmp:
        with _parameters_in(model, dtype, after=host_dtype(dtype)):
            model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        bundle_code(tmp / "model")
        ref = context().store.put_dir(tmp / "model", key, move=True)
    context().models.put(ref.sha256, (model, tokenizer))
    return ref


@contextmanager
def _parameters_in(model, dtype: torch.dtype, after: torch.dtype) -> Iterator[None]:
    """The model's parameters cast to `dtype` inside the block and to `after` (from the rounded values) after it.
    Parameters only: fp32 buffers such as RoPE's inv_freq are not saved anyway."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param in model.parameters():
            param.data = param.data.to(after)


HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dtype(source: ModelSource) -> torch.dtype:
    """The dtype the stages write `source`'s checkpoints in: its own 16-bit dtype (its config's), else fp32 (a GGUF,
    which transformers dequantizes to fp32, or an fp32 model). A bf16 Llama-3-8B's checkpoints take 16 GB, not 32."""
    return _half_or_fp32(getattr(load_model_config(source), "dtype", None))


def checkpoint_dtype(result: StageResult) -> torch.dtype:
    """The dtype a stage's checkpoint was written in (its config.json), for a stage that writes one from it."""
    return _half_or_fp32(_config_dtype(context().store.get_json(f"{result.uri}/config.json")))


def _config_dtype(config: dict) -> str | None:
    return config.get("dtype", config.get("torch_dtype"))


def _half_or_fp32(dtype: torch.dtype | str | None) -> torch.dtype:
    return HALF_DTYPES.get(str(dtype).removeprefix("torch."), torch.float32)


def save_tensors(tensors: dict[str, torch.Tensor], key: str, metadata: dict[str, str] | None = None) -> ArtifactRef:
    data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    return context().store.put_bytes(data, key)


def load_tensors(result: StageResult) -> dict[str, torch.Tensor]:
    return load_safetensors(context().store.get_bytes(result.uri, sha256=result.sha256))


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The shared (memoised) source model itself on the CPU; elsewhere a private copy (`copy_to_device`: straight to
    the device, nothing more in host memory), so that other stages and threads keep using the CPU one."""
    from mha2mla_core.loading import copy_to_device

    if device.type == "cpu":
        return model
    if device.type == "cuda":
        check_fits(model, device)
    return copy_to_device(model, device)


def check_fits(model: torch.nn.Module, device: torch.device) -> None:
    """Before a model is copied to a GPU: its weights fit the memory free there, or an error that says so and what
    to do, instead of a CUDA out-of-memory error part-way through the copy (a 70B model in bf16 is 131 GiB)."""
    need, free = host_bytes(model), torch.cuda.mem_get_info(device)[0]
    if need > free:
        raise ValueError(
            f"the model's weights take {need / 2**30:.1f} GiB and {device} has {free / 2**30:.1f} GiB free: run this "
            f"stage on a worker with more GPU memory, or on the CPU (MHA2MLA_DEVICE=cpu); the finished stages stay cached"
        )


def sampler_on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` as the sampling stages decode with it on `device`: `on_device`, in `sampling_dtype` (bf16 on a GPU)."""
    from mha2mla_core.training.synthetic import sampling_dtype

    return on_device(model, device).to(sampling_dtype(device))


def worker_device(setting: str) -> torch.device:
    """The device `MHA2MLA_DEVICE` names on this worker (auto: CUDA when present), where the model stages run (the
    data-free calibration, the conversion, the training stages); checked before anything loads."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA devices" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"MHA2MLA_DEVICE={setting!r} but this worker has {found}; set it to auto or cpu")
    return device
