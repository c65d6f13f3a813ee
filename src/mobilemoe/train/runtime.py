"""Where and how the trainer computes: device, precision, torch.compile, activation checkpointing, optimizer.

A recipe (or `mobilemoe train` flags) chooses them:

    device: auto                     # auto (cuda when torch sees a GPU, else cpu) | cpu | cuda
    precision: bf16                  # fp32 | bf16: bf16 compute, fp32 master weights and optimizer state
    compile: true                    # torch.compile each transformer block
    activation_checkpointing: true   # keep only each block's input; recompute the rest in backward

They are applied to the model in torchtitan's order: activation checkpointing wraps each block, compile compiles
each (wrapped) block in place, then DDP or FSDP2 wraps the model (`parallel.wrap_model`). bf16 is autocast
around forward and loss, except under FSDP2, whose mixed-precision policy casts the gathered parameters to bf16
at each block and reduces gradients in fp32 (autocast would only re-cast what is bf16 already). Either way the
optimizer updates fp32 weights with fp32 state. AdamW is torch's fused implementation (one kernel per step for
all parameters) on both CPU and CUDA, the devices it has kernels for.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mobilemoe.errors import MobileMoEError

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: Precision = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp_mixed_precision: bool = False  # bf16 under FSDP2: the sharding's policy casts, not autocast

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward (and loss) context: bf16 autocast on the run's device, or nothing."""
        enabled = self.precision == "bf16" and not self.fsdp_mixed_precision
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def describe(self) -> str:
        extras = [name for name, on in (("compile", self.compile), ("activation checkpointing",
                                                                    self.activation_checkpointing)) if on]
        mixed = " (FSDP2 mixed precision)" if self.fsdp_mixed_precision else " autocast" * (self.precision == "bf16")
        return f"{self.device.type} {self.precision}{mixed}" + "".join(f", {e}" for e in extras)


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu` or `cuda` as this process's device; under torchrun each process takes GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise MobileMoEError(f"unknown device '{name}': use auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise MobileMoEError(f"device cuda was asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                             "train with --device cpu (or auto), or install a CUDA build of torch")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def prepare_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Move `model` to the runtime's device and apply activation checkpointing and compile to each block, in
    place (parameter names and state dicts keep the plain Transformer's keys). Data parallelism comes after."""
    model.to(runtime.device)
    if runtime.activation_checkpointing:
        # torch's wrapper around torch.utils.checkpoint (non-reentrant), as torchtitan applies it; its state-dict
        # hooks drop the wrapper's prefix. No dropout in the model, so the RNG state needs no replay.
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                 preserve_rng_state=False)
    if runtime.compile:
        # Per block rather than the whole model: every block has the same code, so the compiled graph is reused
        # and compile time does not grow with depth (torchtitan does the same).
        for block in model.layers:
            block.compile()
    return model


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float
                    ) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused (CPU and CUDA both have the kernel)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, fused=True)
