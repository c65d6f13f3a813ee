"""The CPU inference engine: the same `Transformer`, with INT4 modules swapped in, and a static KV cache.

Every product with an INT4 weight is 8da4w, the numbers QAT trained against: the input quantized to int8
per token (asymmetric, torchao's scheme) and multiplied by the INT4 g32 weights in integer arithmetic, on
our own C kernels and weight layout (`infer/q4.py`, `infer/kernels/q8q4.c`; AVX-512 VNNI, AVX-VNNI, AVX2,
NEON sdot or portable C, chosen from the CPU). Activations between the products, the KV cache, norms,
RoPE and routing are fp32.

Few calls per layer: q/k/v are one product, o one, the attention at decode one C call that reads only
the filled part of the KV cache, and a layer's whole FFN one call (a MoE block: the routed experts and the
shared expert, the input quantized once). The decode step can still be captured whole by torch.compile
(`compile_decode`), the kernels being opaque custom ops, which fuses the norms, RoPE and routing around
them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobilemoe.config import ModelConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.infer.q4 import Q4Weight, attention_decode, pack_q4, q4_ffn, q4_linear, q4_moe, unpack_q4_rows
from mobilemoe.model import Attention, FeedForward, ModelOutput, MoE, Transformer, rope_frequencies
from mobilemoe.moe import Router
from mobilemoe.quantize import GROUP_SIZE

COMPUTE_DTYPE = torch.float32  # activations and KV cache between the 8da4w products


class Int4Linear(nn.Module):
    """8da4w linear; several (packed, scales) pairs make one fused linear whose outputs are concatenated."""

    def __init__(self, *pairs: tuple[Tensor, Tensor]):
        super().__init__()
        self.weight = pack_q4(torch.cat([p for p, _ in pairs]), torch.cat([s for _, s in pairs]))
        self.out_features = self.weight.out_features

    def forward(self, x: Tensor) -> Tensor:
        return q4_linear(x, self.weight)


class Int4Embedding(nn.Module):
    """Row lookup from an INT4 table in the kernels' layout (only the looked-up rows are dequantized); the
    tied output head shares the same weight."""

    def __init__(self, weight: Q4Weight):
        super().__init__()
        self.weight = weight

    def forward(self, tokens: Tensor) -> Tensor:
        return unpack_q4_rows(self.weight, tokens)


class Int8Head(nn.Module):
    """The tied embedding/head kept at 8 bits (`quantize.Int4Scheme(embedding_bits=8)`: int8 per row): the
    logits are weight-only int8 products on torch's own CPU kernel (`_weight_int8pack_mm`), the lookup
    dequantizes only the looked-up rows."""

    def __init__(self, qweight: Tensor, scales: Tensor):
        super().__init__()
        self.qweight, self.scales = qweight.contiguous(), scales.float().flatten().contiguous()
        self.out_features = qweight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).float().contiguous(), self.qweight, self.scales)
        return y.view(*x.shape[:-1], self.out_features)

    def rows(self, tokens: Tensor) -> Tensor:
        return self.qweight[tokens].float() * self.scales[tokens, None]


class Int8Embedding(nn.Module):
    def __init__(self, head: Int8Head):
        super().__init__()
        self.head = head

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head.rows(tokens)


class Int4Attention(Attention):
    """`Attention` with q, k and v as one 8da4w product; decode attention reads only the filled cache."""

    def __init__(self, cfg: ModelConfig, qkv_proj: Int4Linear, o_proj: Int4Linear):
        with torch.device("meta"):
            super().__init__(cfg)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.qkv_sizes = [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        cache = self.kv_cache
        if cache is None or input_pos is None:
            return super().attend(q, k, v, mask, input_pos)
        k_all, v_all = cache.update(input_pos, k.to(cache.k.dtype), v.to(cache.v.dtype))
        if q.shape[0] == 1 and q.shape[2] == 1 and k_all.dtype == torch.float32:
            return attention_decode(q, k_all, v_all, input_pos[-1] + 1)
        end = int(input_pos[-1]) + 1  # prefill (eager): attend to the filled part only
        k_all, v_all = k_all[:, :, :end].to(q.dtype), v_all[:, :, :end].to(q.dtype)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=None if mask is None else mask[..., :end],
                                              enable_gqa=True)


class Int4FeedForward(nn.Module):
    """SwiGLU in one call: gate and up one product, SwiGLU, the hidden quantized, down."""

    def __init__(self, gate_up: Q4Weight, down: Q4Weight):
        super().__init__()
        self.gate_up, self.down = gate_up, down

    def forward(self, x: Tensor) -> Tensor:
        return q4_ffn(x, self.gate_up, self.down)


class Int4MoE(nn.Module):
    """INT4 MoE layer: route (fp32), then routed experts and shared expert in one call."""

    def __init__(self, cfg: ModelConfig, router: Router, gate_up: tuple[Tensor, Tensor],
                 down: tuple[Tensor, Tensor], shared: Int4FeedForward | None):
        super().__init__()
        self.cfg = cfg
        self.router = router.float()
        self.gate_up, self.down = pack_q4(*gate_up), pack_q4(*down)
        self.shared_expert = shared

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        r = self.router(x)
        shared = (self.shared_expert.gate_up, self.shared_expert.down) if self.shared_expert is not None else None
        y = q4_moe(x, r.experts, r.weights, self.gate_up, self.down, shared)
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
    model.lm_head = _head(q("embed.weight" if cfg.tie_embeddings else "lm_head.weight"))
    table = model.lm_head if cfg.tie_embeddings else _head(q("embed.weight"))
    model.embed = Int8Embedding(table) if isinstance(table, Int8Head) else Int4Embedding(table.weight)
    model.inv_freq = rope_frequencies(cfg)
    return model.eval()


def _head(pair: tuple[Tensor, Tensor]) -> Int4Linear | Int8Head:
    """An output head (or embedding table) from its stored weights: INT4, or int8 rows when kept at 8 bits."""
    return Int8Head(*pair) if pair[0].dtype == torch.int8 else Int4Linear(pair)


def _int4_ffn(name: str, q: Callable[[str], tuple[Tensor, Tensor]]) -> Int4FeedForward:
    gate_up = [q(f"{name}.{p}.weight") for p in ("gate_proj", "up_proj")]
    return Int4FeedForward(pack_q4(torch.cat([p for p, _ in gate_up]), torch.cat([s for _, s in gate_up])),
                           pack_q4(*q(f"{name}.down_proj.weight")))


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
