"""torch.distributed for the trainer: process group from torchrun's environment, DDP or FSDP2 wrapping,
and full (unsharded) state dicts for checkpoints. gloo on CPU, nccl on GPU.

Multi-node: run the same command on every node with
    torchrun --nnodes N --node_rank R --nproc_per_node P --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m mobilemoe train recipes/<name>.yaml --out runs/<name> [--parallel fsdp]
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mobilemoe.errors import MobileMoEError


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: torch.device | None = None) -> World:
    """Join the process group torchrun describes (nccl for CUDA, gloo for CPU); a plain `python` launch is a
    world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    cuda = device is not None and device.type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if not cuda:  # share the CPU cores between the processes on this node instead of oversubscribing them
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return World(dist.get_rank(), dist.get_world_size())


def wrap_model(model: nn.Module, world: World, mode: str, bf16: bool = False) -> nn.Module:
    """DDP, or FSDP2 per block then the root (torchtitan's layout). `bf16` under FSDP2: the mixed-precision
    policy gathers bf16 parameters for compute and reduce-scatters gradients in fp32 into the fp32 shards."""
    if not world.distributed:
        return model
    if mode == "ddp":
        # Buffers are kept in sync by the trainer (expert load is all-reduced before the bias update);
        # DDP's buffer broadcast would overwrite each rank's own expert-load counts.
        return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    raise MobileMoEError(f"unknown --parallel mode '{mode}': use ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(unwrap(model), options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optimizer_state: dict | None) -> None:
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(unwrap(model), model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(unwrap(model), optimizer, optimizer_state, options=options)
