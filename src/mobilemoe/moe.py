"""MoE routing (`Router`) and expert dispatch.

Written by hand because no library in our stack does dropless, fine-grained MoE on CPU: torchao and
transformers loop over experts or compute all of them. `run_experts` sorts the token->expert
assignments by expert so each expert's tokens are one contiguous block, then runs every block as one
grouped matmul (`torch._grouped_mm`) - no capacity factor, nothing dropped. `run_experts_reference`
is the obvious per-expert loop the tests and benchmarks compare against.

Precision and devices: `torch._grouped_mm` is not on autocast's lists, so under autocast the experts are cast
to autocast's dtype here, as a linear would be. On CUDA the kernel takes bf16 only and wants every group to
start 16 bytes apart along the token dimension (torchtitan pads the same way): each expert's block is padded
with zero rows to a multiple of 8 tokens. An fp32 run on CUDA falls back to the per-expert loop. On CPU the
kernel is a loop of one matmul per expert: fp32 runs unpadded (MKL sgemm, no per-shape setup); bf16 goes to
oneDNN, which JIT-builds a kernel for every new matrix shape (0.2-0.4 ms each here, kept in a cache of 1024),
and the groups' sizes change with the routing at every step, so each expert's block is padded to a multiple
of a power of two near the mean group size (at most 128 rows): a handful of shapes, built once, for at most
~2x the rows (BENCHMARKS.md, "bf16 MoE on this CPU"). When the groups are near-equal, CPU bf16 instead pads
every group to one capacity and runs each projection as a single `torch.bmm` (`cpu_bf16_swiglu`). torch.compile's meta
kernel admits bf16 only, so an fp32 grouped matmul stays outside the compiled graph.

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
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if x.is_cuda and dtype != torch.bfloat16:
        return run_experts_reference(x, experts, weights, gate_up, down, quantize_activation)
    n_tokens, top_k = experts.shape
    flat_experts = experts.flatten()
    order = torch.argsort(flat_experts, stable=True)
    token_of_slot = order // top_k
    # scatter_add rather than bincount: a static output shape, so torch.compile keeps the dispatch in one graph
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int64, device=x.device).scatter_add_(
        0, flat_experts, torch.ones_like(flat_experts))
    # Every gather that carries a gradient is an index_select: its backward is index_add, a serial loop over the rows
    # on CPU. Advanced indexing (x[i]) backprops through index_put_(accumulate=True), which CPU runs with parallel
    # atomic float adds: a token's k slot gradients then sum in a different order from run to run, and a resumed run
    # no longer replays its steps bit for bit. Cast before the gather: T rows instead of T * k.
    sorted_x = x.to(dtype).index_select(0, token_of_slot)
    slot_weights = weights.flatten().index_select(0, order).to(dtype)
    gate_up, down = gate_up.to(dtype), down.to(dtype)
    if x.is_cuda:
        out = grouped_swiglu_padded(sorted_x, flat_experts[order], counts, gate_up, down, quantize_activation)
    elif dtype == torch.bfloat16:
        align = cpu_bf16_group_rows(flat_experts.numel(), gate_up.shape[0])
        out = cpu_bf16_swiglu(sorted_x, flat_experts[order], counts, gate_up, down, quantize_activation, align)
    else:
        out = grouped_swiglu(sorted_x, torch.cumsum(counts, 0, dtype=torch.int32), gate_up, down, quantize_activation)
    # Weighted and summed in the compute dtype, cast once per token (not per slot) back to x's dtype.
    out = out * slot_weights.unsqueeze(-1)
    return torch.zeros_like(x, dtype=dtype).index_add_(0, token_of_slot, out).to(x.dtype)


def grouped_swiglu(x: Tensor, offsets: Tensor, gate_up: Tensor, down: Tensor,
                   quantize_activation: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """SwiGLU of expert e over rows offsets[e-1]:offsets[e] of x [S, D] (rows after offsets[-1] are ignored)."""
    return _swiglu(x, gate_up, down, quantize_activation, lambda a, b: _grouped_mm(a, b, offsets))


def _swiglu(x: Tensor, gate_up: Tensor, down: Tensor, quantize_activation: Callable[[Tensor], Tensor] | None,
            matmul: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The experts' SwiGLU with `matmul` multiplying rows by every expert's transposed weights: one grouped
    matmul over sorted rows, or one bmm over equal-capacity groups."""
    gate, up = matmul(x, gate_up.transpose(-2, -1)).chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    if quantize_activation is not None:
        hidden = quantize_activation(hidden)
    return matmul(hidden, down.transpose(-2, -1))


GROUP_ALIGN_ROWS = 8  # 16 bytes of bf16: where CUDA's grouped GEMM wants each group to start
CPU_BF16_MAX_GROUP_ROWS = 128


def cpu_bf16_group_rows(slots: int, n_experts: int) -> int:
    """Rows each expert's group is padded to a multiple of on CPU in bf16: the largest power of two not above the
    mean group size, at most CPU_BF16_MAX_GROUP_ROWS. Group sizes then take few values (oneDNN builds a kernel
    per shape) and padding adds less than one mean group per expert. Shapes only: no value is read."""
    mean = max(1, slots // n_experts)
    return min(CPU_BF16_MAX_GROUP_ROWS, 1 << (mean.bit_length() - 1))


def grouped_swiglu_padded(x: Tensor, expert_of_row: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor,
                          quantize_activation: Callable[[Tensor], Tensor] | None = None,
                          align: int = GROUP_ALIGN_ROWS) -> Tensor:
    """`grouped_swiglu` with each expert's rows moved to start at a multiple of `align` (zero rows between, which
    add nothing to any gradient). The buffer has a size fixed by the shapes, so no value is read on the host."""
    n_experts = counts.shape[0]
    padded = (counts + align - 1) // align * align
    padded_end = torch.cumsum(padded, 0)
    shift = (padded_end - padded) - (torch.cumsum(counts, 0) - counts)  # padded start - packed start, per expert
    destination = torch.arange(x.shape[0], device=x.device) + shift[expert_of_row]
    rows = -(-(x.shape[0] + n_experts * (align - 1)) // align) * align
    buffer = x.new_zeros(rows, x.shape[1]).index_copy(0, destination, x)
    out = grouped_swiglu(buffer, padded_end.to(torch.int32), gate_up, down, quantize_activation)
    return out.index_select(0, destination)


BATCHED_MAX_WASTE = 2.0  # bmm over equal-capacity groups while E * capacity <= this many times the slots
# The capacity is rounded up to this: the largest group moves by a few rows from step to step, so a handful of
# shapes repeat (oneDNN builds a kernel per shape), and the padding stays small next to ~1.5x from the max group.
BATCHED_CAPACITY_ROWS = 32


@torch.compiler.disable  # a data-dependent shape: read on the host, outside the graph (torch.compile resumes after)
def _batched_capacity(counts: Tensor) -> int:
    return -(-int(counts.max()) // BATCHED_CAPACITY_ROWS) * BATCHED_CAPACITY_ROWS


def cpu_bf16_swiglu(x: Tensor, expert_of_row: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor,
                    quantize_activation: Callable[[Tensor], Tensor] | None, align: int) -> Tensor:
    """CPU bf16 experts. torch's CPU grouped matmul is one small matmul per expert (~34 us of overhead each, 4 per
    expert per step); when the groups are near-equal, one `torch.bmm` per projection over every expert's group
    padded to the same capacity (the largest group, rounded up to BATCHED_CAPACITY_ROWS so shapes repeat) does the
    same maths in one call. Skewed routing would pad too much: then the per-expert loop over `align`-padded groups."""
    n_experts = counts.shape[0]
    capacity = _batched_capacity(counts)
    if n_experts * capacity > BATCHED_MAX_WASTE * x.shape[0]:
        return grouped_swiglu_padded(x, expert_of_row, counts, gate_up, down, quantize_activation, align)
    position = torch.arange(x.shape[0], device=x.device) - (torch.cumsum(counts, 0) - counts)[expert_of_row]
    destination = expert_of_row * capacity + position
    # Zero rows, not empty: their output gradient is zero, but 0 * (garbage NaN) would reach the weights' gradient.
    buffer = x.new_zeros(n_experts * capacity, x.shape[1]).index_copy(0, destination, x)
    out = _swiglu(buffer.view(n_experts, capacity, -1), gate_up, down, quantize_activation, torch.bmm)
    return out.view(n_experts * capacity, -1).index_select(0, destination)


@torch.compiler.disable
def _grouped_mm_eager(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    return torch._grouped_mm(a, b, offs=offsets)


def _grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    if a.dtype == torch.bfloat16:
        return torch._grouped_mm(a, b, offs=offsets)
    return _grouped_mm_eager(a, b, offsets)  # fp32: eager only (see the module docstring)


def run_experts_reference(x: Tensor, experts: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor,
                          quantize_activation: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Plain per-expert loop with the same maths as `run_experts`: the tests' and benchmarks' reference, and the
    fp32 path on CUDA (whose grouped GEMM is bf16 only)."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.nonzero(experts == e, as_tuple=True)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        y = F.linear(hidden if quantize_activation is None else quantize_activation(hidden), down[e])
        out = out.index_add(0, token, y * weights[token, slot].unsqueeze(-1).to(y.dtype))
    return out
