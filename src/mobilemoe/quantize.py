"""The INT4 weight format (PAPER.md): symmetric int4 in [-8, 7], group size 32, fp16 scales.

Quantized: attention q/k/v/o, dense and shared FFNs, every routed expert, the (tied) embedding.
Kept in high precision: the router and expert bias (fp32), norms (16-bit).
"""

from __future__ import annotations

from torch import nn

GROUP_SIZE = 32


def is_quantized_weight(name: str, param: nn.Parameter) -> bool:
    """Whether the INT4 format quantizes this parameter (by its name in `Transformer`)."""
    return param.dim() >= 2 and ".router." not in name


def weight_bytes(model: nn.Module, bits: int = 4, group_size: int = GROUP_SIZE) -> int:
    """Bytes of the weights on device: quantized tensors at `bits` plus one fp16 scale per group;
    router and expert bias in fp32; everything else in 16 bits. bits=16 gives the bf16 size."""
    total = 0
    for name, p in model.named_parameters():
        if bits < 16 and is_quantized_weight(name, p):
            total += p.numel() * bits // 8 + p.numel() // group_size * 2
        else:
            total += p.numel() * (4 if ".router." in name else 2)
    total += sum(b.numel() * 4 for name, b in model.named_buffers() if name.endswith("expert_bias"))
    return total
