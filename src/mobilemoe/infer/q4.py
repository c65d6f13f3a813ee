"""The engine's INT4 weight layout and its 8da4w products (int8 dynamic activations x INT4 weights), and the
8-bit embedding/head's weight-only int8 product (`w8_linear`).

`pack_q4` repacks our INT4 format (quantize.py: [N, K/2] bytes, [N, K/32] fp16 scales) into the layout the
C kernels read (kernels/q8q4.c: blocks of 16 rows whose 4-input slices sit side by side, so one 64-byte
load feeds one integer dot-product instruction per nibble half). The products are the QAT stage's maths:
each input row quantized to int8 per token, asymmetric, as torchao's fake quantizer does; the integer
dot products are exact and only the per-group scaling is floating point.

Every product has two entry points with the same numbers: a direct ctypes call (eager: a few
microseconds) and a torch custom op (`mobilemoe::q4_*`, opaque to torch.compile so a compiled decode
step still captures everything around them). `reference_linear` is the same product in plain torch on
torchao's own fake quantizer, the yardstick of the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mobilemoe.infer.kernels import q8q4_library
from mobilemoe.quantize import GROUP_SIZE, activation_fake_quantizer, dequantize_int4, pack_int4, unpack_int4

ROWS = 16  # rows per block of the layout
CHUNK = 8  # inputs per 64-byte chunk of a block


@dataclass
class Q4Weight:
    """One matrix [N, K] (or a stack [E, N, K]) in the kernels' layout. N is padded to whole blocks."""

    blocks: Tensor  # uint8 [*, N/16, K/8, 64]
    scales: Tensor  # fp16 [*, N/16, K/32, 16]
    corr: Tensor  # fp32 [*, N]: sum over groups of scale * (sum of the group's int4 values), for the zero point
    out_features: int  # N before padding

    @property
    def in_features(self) -> int:
        return self.blocks.shape[-2] * CHUNK

    @property
    def padded_out(self) -> int:
        return self.corr.shape[-1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.blocks, self.scales, self.corr))


def pack_q4(packed: Tensor, scales: Tensor) -> Q4Weight:
    """Our INT4 tensors ([*, N, K/2] uint8, [*, N, K/32] fp16) -> the kernels' layout."""
    q = unpack_int4(packed)  # int8 [*, N, K] in [-8, 7]
    *lead, n, k = q.shape
    pad = -n % ROWS
    if pad:
        q = torch.cat([q, q.new_zeros(*lead, pad, k)], -2)
        scales = torch.cat([scales, scales.new_zeros(*lead, pad, scales.shape[-1])], -2)
    rows = n + pad
    corr = (scales.float() * q.unflatten(-1, (k // GROUP_SIZE, GROUP_SIZE)).sum(-1, dtype=torch.int32).float()).sum(-1)
    u = (q + 8).to(torch.uint8).reshape(*lead, rows // ROWS, ROWS, k // CHUNK, 2, 4)
    u = u.movedim(-4, -3)  # [*, blocks, chunks, 16 rows, 2 halves, 4 inputs]
    blocks = (u[..., 0, :] | (u[..., 1, :] << 4)).reshape(*lead, rows // ROWS, k // CHUNK, ROWS * 4)
    s = scales.reshape(*lead, rows // ROWS, ROWS, k // GROUP_SIZE).transpose(-1, -2)
    return Q4Weight(blocks.contiguous(), s.contiguous(), corr.contiguous(), n)


def unpack_q4(weight: Q4Weight) -> tuple[Tensor, Tensor]:
    """The inverse of `pack_q4`: our INT4 tensors ([*, N, K/2] uint8, [*, N, K/32] fp16), padding dropped."""
    *lead, n_blocks, chunks, _ = weight.blocks.shape
    b = weight.blocks.reshape(*lead, n_blocks, chunks, ROWS, 4)
    u = torch.stack((b & 15, b >> 4), -2)  # [*, blocks, chunks, 16 rows, 2 halves, 4 inputs]
    q = u.movedim(-3, -4).reshape(*lead, n_blocks * ROWS, chunks * CHUNK).to(torch.int8) - 8
    scales = weight.scales.transpose(-1, -2).reshape(*lead, n_blocks * ROWS, -1)
    n = weight.out_features
    return pack_int4(q[..., :n, :]), scales[..., :n, :]


def unpack_q4_rows(weight: Q4Weight, rows: Tensor) -> Tensor:
    """Dequantized rows [*rows.shape, K] (fp32) of a 2-D Q4Weight: the embedding lookup, so the tied table
    needs no second copy in the old layout."""
    block, r = rows // ROWS, rows % ROWS
    k = weight.in_features
    chunks = weight.blocks[block].unflatten(-1, (ROWS, 4))  # [*, K/8, 16, 4]
    picked = chunks.gather(-2, r[..., None, None, None].expand(*r.shape, k // CHUNK, 1, 4)).squeeze(-2)
    values = torch.stack((picked & 15, picked >> 4), -2).reshape(*r.shape, k).to(torch.float32) - 8
    scale = weight.scales[block].gather(-1, r[..., None, None].expand(*r.shape, k // GROUP_SIZE, 1)).squeeze(-1)
    return (values.unflatten(-1, (k // GROUP_SIZE, GROUP_SIZE)) * scale.float().unsqueeze(-1)).flatten(-2)


# --- the products -----------------------------------------------------------------------------------------
def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _linear(x: Tensor, blocks: Tensor, scales: Tensor, corr: Tensor) -> Tensor:
    t, k = x.shape
    y = x.new_empty(t, corr.shape[-1])
    q8q4_library().q4_linear(_ptr(x), t, k, corr.shape[-1], _ptr(blocks), _ptr(scales), _ptr(corr), _ptr(y))
    return y


def _ffn(x: Tensor, gu: list[Tensor], dn: list[Tensor]) -> Tensor:
    t, d = x.shape
    y = torch.empty_like(x)
    q8q4_library().q4_ffn(_ptr(x), t, d, gu[2].shape[-1] // 2, *map(_ptr, gu), *map(_ptr, dn), _ptr(y))
    return y


def _moe(x: Tensor, experts: Tensor, weights: Tensor, gu: list[Tensor], dn: list[Tensor], shared_gu: list[Tensor],
         shared_dn: list[Tensor]) -> Tensor:
    t, d = x.shape
    y = torch.empty_like(x)
    n_experts, two_i = gu[2].shape
    shared_i = shared_gu[2].shape[-1] // 2 if shared_gu else 0
    shared = [*map(_ptr, shared_gu), *map(_ptr, shared_dn)] if shared_gu else [None] * 6
    q8q4_library().q4_moe(_ptr(x), t, d, _ptr(experts), _ptr(weights), experts.shape[1], n_experts, two_i // 2,
                          *map(_ptr, gu), *map(_ptr, dn), shared_i, *shared, _ptr(y))
    return y


def _parts(w: Q4Weight) -> list[Tensor]:
    return [w.blocks, w.scales, w.corr]


def q4_linear(x: Tensor, weight: Q4Weight) -> Tensor:
    """y = 8da4w(x) @ W^T; x [..., K] (any float dtype), y fp32 [..., N]."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    if torch.compiler.is_compiling():
        y = torch.ops.mobilemoe.q4_linear(x2, *_parts(weight))
    else:
        y = _linear(x2, *_parts(weight))
    if weight.padded_out != weight.out_features:
        y = y[:, :weight.out_features]
    return y.view(*x.shape[:-1], weight.out_features)


def q4_ffn(x: Tensor, gate_up: Q4Weight, down: Q4Weight) -> Tensor:
    """A SwiGLU FFN down(silu(gate x) * up x) in one call; gate_up holds the gate rows then the up rows."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    op = torch.ops.mobilemoe.q4_ffn if torch.compiler.is_compiling() else _ffn
    return op(x2, _parts(gate_up), _parts(down)).view(x.shape)


def q4_moe(x: Tensor, experts: Tensor, weights: Tensor, gate_up: Q4Weight, down: Q4Weight,
           shared: tuple[Q4Weight, Q4Weight] | None) -> Tensor:
    """Routed experts (stacked Q4Weights) + optional shared expert after routing, x quantized once, one call."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    args = (x2, experts.contiguous(), weights.float().contiguous(), _parts(gate_up), _parts(down),
            _parts(shared[0]) if shared else [], _parts(shared[1]) if shared else [])
    op = torch.ops.mobilemoe.q4_moe if torch.compiler.is_compiling() else _moe
    return op(*args).view(x.shape)


def w8_linear(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """y = x @ (scales[:, None] * W)^T for int8 rows W [N, K] and fp32 per-row scales [N]: the 8-bit
    embedding/head's weight-only product (x stays float, as QAT trains it). x [..., K]; y fp32 [..., N]."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    op = torch.ops.mobilemoe.w8_linear if torch.compiler.is_compiling() else _w8_linear
    return op(x2, qweight, scales).view(*x.shape[:-1], qweight.shape[0])


def _w8_linear(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    (m, k), n = x.shape, qweight.shape[0]
    y = x.new_empty(m, n)
    q8q4_library().w8_linear(_ptr(x), m, k, n, _ptr(qweight), _ptr(scales), _ptr(y))
    return y


# a KV cache's dtype -> its code in kernels/q8q4.c (KV_F32, KV_F16, KV_I8)
KV_TYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.int8: 2}


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: Tensor, k_scale: Tensor | None = None,
                     v_scale: Tensor | None = None) -> Tensor:
    """One token's attention over cache positions 0 .. length-1 only. q [1, H, 1, hd]; caches
    [1, KVH, max_len, hd] fp32, fp16 or int8 (then with their scales [1, KVH, max_len]; converted to fp32 as
    read); returns [1, H, 1, hd] fp32."""
    op = torch.ops.mobilemoe.attention_decode if torch.compiler.is_compiling() else _attention_decode
    return op(q.float().contiguous(), k_cache, v_cache, length, k_scale, v_scale)


def _attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: Tensor, k_scale: Tensor | None = None,
                      v_scale: Tensor | None = None) -> Tensor:
    _, h, _, hd = q.shape
    out = torch.empty_like(q)
    scales = (None, None) if k_scale is None else (_ptr(k_scale), _ptr(v_scale))
    q8q4_library().attention_decode(_ptr(q), _ptr(k_cache), _ptr(v_cache), *scales, h, k_cache.shape[1], hd,
                                    k_cache.shape[2], int(length), KV_TYPE_CODES[k_cache.dtype], _ptr(out))
    return out


# Custom ops: the same functions, opaque to torch.compile.
torch.library.custom_op("mobilemoe::q4_linear", _linear, mutates_args=())
torch.library.custom_op("mobilemoe::q4_ffn", _ffn, mutates_args=())
torch.library.custom_op("mobilemoe::q4_moe", _moe, mutates_args=())
torch.library.custom_op("mobilemoe::attention_decode", _attention_decode, mutates_args=())
torch.library.custom_op("mobilemoe::w8_linear", _w8_linear, mutates_args=())
torch.library.register_fake("mobilemoe::q4_linear", lambda x, b, s, c: x.new_empty(x.shape[0], c.shape[-1]))
torch.library.register_fake("mobilemoe::q4_ffn", lambda x, gu, dn: torch.empty_like(x))
torch.library.register_fake("mobilemoe::q4_moe", lambda x, e, w, gu, dn, sgu, sdn: torch.empty_like(x))
torch.library.register_fake("mobilemoe::attention_decode", lambda q, k, v, n, ks=None, vs=None: torch.empty_like(q))
torch.library.register_fake("mobilemoe::w8_linear", lambda x, w, s: x.new_empty(x.shape[0], w.shape[0]))


# --- the yardstick --------------------------------------------------------------------------------------
def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels' int8 activations of x [T, K]: (q int8 [T, K], scale fp32 [T], zero point int32 [T])."""
    x = x.float().contiguous()
    t, k = x.shape
    q, scale, zero = torch.empty(t, k, dtype=torch.int8), torch.empty(t), torch.empty(t, dtype=torch.int32)
    q8q4_library().q8_quantize(_ptr(x), t, k, _ptr(q), _ptr(scale), _ptr(zero))
    return q, scale, zero


def reference_linear(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """torchao's fake-quantized activation times the dequantized INT4 weight, in float64."""
    fake = activation_fake_quantizer()(x.float())
    return (fake.double() @ dequantize_int4(packed, scales, torch.float64).T).float()
