"""The few process-group pieces of training: the same loop runs in one process or, under `torchrun` /
`accelerate launch`, as one process per device with FSDP (FSDP2 `fully_shard`: full shard, one unit per
decoder layer plus the root; bf16 params and fp32 gradient reduction when `bf16`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


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


def broadcast_from_main(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (in place)."""
    if world.size > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
