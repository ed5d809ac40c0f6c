"""Training checkpoints in a local directory: `<dir>/step-00000123/` holds

- `model.safetensors`: the full (unsharded) model state; tensors tied to another key are stored once and
  listed in the file's metadata under `tied`;
- `trainer.pt`: optimizer state, step, data position, RNG states, config and architecture (torch.save,
  read back with `weights_only=True`);
- `history.json`: the logged metrics so far;
- `manifest.json`: sha256 of the three files above, written last.

A checkpoint is written to a temporary folder and renamed into place, so a crash never leaves a half-written
`step-*`. On load, the newest checkpoint whose files match their manifest wins; an unreadable one is skipped
with a warning and the one before it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

logger = logging.getLogger(__name__)

_PREFIX = "step-"
_FILES = ("model.safetensors", "trainer.pt", "history.json")
# what reading a damaged or missing file raises (JSONDecodeError is a ValueError)
_UNREADABLE = (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, safetensors.SafetensorError)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    trainer_state: dict
    history: list[dict]


def save_checkpoint(directory: Path, step: int, ckpt: Checkpoint, keep_last: int) -> Path:
    """Write `ckpt` as `<directory>/step-<step>` and delete all but the newest `keep_last` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{_PREFIX}{step:08d}"
    tmp = directory / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, tied = _untie(ckpt.model_state)
    safetensors.torch.save_file(tensors, tmp / "model.safetensors", metadata={"tied": json.dumps(tied)})
    torch.save(ckpt.trainer_state, tmp / "trainer.pt")
    (tmp / "history.json").write_text(json.dumps(ckpt.history))
    manifest = {name: _sha256(tmp / name) for name in _FILES}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def load_latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest readable checkpoint, None if there is none; raises if every one of them is unreadable."""
    candidates = list_checkpoints(directory)[::-1]
    for path in candidates:
        try:
            return _read(path)
        except _UNREADABLE as err:
            logger.warning("checkpoint %s is unreadable (%s: %s); falling back to the one before it",
                           path, type(err).__name__, err)
    if candidates:
        raise RuntimeError(
            f"all {len(candidates)} checkpoints in {directory} are unreadable; move them away to start afresh"
        )
    return None


def _read(path: Path) -> Checkpoint:
    manifest = json.loads((path / "manifest.json").read_text())
    for name in _FILES:
        if _sha256(path / name) != manifest[name]:
            raise ValueError(f"{name} does not match its sha256 in manifest.json")
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    with safetensors.safe_open(path / "model.safetensors", "pt") as f:
        tied = json.loads(f.metadata()["tied"])
    for alias, source in tied.items():
        tensors[alias] = tensors[source]
    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    history = json.loads((path / "history.json").read_text())
    return Checkpoint(path, tensors, trainer_state, history)


def _untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop keys whose tensor is another key's (tied weights): safetensors refuses shared storage."""
    seen: dict[tuple, str] = {}
    tensors, tied = {}, {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = value.contiguous()
    return tensors, tied


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
