"""The INT4 weight format (PAPER.md): symmetric int4 in [-8, 7], group size 32, fp16 scales.

Quantized: attention q/k/v/o, dense and shared FFNs, every routed expert, the (tied) embedding.
Kept in high precision: the router and expert bias (fp32), norms (16-bit).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mobilemoe.errors import MobileMoEError

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


# --- the INT4 storage format ------------------------------------------------------------------------
def quantize_int4(weight: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """Symmetric per-group INT4 of the last dim: (packed uint8 [..., K/2], fp16 scales [..., K/group]).

    Scales and rounding are torchao's own (`get_group_qparams_symmetric` + `quantize_affine`, fp16
    scales), the same maths as the QAT fake quantizer, so a QAT model converts to exactly what it
    trained against. Two values per byte: even index in the low nibble, stored as q + 8.
    """
    from torchao.quantization.quant_primitives import quantize_affine
    from torchao.quantization.utils import get_group_qparams_symmetric

    *lead, k = weight.shape
    if k % group_size:
        raise MobileMoEError(f"INT4 g{group_size}: the input dimension {k} is not a multiple of the group size")
    rows = weight.detach().float().reshape(-1, k)
    scales, zeros = get_group_qparams_symmetric(rows, 4, group_size, torch.float16)
    q = quantize_affine(rows, (1, group_size), scales, zeros, torch.int8, -8, 7)
    return pack_int4(q.reshape(*lead, k)), scales.reshape(*lead, k // group_size)


def pack_int4(q: Tensor) -> Tensor:
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    low, high = (packed & 0xF).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize_int4(packed: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    q = unpack_int4(packed)
    *lead, k = q.shape
    groups = q.reshape(*lead, scales.shape[-1], -1).to(dtype) * scales.unsqueeze(-1).to(dtype)
    return groups.reshape(*lead, k)
