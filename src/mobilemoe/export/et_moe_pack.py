"""Weights of ExecuTorch's fused MoE op `llama::quantized_moe_ffn`, packed from our INT4 storage format.

The op (ExecuTorch 1.5.1, `extension/llm/custom_ops/op_moe.cpp`) reads each expert's matrix [N, K] as one
blob in torchao's "universal" layout for 8-bit-activation x low-bit-weight linears: a 64-byte
`PackedWeightsHeader` then `torchao::weight_packing::pack_weights<4, nr=8, kr=16, sr=2>`. ExecuTorch's own
source transform (`examples/models/llama/source_transformation/moe.py`) packs with
`torch.ops.torchao._pack_8bit_act_4bit_weight`, which lives in torchao's CPU kernel library; the pip wheel of
torchao 0.18.0 does not ship that library (`_is_kernel_library_loaded()` is False), so the layout is written
here by hand, following torchao's `torch_free_kernels/weight_packing/weight_packing.h` and the fallback
`bitpacking/bitpack.h` / `uint4.h` (documented as byte-compatible with the aarch64 NEON packer). The op's x86
build unpacks it with torchao's own `unpack_weights` (tests check the op against a dequantized reference).

Layout of one matrix, rows taken 8 at a time (nr) and each K group in 16-wide chunks (kr):
  for each block of 8 rows, for each group g:
    for each 16-wide chunk c of g: 64 bytes = 128 int4 values
        order: split the chunk in sr=2 halves of 8; half 0 of rows 0..7, then half 1 of rows 0..7
        (torchao `pack_values`); values stored as u = q + 8; every run of 32 values u[0..31] becomes
        16 bytes byte[i] = (u[i + 16] << 4) | u[i]
    8 fp32 scales (one per row), 8 int32 sums of the group's signed values (one per row)
"""

from __future__ import annotations

import torch
from torch import Tensor

from mobilemoe.quantize import unpack_int4

HEADER_BYTES = 64
_MAGIC = 6712  # torchao::ops::PackedWeightsHeader::magic
_LINEAR_8BIT_ACT_XBIT_WEIGHT_UNIVERSAL = 1  # torchao::ops::PackedWeightsType
NR, KR, SR = 8, 16, 2  # the (nr, kr, sr) the op's reference path and torchao's 1x8x16 neondot kernel read


def _header(weight_nbit: int) -> Tensor:
    """PackedWeightsHeader: magic, type, then params (weight_nbit, has_weight_zeros, has_bias, nr, kr, sr), int32."""
    fields = torch.zeros(HEADER_BYTES // 4, dtype=torch.int32)
    fields[:8] = torch.tensor([_MAGIC, _LINEAR_8BIT_ACT_XBIT_WEIGHT_UNIVERSAL, weight_nbit, 0, 0, NR, KR, SR])
    return fields.view(torch.uint8)


def pack_linear_int4(q: Tensor, scales: Tensor) -> Tensor:
    """One [N, K] INT4 matrix (signed values in [-8, 7], scales [N, K / group]) -> the op's uint8 blob."""
    n, k = q.shape
    groups = scales.shape[1]
    group_size = k // groups
    if k % groups or group_size % KR:
        raise ValueError(f"K={k} with {groups} groups: the group size must be a multiple of {KR}")
    pad = -n % NR  # torchao pads the last row block with zero rows
    q = torch.cat([q.to(torch.int8), q.new_zeros(pad, k, dtype=torch.int8)])
    scales = torch.cat([scales.float(), scales.new_zeros(pad, groups, dtype=torch.float32)])
    blocks = (n + pad) // NR
    # [block, row j, group, chunk, half, 8] -> [block, group, chunk, half, row j, 8]: pack_values' order.
    chunks = q.reshape(blocks, NR, groups, group_size // KR, SR, KR // SR).permute(0, 2, 3, 4, 1, 5)
    u = (chunks.reshape(blocks, groups, group_size // KR, -1, 32).to(torch.int32) + 8).to(torch.uint8)
    values = (u[..., 16:] << 4) | u[..., :16]  # [block, group, chunk, 4 runs, 16 bytes]
    values = values.reshape(blocks, groups, -1)
    group_scales = scales.reshape(blocks, NR, groups).transpose(1, 2).contiguous()
    group_sums = q.reshape(blocks, NR, groups, group_size).sum(-1, dtype=torch.int32).transpose(1, 2).contiguous()
    body = torch.cat([values, group_scales.view(torch.uint8), group_sums.view(torch.uint8)], dim=-1)
    return torch.cat([_header(4), body.reshape(-1)])


def pack_experts(packed: Tensor, scales: Tensor) -> Tensor:
    """Stacked experts in our INT4 format (packed uint8 [E, N, K/2], scales [E, N, K/group]) -> [E, bytes]."""
    q = unpack_int4(packed)
    return torch.stack([pack_linear_int4(q[e], scales[e]) for e in range(q.shape[0])])
