"""The MobileMoE / MobileLLM transformer, top to bottom.

Decoder-only: tied token embedding -> n_layers x [RMSNorm -> GQA attention (RoPE, optional QK-norm)
-> residual -> RMSNorm -> FFN (dense SwiGLU or MoE) -> residual] -> RMSNorm -> logits.
The MoE FFN is fine-grained routed experts stored stacked (see moe.py) plus optional shared experts.
An optional static KV cache (gpt-fast style) serves decoding; training never sets it up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobilemoe.config import ModelConfig
from mobilemoe.moe import Router, run_experts

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: Tensor
    loss: Tensor | None = None  # lm loss + auxiliary router losses, what the trainer backpropagates
    lm_loss: Tensor | None = None  # cross entropy only, what is reported and compared
    expert_load: Tensor | None = None  # [n_moe_layers, E] token assignments per expert in this forward


def rope_frequencies(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies [head_dim/2], with llama3-style scaling when configured."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the transformers/NeoX layout). x [B, H, T, hd]; cos/sin [T, hd] or [B, 1, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only these batch rows (the others' sequences have finished)."""
        self.k, self.v = self.k[rows], self.v[rows]

    def filled(self, end: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions 0 .. end-1, as attention reads them."""
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qk_norm, self.eps = cfg.qk_norm, cfg.norm_eps
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # RMSNorm without a learned scale
            q = F.rms_norm(q, (self.head_dim,), eps=self.eps)
            k = F.rms_norm(k, (self.head_dim,), eps=self.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q, k, v, mask, input_pos)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        """Softmax attention [B, H, T, hd], through the KV cache when there is one (the engine overrides this)."""
        if self.kv_cache is not None and input_pos is not None:  # a forward without positions ignores the cache
            k, v = self.kv_cache.update(input_pos, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v projections (the inference engine overrides this with one fused matmul)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Fine-grained routed experts (stacked weights) + optional shared experts, token-choice top-k."""

    # The expert computation; benchmarks swap in `moe.run_experts_reference` to measure the grouped dispatch.
    dispatch = staticmethod(run_experts)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D, I = cfg.n_routed_experts, cfg.d_model, cfg.expert_size
        self.router = Router(cfg)
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        hidden = cfg.n_shared_experts * cfg.shared_expert_size
        # n shared experts of size s always fire together: one SwiGLU of width n*s is the same function.
        self.shared_expert = FeedForward(D, hidden) if hidden else None
        self.register_buffer("load_since_update", torch.zeros(E), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        r = self.router(x)
        y = self.dispatch(x, r.experts, r.weights, self.gate_up_proj, self.down_proj)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y.view(shape), r.aux_loss, r.load

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        """DeepSeek-V3 balancing ("DeepSeek-V3 Technical Report", arXiv 2412.19437): raise the bias of
        under-loaded experts, lower over-loaded ones."""
        load = self.load_since_update
        if load.sum() > 0:
            self.router.expert_bias += rate * torch.sign(load.mean() - load)
        load.zero_()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn: MoE | FeedForward = MoE(cfg) if cfg.is_moe_layer(layer) else FeedForward(cfg.d_model, cfg.ffn_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                input_pos: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos)
        y = self.ffn(self.ffn_norm(x))
        if isinstance(y, tuple):  # MoE layers also return their auxiliary loss and expert load
            y, aux, load = y
            return x + y, aux, load
        return x + y, None, None


class Transformer(nn.Module):
    kv_cache_dtype = torch.float32  # `setup_cache`'s default

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.causal_mask: Tensor | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std); output projections scaled by 1/sqrt(2 * n_layers) as in GPT-2."""
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=out_std if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                                else std)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Static KV cache for decoding, of `dtype` or (None) the model's `kv_cache_dtype`; forward then needs
        `input_pos`."""
        device = self.inv_freq.device
        dtype = dtype or self.kv_cache_dtype
        for block in self.layers:
            block.attn.kv_cache = self.new_kv_cache(batch, max_len, dtype).to(device)
        self.causal_mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=device))

    def new_kv_cache(self, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        """One layer's KV cache (the INT4 engine adds an int8 kind)."""
        return KVCache(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, dtype)

    def forward(self, tokens: Tensor, targets: Tensor | None = None, input_pos: Tensor | None = None,
                positions: Tensor | None = None, mask: Tensor | None = None,
                logits_at: Tensor | None = None) -> ModelOutput:
        """tokens [B, T]; targets [B, T] with IGNORE_INDEX where no loss is taken; input_pos [T] when cached.
        Packed sequences (several documents in one row, no cache): `positions` [T] and a bool `mask` [T, T]
        (True: may attend) replace the causal defaults; `logits_at` [N] computes the head only there. Left-padded
        rows through the cache: `positions` [B, T] (each row's own) and `mask` [B, 1, T, cache length]."""
        T = tokens.shape[1]
        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=tokens.device)
        freqs = positions.float()[..., None] * self.inv_freq  # [T, hd/2], or [B, T, hd/2] with positions per row
        cos, sin = torch.cat((freqs.cos(), freqs.cos()), -1), torch.cat((freqs.sin(), freqs.sin()), -1)
        if positions.dim() == 2:  # broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        if mask is None and input_pos is not None and self.causal_mask is not None:
            mask = self.causal_mask[input_pos]

        x = self.embed(tokens)
        aux_loss, loads = x.new_zeros((), dtype=torch.float32), []
        for block in self.layers:
            x, aux, load = block(x, cos.to(x.dtype), sin.to(x.dtype), mask, input_pos)
            if load is not None:
                aux_loss, loads = aux_loss + aux, [*loads, load]
        if self.training:  # here, not in MoE.forward: a block recomputed for activation checkpointing counts once
            for moe, load in zip(self.moe_layers(), loads, strict=True):
                moe.load_since_update += load.detach()
        x = self.norm(x if logits_at is None else x[:, logits_at])
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        out = ModelOutput(logits, expert_load=torch.stack(loads) if loads else None)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
            out.loss = out.lm_loss + aux_loss
        return out

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def update_expert_bias(self) -> None:
        if self.cfg.bias_update_rate > 0:
            for moe in self.moe_layers():
                moe.update_expert_bias(self.cfg.bias_update_rate)


@dataclass
class ParamCount:
    total: int
    active: int  # parameters touched per token: routed experts counted top_k / n_routed_experts


def count_parameters(model: Transformer) -> ParamCount:
    """Count from the built module (tied embedding counted once)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.moe_layers():
        routed = moe.gate_up_proj.numel() + moe.down_proj.numel()
        inactive += routed - routed * moe.cfg.top_k // moe.cfg.n_routed_experts
    return ParamCount(total=total, active=total - inactive)


def build_on_meta(cfg: ModelConfig) -> Transformer:
    """Build without allocating weights, for counting and planning at real (billion-parameter) sizes."""
    with torch.device("meta"):
        return Transformer(cfg)
