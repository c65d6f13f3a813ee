"""MoE routing (`Router`) and expert dispatch.

Written by hand because no library in our stack does dropless, fine-grained MoE on CPU: torchao and
transformers loop over experts or compute all of them. `run_experts` sorts the token->expert
assignments by expert so each expert's tokens are one contiguous block, then runs every block as one
grouped matmul (`torch._grouped_mm`) - no capacity factor, nothing dropped. `run_experts_reference`
is the obvious per-expert loop the tests and benchmarks compare against.

Expert weights are stacked like transformers' fused experts: gate_up [E, 2I, D] (gate rows first),
down [E, D, I].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobilemoe.config import ModelConfig


@dataclass
class Routing:
    experts: Tensor  # [T, k] int64, chosen expert ids
    weights: Tensor  # [T, k] fp32, output weight of each chosen expert
    aux_loss: Tensor  # scalar fp32, weighted sum of the configured auxiliary losses (0 if none)
    load: Tensor  # [E] fp32, number of token assignments per expert


class Router(nn.Module):
    """Token-choice top-k routing in fp32; owns the router weight [E, D], the selection bias [E] and the
    routing settings of `cfg`.

    sigmoid: experts are *selected* by score + expert_bias (aux-loss-free balancing) but weighted by the
    plain scores; softmax: selected and weighted by probabilities. Top-k weights are renormalised to sum
    to one when `norm_topk_prob`, then multiplied by `routed_scaling_factor`. The auxiliary losses
    (switch load balancing, z-loss) are computed only in training mode.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.kind, self.norm_topk_prob = cfg.top_k, cfg.router, cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.d_model))
        # Transformer.init_weights sets the value; initialising as nn.Linear does keeps the random stream, so
        # a seed builds the same model it built when the router was an nn.Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # Aux-loss-free balancing bias: changes which experts are selected, never the output weights;
        # updated by `MoE.update_expert_bias` outside the gradient.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: Tensor) -> Routing:
        """x [T, D] -> the top-k experts of each token and their weights."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        n_experts = logits.shape[-1]
        if self.kind == "sigmoid":
            scores = torch.sigmoid(logits)
            experts = torch.topk(scores + self.expert_bias.float(), self.top_k, dim=-1).indices
            weights = scores.gather(-1, experts)
        else:
            scores = torch.softmax(logits, dim=-1)
            weights, experts = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        weights = weights * self.scaling

        # scatter_add rather than bincount: a static output shape, so torch.compile traces routing in one graph.
        flat = experts.flatten()
        load = logits.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat, dtype=logits.dtype))
        aux_loss = logits.new_zeros(())
        if self.training and self.aux_loss_coef > 0:
            # Switch Transformer: E * sum_e (fraction of assignments to e) * (mean router probability of e).
            probs = scores / scores.sum(-1, keepdim=True) if self.kind == "sigmoid" else scores
            aux_loss = aux_loss + self.aux_loss_coef * n_experts * torch.dot(load / load.sum(), probs.mean(0))
        if self.training and self.z_loss_coef > 0:
            aux_loss = aux_loss + self.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        return Routing(experts, weights, aux_loss, load)


def run_experts(x: Tensor, experts: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor,
                quantize_activation: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Dropless sorted dispatch: y[t] = sum_j weights[t, j] * SwiGLU_{experts[t, j]}(x[t]).

    x [T, D]; experts/weights [T, k]; returns [T, D] in x's dtype. `quantize_activation` (QAT) fake-quantizes
    both matmuls' inputs per row: x, and each slot's SwiGLU hidden.
    """
    if quantize_activation is not None:
        x = quantize_activation(x)
    n_tokens, top_k = experts.shape
    flat_experts = experts.flatten()
    order = torch.argsort(flat_experts, stable=True)
    token_of_slot = order // top_k
    counts = torch.bincount(flat_experts, minlength=gate_up.shape[0])
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)

    sorted_x = x[token_of_slot]
    hidden = torch._grouped_mm(sorted_x, gate_up.transpose(-2, -1), offs=offsets)
    gate, up = hidden.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    if quantize_activation is not None:
        hidden = quantize_activation(hidden)
    out = torch._grouped_mm(hidden, down.transpose(-2, -1), offs=offsets)
    out = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_slot, out)


def run_experts_reference(x: Tensor, experts: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Plain per-expert loop with the same maths as `run_experts`; for tests and benchmarks only."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.nonzero(experts == e, as_tuple=True)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e])
        out = out.index_add(0, token, y * weights[token, slot].unsqueeze(-1).to(y.dtype))
    return out
