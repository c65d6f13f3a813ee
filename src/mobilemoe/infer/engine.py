"""The CPU inference engine: the same `Transformer`, with INT4 modules swapped in, and a static KV cache.

INT4 weights (group 32, fp16 scales — the QAT output format) run through aten's CPU int4 kernel
(`_weight_int4pack_mm_for_cpu`, bf16 activations). Every call of that kernel costs tens of
microseconds whatever the matrix size, so the engine makes as few as it can: q/k/v are one matmul,
gate/up of every SwiGLU are one matmul, and the decode step can be captured whole by torch.compile
(`compile_decode`), which fuses the norms, RoPE, routing and residuals around the int4 calls.

The routed experts are a custom op (`mobilemoe::int4_experts`), written by hand because no library in
our stack has a fused fine-grained MoE for CPU; as an opaque op it lets torch.compile capture the
decode step in one graph. It takes the experts' weights stacked ([E, N, K/2]); at decode (one token) it
runs exactly the top-k experts in one call of our C kernel (`infer/kernels/moe_decode.c`, on the same
packed bytes), so the bytes read per token are the *active* weights; at prefill it sorts the
token->expert assignments by expert and runs each expert's contiguous block through one gate+up and one
down aten matmul, then a weighted scatter-add.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobilemoe.config import ModelConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Attention, FeedForward, ModelOutput, MoE, Transformer, rope_frequencies
from mobilemoe.moe import Router
from mobilemoe.quantize import GROUP_SIZE, unpack_int4

COMPUTE_DTYPE = torch.bfloat16  # what aten's CPU int4 kernel takes as activations


def pack_for_cpu_kernel(packed: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Our INT4 tensors ([N, K/2] uint8, [N, K/32] fp16) -> aten's int4pack weight and scales-and-zeros.

    aten computes w = (u - 8) * scale + zero for unsigned nibbles u; ours store q + 8, so zero = 0.
    """
    unsigned = unpack_int4(packed).to(torch.int32) + 8
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    s = scales.float().t().contiguous()
    return weight, torch.stack((s, torch.zeros_like(s)), -1).to(COMPUTE_DTYPE)


def pack_stacked_for_cpu_kernel(packed: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Stacked expert weights [E, N, K/2] / [E, N, K/32] -> stacked aten int4pack tensors, filled expert by
    expert so loading never holds two copies of all experts."""
    first_weight, first_sz = pack_for_cpu_kernel(packed[0], scales[0])
    weight = first_weight.new_empty((packed.shape[0], *first_weight.shape))
    sz = first_sz.new_empty((packed.shape[0], *first_sz.shape))
    weight[0], sz[0] = first_weight, first_sz
    for e in range(1, packed.shape[0]):
        weight[e], sz[e] = pack_for_cpu_kernel(packed[e], scales[e])
    return weight, sz


def int4_matmul(x: Tensor, weight: Tensor, scales_zeros: Tensor) -> Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, GROUP_SIZE, scales_zeros)


@torch.library.custom_op("mobilemoe::int4_experts", mutates_args=())
def int4_experts(x: Tensor, experts: Tensor, weights: Tensor, gate_up: Tensor, gate_up_sz: Tensor,
                 down: Tensor, down_sz: Tensor) -> Tensor:
    """y[t] = sum_j weights[t, j] * SwiGLU_{experts[t, j]}(x[t]) on stacked int4pack expert weights.

    x [T, D] bf16; experts [T, k] int64; weights [T, k] fp32; returns [T, D] bf16. One token (decode)
    goes through our C kernel where it applies (one call for all k experts), else through aten.
    """
    if x.shape[0] == 1 and (kernel := _moe_decode_kernel(x, gate_up, down)) is not None:
        top_k, d, i = experts.shape[1], x.shape[1], gate_up.shape[1] // 2
        x32, chosen, w32 = x.float().contiguous(), experts.contiguous(), weights.float().contiguous()
        hidden, y = torch.empty(top_k * 2 * i), torch.empty(1, d)
        kernel.moe_decode(x32.data_ptr(), chosen.data_ptr(), w32.data_ptr(), top_k, d, i, gate_up.data_ptr(),
                          gate_up_sz.data_ptr(), down.data_ptr(), down_sz.data_ptr(), hidden.data_ptr(), y.data_ptr())
        return y.to(x.dtype)
    return experts_sorted(x, experts, weights, gate_up, gate_up_sz, down, down_sz)


def experts_sorted(x: Tensor, experts: Tensor, weights: Tensor, gate_up: Tensor, gate_up_sz: Tensor,
                   down: Tensor, down_sz: Tensor) -> Tensor:
    """The aten path: token->expert assignments sorted by expert, each expert's contiguous block through
    one gate+up and one down int4 matmul, then a weighted scatter-add. At one token that is exactly the
    top-k experts, 2 calls each."""
    top_k = experts.shape[1]
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    token_of_slot = order // top_k
    out = x.new_empty(order.numel(), x.shape[-1])
    start = 0
    for e, count in zip(*torch.unique_consecutive(flat[order], return_counts=True), strict=True):
        end = start + int(count)
        gate, up = int4_matmul(x[token_of_slot[start:end]], gate_up[e], gate_up_sz[e]).chunk(2, dim=-1)
        out[start:end] = int4_matmul(F.silu(gate) * up, down[e], down_sz[e])
        start = end
    out *= weights.flatten()[order].unsqueeze(-1).to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_slot, out)


def _moe_decode_kernel(x: Tensor, gate_up: Tensor, down: Tensor):
    """Our C decode kernel when it applies: AVX-512 layout, whole 64-row blocks, whole 32-value groups."""
    from mobilemoe.infer.kernels import moe_decode_kernel

    d, two_i = x.shape[1], gate_up.shape[1]
    if d % 64 or two_i % 64 or (two_i // 2) % 32 or down.shape[1] != d:
        return None
    return moe_decode_kernel()


@int4_experts.register_fake
def _(x: Tensor, experts: Tensor, weights: Tensor, gate_up: Tensor, gate_up_sz: Tensor, down: Tensor,
      down_sz: Tensor) -> Tensor:
    return torch.empty_like(x)


class Int4Linear(nn.Module):
    """INT4 linear; several (packed, scales) pairs make one fused linear whose outputs are concatenated."""

    def __init__(self, *pairs: tuple[Tensor, Tensor]):
        super().__init__()
        packed, scales = torch.cat([p for p, _ in pairs]), torch.cat([s for _, s in pairs])
        self.out_features = packed.shape[0]
        self.weight, self.scales_zeros = pack_for_cpu_kernel(packed, scales)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = int4_matmul(x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE), self.weight, self.scales_zeros)
        return y.view(*shape[:-1], self.out_features)


class Int4Embedding(nn.Module):
    """Row lookup from the INT4 table (only the looked-up rows are dequantized)."""

    def __init__(self, packed: Tensor, scales: Tensor):
        super().__init__()
        self.packed, self.scales = packed, scales.float()  # fp32 scales: no fp16/bf16 mix in compiled code

    def forward(self, tokens: Tensor) -> Tensor:
        rows, scales = self.packed[tokens], self.scales[tokens]
        q = unpack_int4(rows).float()
        return (q.unflatten(-1, (scales.shape[-1], GROUP_SIZE)) * scales.unsqueeze(-1)).flatten(-2).to(COMPUTE_DTYPE)


class Int4Attention(Attention):
    """`Attention` with q, k and v as one INT4 matmul."""

    def __init__(self, cfg: ModelConfig, qkv_proj: Int4Linear, o_proj: Int4Linear):
        with torch.device("meta"):
            super().__init__(cfg)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.qkv_sizes = [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        return q, k, v


class Int4FeedForward(nn.Module):
    """SwiGLU with gate and up as one INT4 matmul."""

    def __init__(self, gate_up_proj: Int4Linear, down_proj: Int4Linear):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Int4MoE(nn.Module):
    """INT4 MoE layer: route (fp32), routed experts through `int4_experts`, plus the shared expert."""

    def __init__(self, cfg: ModelConfig, router: Router, gate_up: tuple[Tensor, Tensor],
                 down: tuple[Tensor, Tensor], shared: Int4FeedForward | None):
        super().__init__()
        self.cfg = cfg
        self.router = router.float()
        self.gate_up, self.gate_up_sz = pack_stacked_for_cpu_kernel(*gate_up)
        self.down, self.down_sz = pack_stacked_for_cpu_kernel(*down)
        self.shared_expert = shared

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        r = self.router(x)
        y = int4_experts(x, r.experts, r.weights, self.gate_up, self.gate_up_sz, self.down, self.down_sz)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y.view(shape), torch.zeros(()), r.load


def compile_decode(model: Transformer) -> Callable[..., ModelOutput]:
    """The one-token decode step captured by torch.compile (static shapes: one graph, compiled at the
    first call, ~10-60 s on two cores). Prefill stays eager: its length changes from prompt to prompt.

    Every (model shape, cache length) pair is its own graph of the one `Transformer.forward`; dynamo's
    default limit of 8 graphs per function would silently run the rest eagerly (e.g. a bench of 4 presets
    at 3 contexts), so the limit is raised."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model, dynamic=False)


def build_int4_model(cfg: ModelConfig, tensors: dict[str, Tensor]) -> Transformer:
    """A `Transformer` whose weights are INT4 modules, from INT4 checkpoint tensors (`name.qweight` /
    `name.scales` for quantized weights, plain tensors for the rest). Built on the meta device first, so
    no float copy of the weights is ever allocated."""

    def q(name: str) -> tuple[Tensor, Tensor]:
        try:
            return tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
        except KeyError:
            raise MobileMoEError(f"INT4 weights for '{name}' are missing: the checkpoint is not an INT4 checkpoint "
                                 "of this config (quantize it with `--int4` from a float checkpoint, or pass "
                                 "the QAT stage's final/ directory)") from None

    with torch.device("meta"):
        model = Transformer(cfg)
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, MoE):
            shared = _int4_ffn(f"{name}.shared_expert", q) if module.shared_expert is not None else None
            router = module.router.to_empty(device="cpu")  # filled from the checkpoint, never initialised
            router.load_state_dict({key: tensors[f"{name}.router.{key}"] for key in router.state_dict()})
            setattr(parent, attr, Int4MoE(cfg, router, q(f"{name}.gate_up_proj"), q(f"{name}.down_proj"), shared))
        elif isinstance(module, FeedForward) and ".shared_expert" not in name:
            setattr(parent, attr, _int4_ffn(name, q))
        elif isinstance(module, Attention):
            qkv = Int4Linear(*(q(f"{name}.{p}.weight") for p in ("q_proj", "k_proj", "v_proj")))
            setattr(parent, attr, Int4Attention(cfg, qkv, Int4Linear(q(f"{name}.o_proj.weight"))))
        elif isinstance(module, nn.RMSNorm):
            norm = nn.RMSNorm(module.normalized_shape, eps=module.eps, device="cpu", dtype=COMPUTE_DTYPE)
            norm.weight.data.copy_(tensors[f"{name}.weight"])
            setattr(parent, attr, norm)
    model.embed = Int4Embedding(*q("embed.weight"))
    model.lm_head = Int4Linear(q("embed.weight" if cfg.tie_embeddings else "lm_head.weight"))
    model.inv_freq = rope_frequencies(cfg)
    return model.eval()


def _int4_ffn(name: str, q: Callable[[str], tuple[Tensor, Tensor]]) -> Int4FeedForward:
    gate_up = Int4Linear(q(f"{name}.gate_proj.weight"), q(f"{name}.up_proj.weight"))
    return Int4FeedForward(gate_up, Int4Linear(q(f"{name}.down_proj.weight")))


def random_int4_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """INT4 checkpoint tensors with random values for a preset, made directly in the INT4 format (a
    billion-parameter model never exists in float), for speed and memory benchmarks."""
    from mobilemoe.model import build_on_meta
    from mobilemoe.quantize import is_quantized_weight

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    model = build_on_meta(cfg)
    params = dict(model.named_parameters())
    for name, t in model.state_dict().items():
        if name in params and is_quantized_weight(name, params[name]):
            *lead, k = t.shape
            tensors[f"{name}.qweight"] = torch.randint(0, 256, (*lead, k // 2), dtype=torch.uint8, generator=g)
            tensors[f"{name}.scales"] = torch.full((*lead, k // GROUP_SIZE), 0.02 / 4, dtype=torch.float16)
        elif name.endswith("expert_bias"):
            tensors[name] = torch.zeros(t.shape)
        elif t.dim() >= 2:
            tensors[name] = torch.randn(t.shape, generator=g) * 0.02
        else:
            tensors[name] = torch.ones(t.shape)
    return tensors


def load_int4_model(source: str | Path) -> tuple[Transformer, object | None]:
    """An INT4 engine model from an INT4 checkpoint directory (tokenizer too, if present)."""
    from mobilemoe.checkpoint import INT4_FORMAT, load_config, read_tensors
    from mobilemoe.tokenizer import Tokenizer

    directory = Path(source)
    cfg = load_config(directory)
    tensors, meta = read_tensors(directory / "model.safetensors")
    if meta.get("quantization") != INT4_FORMAT:
        raise MobileMoEError(f"{directory} holds float weights, not INT4: use the QAT stage's final/ directory, "
                             "or drop --int4 to run it in float")
    tok = directory / "tokenizer.json"
    return build_int4_model(cfg, tensors), (Tokenizer.load(tok) if tok.is_file() else None)
