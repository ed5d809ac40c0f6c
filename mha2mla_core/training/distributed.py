"""The few process-group pieces of training: the same loop runs in one process or, under `torchrun` /
`accelerate launch`, as one process per device, the student either replicated (DDP: one fp32 gradient all-reduce
per step, the single process's numerics) or sharded (FSDP2 `fully_shard`: full shard, one unit per decoder layer
plus the root; bf16 params and fp32 gradient reduction when `bf16`). `wrap_model` picks: a model whose training
state fits a quarter of a device is replicated, a larger one sharded."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)
_TRAINING_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two AdamW moments


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


def init_distributed(local_rank: int) -> torch.device:
    """Join the process group a launcher set up (NCCL on GPUs, gloo on CPUs); returns this process's device."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def wrap_model(model: nn.Module, strategy: str, bf16: bool) -> nn.Module:
    """`model` for training on every process of the group: DDP or FSDP per `strategy` (auto: `replicate_fits`)."""
    if strategy == "auto":
        strategy = "ddp" if replicate_fits(model) else "fsdp"
    params = sum(p.numel() for p in model.parameters())
    logger.info("training %.0fM parameters with %s", params / 1e6, strategy.upper())
    if strategy == "fsdp":
        return shard_model(model, bf16)
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def replicate_fits(model: nn.Module) -> bool:
    """Whether a full copy of the training state (16 bytes a parameter) takes at most a quarter of this process's
    device, leaving the rest to activations and the teacher; always on a CPU."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return True
    state = _TRAINING_BYTES_PER_PARAM * sum(p.numel() for p in model.parameters())
    return state <= torch.cuda.get_device_properties(device).total_memory / 4


def gradient_sync(model: nn.Module, enabled: bool) -> AbstractContextManager:
    """Around a micro-step's forward and backward: whether its gradients are reduced across processes now (the
    last micro-step of an accumulation) or only accumulated locally."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def shard_model(model: nn.Module, bf16: bool) -> nn.Module:
    """Wrap `model` in place with FSDP2: each decoder layer is one unit, the rest (embeddings, head) the root."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in model.get_decoder().layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
