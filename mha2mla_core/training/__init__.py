"""Building blocks of the fine-tuning stage (the loop is `mha2mla_core.training.loop`): configs and results,
packing and data order, the distillation loss, the WSD schedule, checkpoints, FSDP helpers and block-wise
reconstruction."""

from mha2mla_core.training.config import (
    FinetuneConfig,
    FinetuneResult,
    ReconstructConfig,
    ReconstructResult,
    TrainEvent,
)
from mha2mla_core.training.distributed import init_distributed
from mha2mla_core.training.packing import pack_texts

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "ReconstructConfig",
    "ReconstructResult",
    "TrainEvent",
    "init_distributed",
    "pack_texts",
]
