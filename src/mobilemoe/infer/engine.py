"""The CPU inference engine: the same `Transformer`, with INT4 modules swapped in, and a static KV cache.

INT4 weights (group 32, fp16 scales — the QAT output format) run through aten's CPU int4 kernel
(`_weight_int4pack_mm_for_cpu`, bf16 activations). The MoE layer is written by hand because no library
in our stack has a fused fine-grained MoE for CPU: it routes in fp32, sorts the token->expert
assignments by expert and runs each expert's contiguous block through one fused gate+up int4 matmul,
SwiGLU, one down int4 matmul, and a weighted scatter-add. At decode (one token) this touches exactly
the top-k experts' weights plus the shared expert, i.e. 2k+2 kernel calls per layer, so the bytes read
per token are the *active* weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobilemoe.config import ModelConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import MoE, Transformer, rope_frequencies
from mobilemoe.moe import route_tokens
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


def int4_matmul(x: Tensor, weight: Tensor, scales_zeros: Tensor) -> Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, GROUP_SIZE, scales_zeros)


class Int4Linear(nn.Module):
    def __init__(self, packed: Tensor, scales: Tensor):
        super().__init__()
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
        self.packed, self.scales = packed, scales

    def forward(self, tokens: Tensor) -> Tensor:
        rows, scales = self.packed[tokens], self.scales[tokens].to(COMPUTE_DTYPE)
        q = unpack_int4(rows).to(COMPUTE_DTYPE)
        return (q.unflatten(-1, (scales.shape[-1], GROUP_SIZE)) * scales.unsqueeze(-1)).flatten(-2)


class Int4MoE(nn.Module):
    """Fused INT4 MoE: route (fp32) -> sort by expert -> per expert block gate_up, SwiGLU, down -> scatter."""

    def __init__(self, cfg: ModelConfig, router: Tensor, expert_bias: Tensor, gate_up: tuple[Tensor, Tensor],
                 down: tuple[Tensor, Tensor], shared: nn.Module | None):
        super().__init__()
        self.cfg = cfg
        self.router_weight, self.expert_bias = router.float(), expert_bias.float()
        self.gate_up = [pack_for_cpu_kernel(p, s) for p, s in zip(*gate_up, strict=True)]
        self.down = [pack_for_cpu_kernel(p, s) for p, s in zip(*down, strict=True)]
        self.shared_expert = shared

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        c = self.cfg
        r = route_tokens(x, self.router_weight, self.expert_bias, c.top_k, c.router, c.norm_topk_prob,
                         c.routed_scaling_factor, 0.0, 0.0)
        if x.shape[0] == 1:  # decode: just the k chosen experts, no sort or scatter
            y = sum(w * self._expert(int(e), x) for e, w in zip(r.experts[0].tolist(),
                                                                r.weights[0].to(COMPUTE_DTYPE), strict=True))
            if self.shared_expert is not None:
                y = y + self.shared_expert(x)
            return y.view(shape), torch.zeros(()), r.load
        flat = r.experts.flatten()
        order = torch.argsort(flat, stable=True)
        token_of_slot = order // c.top_k
        slot_weights = r.weights.flatten()[order].unsqueeze(-1).to(COMPUTE_DTYPE)
        out = torch.empty(order.numel(), shape[-1], dtype=COMPUTE_DTYPE)
        start = 0
        for expert, count in zip(*torch.unique_consecutive(flat[order], return_counts=True), strict=True):
            end = start + int(count)
            out[start:end] = self._expert(int(expert), x[token_of_slot[start:end]])
            start = end
        y = torch.zeros_like(x).index_add_(0, token_of_slot, out * slot_weights)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y.view(shape), torch.zeros(()), r.load

    def _expert(self, expert: int, x: Tensor) -> Tensor:
        """SwiGLU expert on a block of tokens: one fused gate+up int4 matmul, one down int4 matmul."""
        gate, up = int4_matmul(x, *self.gate_up[expert]).chunk(2, dim=-1)
        return int4_matmul(F.silu(gate) * up, *self.down[expert])


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
            shared = None
            if module.shared_expert is not None:
                shared = _int4_ffn(module.shared_expert, f"{name}.shared_expert", q)
            setattr(parent, attr, Int4MoE(cfg, tensors[f"{name}.router.weight"], tensors[f"{name}.expert_bias"],
                                          _stacked(q(f"{name}.gate_up_proj")), _stacked(q(f"{name}.down_proj")),
                                          shared))
        elif isinstance(module, nn.Linear) and ".shared_expert." not in name and ".router" not in name:
            setattr(parent, attr, Int4Linear(*q(f"{name}.weight")))
        elif isinstance(module, nn.RMSNorm):
            norm = nn.RMSNorm(module.normalized_shape, eps=module.eps, device="cpu", dtype=COMPUTE_DTYPE)
            norm.weight.data.copy_(tensors[f"{name}.weight"])
            setattr(parent, attr, norm)
    model.embed = Int4Embedding(*q("embed.weight"))
    if cfg.tie_embeddings:
        model.lm_head = Int4Linear(*q("embed.weight"))
    model.inv_freq = rope_frequencies(cfg)
    return model.eval()


def _stacked(pair: tuple[Tensor, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    return list(pair[0].unbind(0)), list(pair[1].unbind(0))


def _int4_ffn(ffn: nn.Module, name: str, q) -> nn.Module:
    for attr in ("gate_proj", "up_proj", "down_proj"):
        setattr(ffn, attr, Int4Linear(*q(f"{name}.{attr}.weight")))
    return ffn


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
    from mobilemoe.data.tokenizer import Tokenizer

    directory = Path(source)
    cfg = load_config(directory)
    tensors, meta = read_tensors(directory / "model.safetensors")
    if meta.get("quantization") != INT4_FORMAT:
        raise MobileMoEError(f"{directory} holds float weights, not INT4: use the QAT stage's final/ directory, "
                             "or drop --int4 to run it in float")
    tok = directory / "tokenizer.json"
    return build_int4_model(cfg, tensors), (Tokenizer.load(tok) if tok.is_file() else None)
