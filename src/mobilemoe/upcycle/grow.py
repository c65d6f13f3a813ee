"""Grow a MobileMoE from a dense checkpoint: every FFN becomes a shared expert, routed experts and a router.

Hand-written because no library in our stack upcycles into fine-grained sigmoid-routed experts. The
methods are the family known as MoEfication / sparse upcycling:

- `split` (MoEfication, Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of
  Experts", arXiv 2110.01786; LLaMA-MoE, arXiv 2406.16554): the parent FFN's F neurons are partitioned.
  The shared expert takes the S most frequently active neurons; the other F - S are grouped into
  (F - S) / I experts of I neurons by balanced k-means on their co-activation. Same total parameters as
  the parent, S + top_k * I neurons active per token.
- `copy` (sparse upcycling, Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from
  Dense Checkpoints", arXiv 2212.05055, at fine granularity): the split's slices are each copied
  c = experts / slices times, and copy c of every slice gets Gaussian noise of std `noise` x the std of
  the parent matrix (copy 0 stays exact) so copies diverge. More total parameters than the parent.

Calibration. The parent runs on `calibration_tokens` tokens of the embedded corpus (equal parts of State
of the Union addresses, Moby Dick, Shakespeare and WordNet glosses, in file order) and each layer's FFN
inputs x are kept. Neuron i contributes a_i(x) * down[:, i] with a_i(x) = silu(gate_i . x) * (up_i . x);
it is *active* on a token when |a_i(x)| * |down[:, i]| is in the top quarter of that token's neurons.
Co-activation clustering: each non-shared neuron's 0/1 activity profile over the calibration tokens
(unit-normalised) is clustered by k-means with equal cluster sizes (greedy capacity-constrained
assignment, 15 iterations, seeded initial centroids), so neurons that fire together land in one expert.

Router (rows standardised on the calibration inputs, centred across experts, which leaves every top-k
choice unchanged). Each slice's row is a ridge-regression probe from the FFN input to the log of the
slice's total contribution on that token (sum of its neurons' |a_i(x)| * |down[:, i]|), so a token is
routed to the slices that matter most for it; upcycle.json reports per layer how often the router's
top-k are the slices with the largest contributions (the "oracle" top-k; chance is top_k / experts).
For `copy`, copy c also gets a token-group direction (k-means of the calibration inputs into c groups),
so every slice's copy c serves token group c and, at the start, a token tends to receive one whole copy
of the parent FFN. Each layer scales the two parts by the pair from a small grid that brings the MoE
layer closest (relative squared error) to the parent FFN on the calibration inputs. The selection bias
starts at zero.

Output weights. MobileMoE weights a selected expert by its sigmoid score, renormalised over the top-k
and times `routed_scaling_factor`. The parent adds every neuron with weight 1, so the upcycled model
keeps `norm_topk_prob` on and sets `routed_scaling_factor = top_k`: the selected weights always sum to
top_k, i.e. average exactly 1, whatever the router's scale. A single weight is exactly 1 only when the
selected scores are equal; so when every expert is selected (top_k = experts) the grid's best scale is
0 (every score 0.5, every weight exactly 1) and the layer *is* the parent FFN, which the tests check.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mobilemoe.checkpoint import LoadedModel, load_model, write_model_files
from mobilemoe.config import ModelConfig, granular_moe
from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_dir, claim_dir
from mobilemoe.model import FeedForward, MoE, Transformer, count_parameters
from mobilemoe.quantize import GROUP_SIZE
from mobilemoe.ui import console, progress

METHODS = ("split", "copy")
CALIBRATION_SOURCES = ("sotu", "moby-dick", "shakespeare", "wordnet")
ACTIVE_FRACTION = 0.25  # a neuron is active on a token when its contribution is in the token's top quarter
KMEANS_ITERATIONS = 15
SLICE_SCALES = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # router scale grid, in standard deviations of the logits
GROUP_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)  # copy: scale grid of the token-group part
GRID_TOKENS = 1024  # calibration tokens the router-scale grid is scored on


@dataclass(frozen=True)
class MoEShape:
    """The MoE an FFN of width F becomes: `n_routed_experts` of `expert_size` neurons, `top_k` of them per
    token, plus a shared expert of `shared_expert_size` neurons (0: none)."""

    n_routed_experts: int
    expert_size: int
    top_k: int
    shared_expert_size: int = 0

    @classmethod
    def from_planner(cls, ffn_size: int, coarse_experts: int, granularity: int, coarse_top_k: int = 1,
                     shared_slots: int = 0, coarse_size: int | None = None) -> MoEShape:
        """The scaling planner's terms (E, g, k, shared slots; `scaling plan` prints e.g. "E4 k1 g8 +shared",
        where +shared means k*g/2 slots). The coarse expert is the parent's FFN unless `coarse_size` says
        otherwise (half of it, E=2, k=1 is half the FFN active at the parent's total)."""
        f = granular_moe(0, coarse_experts, granularity, coarse_top_k, shared_slots,
                         coarse_size=coarse_size or ffn_size)
        return cls(f["n_routed_experts"], f["expert_size"], f["top_k"], f["shared_expert_size"])

    def slices(self, ffn_size: int) -> int:
        return (ffn_size - self.shared_expert_size) // self.expert_size

    def check(self, ffn_size: int, method: str) -> None:
        """Raise MobileMoEError saying what is wrong with this shape for a parent FFN of `ffn_size`."""
        e, i, k, s = self.n_routed_experts, self.expert_size, self.top_k, self.shared_expert_size
        if method not in METHODS:
            raise MobileMoEError(f"unknown upcycling method '{method}'; choose one of {', '.join(METHODS)}")
        if e < 1 or i < 1 or k < 1 or s < 0:
            raise MobileMoEError(f"experts ({e}), expert size ({i}) and top-k ({k}) must be positive and the shared "
                                 f"expert size ({s}) not negative")
        if k > e:
            raise MobileMoEError(f"top-k ({k}) is more than the routed experts ({e}): a token cannot select more "
                                 "experts than there are; lower --top-k or add experts")
        for name, width in (("expert size", i), ("shared expert size", s)):
            if width % GROUP_SIZE:
                raise MobileMoEError(f"{name} {width} is not a multiple of {GROUP_SIZE}, the INT4 group size every "
                                     "expert's down projection is quantized in; choose a multiple of 32")
        if s >= ffn_size:
            raise MobileMoEError(f"shared expert size {s} leaves none of the parent's {ffn_size} FFN neurons for "
                                 "routed experts")
        if (ffn_size - s) % i:
            sizes = [d for d in range(GROUP_SIZE, ffn_size - s + 1, GROUP_SIZE) if (ffn_size - s) % d == 0]
            raise MobileMoEError(f"expert size {i} does not tile the parent's FFN: its {ffn_size} neurons minus the "
                                 f"shared {s} leave {ffn_size - s}, not a whole number of {i}-neuron experts. "
                                 f"Expert sizes that tile it: {', '.join(map(str, sizes)) or 'none'}")
        n = self.slices(ffn_size)
        if method == "split" and e != n:
            raise MobileMoEError(f"split cuts the {ffn_size - s} non-shared neurons into exactly {n} experts of {i}; "
                                 f"got {e} experts. Use {n} experts, another expert size, or --method copy for "
                                 "more experts than the parent has neurons for")
        if method == "copy" and e % n:
            raise MobileMoEError(f"copy makes every one of the {n} slices of {i} neurons into the same number of "
                                 f"experts, so the expert count must be a multiple of {n}; got {e}")

    def label(self) -> str:
        shared = f" + shared {self.shared_expert_size}" if self.shared_expert_size else ""
        return f"{self.n_routed_experts} x {self.expert_size}, top-{self.top_k}{shared}"


def moe_config(parent: ModelConfig, shape: MoEShape, method: str) -> ModelConfig:
    return dataclasses.replace(
        parent, name=f"{parent.name}-{method}-{shape.n_routed_experts}x{shape.expert_size}-top{shape.top_k}",
        ffn_size=0, n_routed_experts=shape.n_routed_experts, expert_size=shape.expert_size, top_k=shape.top_k,
        n_shared_experts=1 if shape.shared_expert_size else 0, shared_expert_size=shape.shared_expert_size,
        moe_layer_step=1, router="sigmoid", norm_topk_prob=True, routed_scaling_factor=float(shape.top_k),
        aux_loss_coef=0.0, z_loss_coef=0.0).validate()


# --- calibration -----------------------------------------------------------------------------------------
def calibration_ids(tokenizer, n_tokens: int) -> list[int]:
    """`n_tokens` token ids: equal parts of each calibration source, documents in file order."""
    from mobilemoe.data.documents import read_embedded

    per_source, ids = math.ceil(n_tokens / len(CALIBRATION_SOURCES)), []
    for source in CALIBRATION_SOURCES:
        taken: list[int] = []
        for doc in read_embedded(source):
            if isinstance(doc, str):
                taken += tokenizer.encode(doc)
            if len(taken) >= per_source:
                break
        ids += taken[:per_source]
    return ids[:n_tokens]


@torch.no_grad()
def ffn_inputs(model: Transformer, ids: list[int], seq_len: int = 256) -> list[Tensor]:
    """Each layer's FFN input (after its norm) on `ids`, cut into sequences of `seq_len`: [layers] x [N, D]."""
    inputs: list[list[Tensor]] = [[] for _ in model.layers]
    hooks = [block.ffn.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].flatten(0, 1)))
             for i, block in enumerate(model.layers)]
    try:
        for start in range(0, len(ids), seq_len):
            model(torch.tensor([ids[start:start + seq_len]]))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x).float() for x in inputs]


def neuron_contributions(ffn: FeedForward, x: Tensor) -> Tensor:
    """|a_i(x)| * |down[:, i]|: the size of each neuron's contribution to the output, [N, F]."""
    act = F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)
    return act.abs() * ffn.down_proj.weight.norm(dim=0)


def activity(contrib: Tensor) -> Tensor:
    """0/1 [N, F]: the neuron is in the top ACTIVE_FRACTION of the token's neurons."""
    k = max(1, round(ACTIVE_FRACTION * contrib.shape[1]))
    threshold = contrib.topk(k, dim=1).values[:, -1:]
    return (contrib >= threshold).float()


def balanced_kmeans(points: Tensor, n_clusters: int, generator: torch.Generator) -> list[Tensor]:
    """Cluster rows of `points` (unit-normalised inside) into `n_clusters` clusters of equal size by cosine
    similarity; returns each cluster's row indices, sorted. Assignment is greedy under the size cap: the
    most similar (point, centroid) pairs first."""
    n = points.shape[0]
    size = n // n_clusters
    pts = F.normalize(points, dim=1)
    centroids = pts[torch.randperm(n, generator=generator)[:n_clusters]]
    for _ in range(KMEANS_ITERATIONS):
        sim = pts @ centroids.T
        order = torch.argsort(sim.flatten(), descending=True, stable=True).tolist()
        chosen, room, left = [-1] * n, [size] * n_clusters, n
        for flat in order:
            point, cluster = divmod(flat, n_clusters)
            if chosen[point] < 0 and room[cluster]:
                chosen[point], room[cluster], left = cluster, room[cluster] - 1, left - 1
                if not left:
                    break
        assign = torch.tensor(chosen)
        new = torch.stack([F.normalize(pts[assign == c].mean(0), dim=0) for c in range(n_clusters)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return [torch.nonzero(assign == c).flatten() for c in range(n_clusters)]


def kmeans_groups(x: Tensor, n_groups: int, generator: torch.Generator) -> Tensor:
    """Plain k-means of token inputs (unit-normalised) into `n_groups`; returns the centroids [G, D]."""
    pts = F.normalize(x, dim=1)
    centroids = pts[torch.randperm(pts.shape[0], generator=generator)[:n_groups]]
    for _ in range(KMEANS_ITERATIONS):
        assign = (pts @ centroids.T).argmax(1)
        centroids = torch.stack([pts[assign == g].mean(0) if (assign == g).any() else centroids[g]
                                 for g in range(n_groups)])
    return centroids


def ridge_probe(x: Tensor, targets: Tensor, ridge: float = 1e-2) -> Tensor:
    """Rows R [T, D] of the ridge regression x @ R.T ~ targets (centred over tokens); ridge relative to the
    mean eigenvalue of x's second moment."""
    x = x - x.mean(0)
    gram = x.T @ x
    gram = gram + ridge * gram.trace() / gram.shape[0] * torch.eye(gram.shape[0])
    return torch.linalg.solve(gram, x.T @ (targets - targets.mean(0))).T


def standardised(rows: Tensor, x: Tensor) -> Tensor:
    """Rows centred across experts (top-k choices unchanged) and scaled so x @ rows.T has unit std."""
    rows = rows - rows.mean(0, keepdim=True)
    std = (x @ rows.T).std()
    return rows / std if std > 0 else rows


# --- one layer ---------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    layer: int
    slice_scale: float
    group_scale: float
    rel_error: float  # ||MoE(x) - FFN(x)||^2 / ||FFN(x)||^2 on the first GRID_TOKENS calibration inputs
    oracle_recall: float | None  # split: share of the router's top-k among the k largest-contribution experts


@torch.no_grad()
def upcycle_layer(ffn: FeedForward, moe: MoE, x: Tensor, shape: MoEShape, method: str, noise: float, seed: int,
                  layer: int) -> LayerReport:
    """Fill `moe` (built by the upcycled Transformer) from the parent `ffn`, calibrated on inputs x [N, D].
    Each layer draws from its own generator, clustering first, so split and copy cut a layer alike."""
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    gate, up, down = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    contrib = neuron_contributions(ffn, x)
    active = activity(contrib)
    frequency = active.mean(0)
    by_frequency = torch.argsort(frequency, descending=True, stable=True)
    shared = by_frequency[: shape.shared_expert_size].sort().values
    rest = by_frequency[shape.shared_expert_size:].sort().values
    n_slices = shape.slices(gate.shape[0])
    clusters = balanced_kmeans(active[:, rest].T, n_slices, generator)
    slices = [rest[c] for c in clusters]
    slices.sort(key=lambda s: -float(frequency[s].mean()))  # expert 0 = the most active slice

    if moe.shared_expert is not None:
        moe.shared_expert.gate_proj.weight.copy_(gate[shared])
        moe.shared_expert.up_proj.weight.copy_(up[shared])
        moe.shared_expert.down_proj.weight.copy_(down[:, shared])
    copies = shape.n_routed_experts // n_slices
    for e in range(shape.n_routed_experts):
        copy, neurons = divmod(e, n_slices)
        idx = slices[neurons]
        gate_up, dn = torch.cat((gate[idx], up[idx])), down[:, idx]
        if copy:  # copies after the first diverge by noise relative to each parent matrix's spread
            gate_up = gate_up + noise * torch.cat((gate, up)).std() * torch.randn(gate_up.shape, generator=generator)
            dn = dn + noise * down.std() * torch.randn(dn.shape, generator=generator)
        moe.gate_up_proj[e].copy_(gate_up)
        moe.down_proj[e].copy_(dn)
    moe.router.expert_bias.zero_()

    slice_size = torch.stack([contrib[:, s].sum(1) for s in slices], 1)  # [N, slices], each slice's activity
    slice_rows = standardised(ridge_probe(x, slice_size.clamp_min(1e-6).log()), x).repeat(copies, 1)
    group_rows = (standardised(kmeans_groups(x, copies, generator), x).repeat_interleave(n_slices, 0)
                  if copies > 1 else torch.zeros_like(slice_rows))
    probe = x[:GRID_TOKENS]
    want = ffn(probe)
    best = (math.inf, 0.0, 0.0)
    for a in SLICE_SCALES:
        for b in GROUP_SCALES if copies > 1 else (0.0,):
            moe.router.weight.copy_(a * slice_rows + b * group_rows)
            err = float((moe(probe)[0] - want).square().sum() / want.square().sum())
            best = min(best, (err, a, b))
    err, a, b = best
    moe.router.weight.copy_(a * slice_rows + b * group_rows)

    recall = None
    if method == "split" and shape.top_k < shape.n_routed_experts:
        oracle = slice_size.topk(shape.top_k, dim=1).indices
        chosen = (x @ moe.router.weight.T).topk(shape.top_k, dim=1).indices
        hits = (chosen.unsqueeze(2) == oracle.unsqueeze(1)).any(2).float().mean()
        recall = float(hits)
    return LayerReport(layer, a, b, err, recall)


# --- the whole model -------------------------------------------------------------------------------------
def upcycle(parent: str | Path | LoadedModel, out: str | Path, shape: MoEShape, method: str = "split",
            noise: float = 0.01, calibration_tokens: int = 4096, seed: int = 0,
            planner_terms: dict[str, int] | None = None, force: bool = False) -> dict[str, Any]:
    """Write the upcycled checkpoint to `out` (config.json, model.safetensors, tokenizer.json, upcycle.json)
    and return the upcycle.json record. An existing `out` is replaced only if it is a checkpoint (or `force`)."""
    claim_dir(out, "checkpoint", force)
    loaded = parent if isinstance(parent, LoadedModel) else load_model(parent)
    cfg, tokenizer = loaded.model.cfg, loaded.tokenizer
    if cfg.is_moe:
        raise MobileMoEError(f"{loaded.path} is already an MoE ('{cfg.name}'); upcycling starts from a dense model")
    if tokenizer is None:
        raise MobileMoEError(f"{loaded.path} has no tokenizer.json; the calibration text is tokenized with the "
                             "parent's tokenizer, so copy it into the checkpoint directory")
    if noise < 0:
        raise MobileMoEError(f"--noise must be >= 0, got {noise}")
    if calibration_tokens < 64:
        raise MobileMoEError(f"--calibration-tokens must be at least 64, got {calibration_tokens}")
    shape.check(cfg.ffn_size, method)
    if shape.slices(cfg.ffn_size) * shape.expert_size > calibration_tokens:
        raise MobileMoEError(f"{calibration_tokens} calibration tokens are too few to cluster "
                             f"{shape.slices(cfg.ffn_size) * shape.expert_size} neurons; raise --calibration-tokens")
    parent_model = loaded.model.float().eval()
    ids = calibration_ids(tokenizer, calibration_tokens)
    xs = ffn_inputs(parent_model, ids)

    torch.manual_seed(seed)
    child = Transformer(moe_config(cfg, shape, method)).eval()
    parent_state = parent_model.state_dict()
    child.load_state_dict({k: v for k, v in parent_state.items() if ".ffn." not in k}, strict=False)
    reports = []
    with progress() as bar:
        task = bar.add_task(f"upcycle ({method})", total=cfg.n_layers, info="")
        for i, (block, x) in enumerate(zip(parent_model.layers, xs, strict=True)):
            r = upcycle_layer(block.ffn, child.layers[i].ffn, x, shape, method, noise, seed, i)
            reports.append(r)
            bar.update(task, advance=1, info=f"layer {i}: rel. error {r.rel_error:.3f}")

    before, after = count_parameters(parent_model), count_parameters(child)
    record = {"parent": str(loaded.path), "parent_name": cfg.name, "method": method, "shape": dataclasses.asdict(shape),
              "planner_terms": planner_terms, "seed": seed, "noise": noise if method == "copy" else 0.0,
              "calibration": {"tokens": len(ids), "sources": list(CALIBRATION_SOURCES),
                              "active_fraction": ACTIVE_FRACTION},
              "params": {"parent_active": before.active, "parent_total": before.total,
                         "active": after.active, "total": after.total},
              "layers": [dataclasses.asdict(r) for r in reports]}
    with atomic_dir(out, "checkpoint", force) as tmp:
        write_model_files(tmp, child, tokenizer)
        (tmp / "upcycle.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def print_report(record: dict[str, Any], out: str | Path) -> None:
    from rich.table import Table

    from mobilemoe.ui import human_count

    p, layers = record["params"], record["layers"]
    table = Table(title=f"upcycled {record['parent_name']} ({record['method']}) -> {out}")
    for col in ("", "active", "total", "FFN layer rel. error (mean / max)", "router recall of oracle top-k"):
        table.add_column(col)
    table.add_row("parent (dense)", human_count(p["parent_active"]), human_count(p["parent_total"]), "", "")
    errors = [r["rel_error"] for r in layers]
    recalls = [r["oracle_recall"] for r in layers if r["oracle_recall"] is not None]
    table.add_row(MoEShape(**record["shape"]).label(), human_count(p["active"]), human_count(p["total"]),
                  f"{sum(errors) / len(errors):.3f} / {max(errors):.3f}",
                  f"{sum(recalls) / len(recalls):.2f}" if recalls else "-")
    console.print(table)
