"""The on-device planner: the architecture with the lowest predicted loss under a phone's budgets.

Hand-written because no library searches MoE architectures under memory and compute constraints. The
space: MobileLLM-like depth x width (head_dim 64, 4 kv heads), dense or MoE with E coarse experts of 4d, top-k,
granularity g, and optionally a shared expert taking half of the active slots (MobileMoE-S of arXiv
2605.27358: E=8, k=1, g=8, shared). Budgets: INT4 weight bytes (memory), active parameters (compute;
FLOPs/token ~ 2 N_act), and optionally decode tokens/s on a device profile through a roofline.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from mobilemoe.config import ModelConfig, from_dict, granular_moe
from mobilemoe.errors import ConfigError, MobileMoEError
from mobilemoe.io import read_mapping
from mobilemoe.quantize import INT4_BYTES_PER_PARAM
from mobilemoe.scaling.laws import Law

PROFILES = Path(__file__).parent / "profiles"
VOCAB = 128_256


@dataclass
class DeviceProfile:
    name: str
    memory_bandwidth_gb_s: float
    matmul_gflops: float


def load_profile(name_or_path: str) -> DeviceProfile:
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise MobileMoEError(f"unknown device profile '{name_or_path}'; known: {known} (or a path to a yaml file)")
    return from_dict(DeviceProfile, read_mapping(path), str(path))


@dataclass
class Candidate:
    n_layers: int
    d_model: int
    experts: int  # coarse experts E (1 = dense)
    top_k: int
    granularity: int
    shared: bool
    active: int
    total: int
    predicted_loss: float = math.nan

    @property
    def int4_bytes(self) -> float:
        return self.total * INT4_BYTES_PER_PARAM

    @property
    def active_int4_bytes(self) -> float:
        return self.active * INT4_BYTES_PER_PARAM

    def config(self) -> ModelConfig:
        heads = self.d_model // 64
        shape = (granular_moe(self.d_model, self.experts, self.granularity, self.top_k,
                              shared_slots=self.top_k * self.granularity // 2 if self.shared else 0)
                 if self.experts > 1 else {"ffn_size": 4 * self.d_model})
        return ModelConfig(name=self.label(), n_layers=self.n_layers, d_model=self.d_model, n_heads=heads,
                           n_kv_heads=4, head_dim=64, **shape).validate()

    def label(self) -> str:
        if self.experts == 1:
            return f"dense L{self.n_layers} d{self.d_model}"
        return (f"moe L{self.n_layers} d{self.d_model} E{self.experts} k{self.top_k} g{self.granularity}"
                f"{' +shared' if self.shared else ''}")


def count_params(n_layers: int, d: int, experts: int, top_k: int, g: int, shared: bool) -> tuple[int, int]:
    """(active, total) parameters; equals `count_parameters(build_on_meta(...))` (tested), but fast enough
    to score thousands of candidates."""
    attn = 2 * d * d + 2 * d * 4 * 64  # q, o and GQA k, v with 4 kv heads of 64
    norms = 2 * d
    if experts == 1:
        ffn_total = ffn_active = 3 * d * 4 * d
    else:
        shape = granular_moe(d, experts, g, top_k, shared_slots=top_k * g // 2 if shared else 0)
        expert = 3 * d * shape["expert_size"]
        shared_p = 3 * d * shape["shared_expert_size"] * shape["n_shared_experts"]
        router = d * shape["n_routed_experts"]
        ffn_total = shape["n_routed_experts"] * expert + shared_p + router
        ffn_active = shape["top_k"] * expert + shared_p + router
    per_layer = attn + norms
    embed = VOCAB * d + d
    return embed + n_layers * (per_layer + ffn_active), embed + n_layers * (per_layer + ffn_total)


def candidates() -> list[Candidate]:
    out = []
    for n_layers, d in itertools.product((16, 20, 24, 26, 30, 32), (512, 768, 1024, 1280, 1536)):
        archs = [(1, 1, 1, False)] + [
            (e, k, g, s) for e, k, g, s in itertools.product((2, 4, 8, 16, 32), (1, 2, 4), (1, 2, 4, 8, 16),
                                                             (False, True))
            if k < e and not (s and k * g < 2)]
        for e, k, g, s in archs:
            active, total = count_params(n_layers, d, e, k, g, s)
            out.append(Candidate(n_layers, d, e, k, g, s, active, total))
    return out


def decode_tok_s(c: Candidate, profile: DeviceProfile) -> float:
    """Roofline: the slower of reading the active INT4 weights and doing 2 x N_act FLOPs per token."""
    return min(profile.memory_bandwidth_gb_s * 1e9 / c.active_int4_bytes,
               profile.matmul_gflops * 1e9 / (2 * c.active))


def plan(law: Law, memory_bytes: float, max_active: float, tokens: float, min_decode_tok_s: float | None = None,
         profile: DeviceProfile | None = None) -> tuple[list[Candidate], list[Candidate]]:
    """(feasible candidates sorted by predicted loss, all scored candidates)."""
    if min_decode_tok_s is not None and profile is None:
        raise ConfigError("a decode-speed budget needs --device <profile>")
    scored = []
    for c in candidates():
        loss = law.predict_one(c.active, tokens, c.experts, c.top_k, c.granularity, c.shared)
        if loss is not None:
            c.predicted_loss = loss
            scored.append(c)
    if not scored:
        raise MobileMoEError(f"the law ({law.source or law.form.name}) has coefficients for none of the planner's "
                             f"architecture groups (it has: {', '.join(law.groups)}); fit it on runs of the dense "
                             "model and of MoE groups named like g8-k1-shared")
    feasible = [c for c in scored if c.int4_bytes <= memory_bytes and c.active <= max_active
                and (min_decode_tok_s is None or decode_tok_s(c, profile) >= min_decode_tok_s)]
    if not feasible:
        smallest = min(scored, key=lambda c: c.int4_bytes)
        raise MobileMoEError(
            f"no architecture meets the budgets (memory {memory_bytes / 1e9:.2f} GB, active {max_active:.3g}"
            + (f", decode {min_decode_tok_s} tok/s on {profile.name}" if min_decode_tok_s else "")
            + f"); the smallest candidate ({smallest.label()}) needs {smallest.int4_bytes / 1e9:.2f} GB and "
            f"{smallest.active:.3g} active parameters. Loosen a budget.")
    return sorted(feasible, key=lambda c: c.predicted_loss), scored


def pareto_plot(scored: list[Candidate], best: Candidate, path: Path, memory_bytes: float, max_active: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, budget, label in ((axes[0], "int4_bytes", memory_bytes, "INT4 weight memory (GB)"),
                                   (axes[1], "active", max_active, "active parameters (B)")):
        scale = 1e9
        for dense, colour in ((True, "tab:orange"), (False, "tab:blue")):
            pts = [c for c in scored if (c.experts == 1) == dense]
            xs = [getattr(c, key) / scale for c in pts]
            ax.scatter(xs, [c.predicted_loss for c in pts], s=4, alpha=0.3, color=colour,
                       label="dense" if dense else "MoE")
            frontier = pareto_front(pts, key)
            ax.plot([getattr(c, key) / scale for c in frontier], [c.predicted_loss for c in frontier], color=colour)
        ax.axvline(budget / scale, color="grey", ls="--", lw=1)
        ax.scatter([getattr(best, key) / scale], [best.predicted_loss], marker="*", s=200, color="red",
                   label=f"plan: {best.label()}")
        ax.set(xlabel=label, ylabel="predicted loss", xscale="log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Predicted loss vs memory and compute: Pareto frontiers, dense vs MoE")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_front(points: list[Candidate], key: str) -> list[Candidate]:
    """The candidates no other candidate beats on both `key` (a cost: int4_bytes, active) and predicted loss,
    cheapest first."""
    best, out = math.inf, []
    for c in sorted(points, key=lambda c: (getattr(c, key), c.predicted_loss)):
        if c.predicted_loss < best:
            best = c.predicted_loss
            out.append(c)
    return out
