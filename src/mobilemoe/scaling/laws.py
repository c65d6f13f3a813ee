"""Scaling-law forms: Chinchilla and the joint MoE law MobileMoE plans with, and the law file (JSON) format.

Both forms are written with positive exponents, as Chinchilla is (Hoffmann et al. 2022):

    chinchilla:  L = E + A / N^alpha + B / D^beta
    joint-moe:   L = c + A·Ê^delta / N^(alpha + gamma·ln Ê) + B·Ê^omega / D^(beta + zeta·ln Ê)

N = active parameters, D = training tokens. The joint form is Ludziejewski et al. (2025) with the sign of
the exponents flipped (their N^(alpha + gamma ln Ê) with alpha < 0 is our N^-(alpha + gamma ln Ê)); at
Ê = 1 (dense) it is Chinchilla. Ê is the transformed expert count of Clark et al. (2022), a saturating
function of the sparsity S = E / k (routed FFN parameters stored per parameter used), so a dense model has
S = 1 and Ê = 1. MobileMoE fits the joint law once per architecture group (granularity, top-k, shared).

References: "Training Compute-Optimal Large Language Models" (Hoffmann et al. 2022, arXiv 2203.15556);
"Joint MoE Scaling Laws: Mixture of Experts Can Be Memory Efficient" (Ludziejewski et al. 2025, arXiv
2502.05172); "Unified Scaling Laws for Routed Language Models" (Clark et al. 2022, arXiv 2202.01169);
"Scaling Laws for Fine-Grained Mixture of Experts" (Krajewski et al. 2024, arXiv 2402.07871); "Chinchilla
Scaling: A replication attempt" (Besiroglu et al. 2024, arXiv 2404.10102); "DeepSeekMoE" (Dai et al. 2024,
arXiv 2401.06066); "MobileMoE: Scaling On-Device Mixture of Experts" (Chen et al., Meta AI, arXiv 2605.27358).

A law file holds `{"law": <form>, "groups": {<group key>: {"coefficients": {...}, ...}}, ...}`; fits write
it and the planner reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobilemoe.errors import MobileMoEError

# Ê saturates at E_MAX (Clark et al. 2022: adding experts stops helping); E_START = 2 makes Ê(1) = 1 so
# the joint law reduces to Chinchilla for dense models. E_MAX is assumed, not fitted (too few E values).
E_START = 2.0
E_MAX = 512.0


def transformed_experts(sparsity: np.ndarray | float) -> np.ndarray:
    """Clark et al.'s Ê = 1 / (1 / (S - 1 + 1 / (1/(E_START-1) - 1/E_MAX)) + 1/E_MAX)."""
    s = np.asarray(sparsity, dtype=float)
    return 1.0 / (1.0 / (s - 1.0 + 1.0 / (1.0 / (E_START - 1.0) - 1.0 / E_MAX)) + 1.0 / E_MAX)


@dataclass(frozen=True)
class LawForm:
    """A functional form: its coefficient names and how it predicts loss from data columns."""

    name: str
    coefficients: tuple[str, ...]
    columns: tuple[str, ...]  # csv columns it reads

    def log_terms(self, theta: np.ndarray, cols: dict[str, np.ndarray]) -> np.ndarray:
        """The three additive terms in log space, [3, n], with theta in fitting space (log A, log B, log E).

        The fit works on log L = logsumexp(terms) as Hoffmann et al. do: it keeps A, B, E positive and the
        objective well scaled.
        """
        log_n, log_d = np.log(cols["params"]), np.log(cols["tokens"])
        if self.name == "chinchilla":
            a, b, e, alpha, beta = theta
            return np.stack([a - alpha * log_n, b - beta * log_d, e + np.zeros_like(log_n)])
        a, b, e, alpha, beta, delta, gamma, omega, zeta = theta
        ln_eh = np.log(transformed_experts(cols["sparsity"]))
        return np.stack([a + delta * ln_eh - (alpha + gamma * ln_eh) * log_n,
                         b + omega * ln_eh - (beta + zeta * ln_eh) * log_d, e + np.zeros_like(log_n)])

    def to_coefficients(self, theta: np.ndarray) -> dict[str, float]:
        """Fitting space -> the published coefficients (A, B and E/c exponentiated)."""
        values = [math.exp(theta[0]), math.exp(theta[1]), math.exp(theta[2]), *map(float, theta[3:])]
        return dict(zip(self.coefficients, values, strict=True))

    def to_theta(self, coefficients: dict[str, float]) -> np.ndarray:
        values = [coefficients[name] for name in self.coefficients]
        return np.array([math.log(values[0]), math.log(values[1]), math.log(values[2]), *values[3:]])

    def predict(self, coefficients: dict[str, float], cols: dict[str, np.ndarray]) -> np.ndarray:
        return np.exp(self.log_terms(self.to_theta(coefficients), cols)).sum(axis=0)


CHINCHILLA = LawForm("chinchilla", ("A", "B", "E", "alpha", "beta"), ("params", "tokens", "loss"))
JOINT_MOE = LawForm("joint-moe", ("A", "B", "c", "alpha", "beta", "delta", "gamma", "omega", "zeta"),
                    ("params", "tokens", "loss", "experts", "top_k", "granularity", "shared"))
FORMS = {f.name: f for f in (CHINCHILLA, JOINT_MOE)}

DENSE_GROUP = "dense"


def group_key(granularity: int, top_k: int, shared: bool) -> str:
    """Name of an MoE architecture group; dense models are the group `dense`."""
    return f"g{granularity}-k{top_k}-{'shared' if shared else 'noshared'}"


def get_form(name: str) -> LawForm:
    if name not in FORMS:
        raise MobileMoEError(f"unknown law '{name}'; known laws: {', '.join(FORMS)}")
    return FORMS[name]


@dataclass
class Law:
    """A law with coefficients per architecture group (one group `all` for Chinchilla)."""

    form: LawForm
    groups: dict[str, dict[str, float]]
    source: str = ""

    def coefficients_for(self, experts: int, top_k: int, granularity: int, shared: bool) -> dict[str, float] | None:
        if self.form is CHINCHILLA:
            return next(iter(self.groups.values()))
        key = DENSE_GROUP if experts == 1 else group_key(granularity, top_k, shared)
        return self.groups.get(key)

    def predict_one(self, params: float, tokens: float, experts: int = 1, top_k: int = 1, granularity: int = 1,
                    shared: bool = False) -> float | None:
        """Predicted loss, or None when the law has no coefficients for this architecture group."""
        coefficients = self.coefficients_for(experts, top_k, granularity, shared)
        if coefficients is None:
            return None
        cols = {"params": np.array([params], float), "tokens": np.array([tokens], float),
                "sparsity": np.array([experts / top_k], float)}
        return float(self.form.predict(coefficients, cols)[0])

    def to_json(self) -> dict[str, Any]:
        return {"law": self.form.name, "source": self.source,
                "groups": {k: {"coefficients": v} for k, v in self.groups.items()}}


def load_law(path: str | Path) -> Law:
    """Read a law file written by `mobilemoe scaling fit` (or the shipped paper-scale set)."""
    path = Path(path)
    if not path.is_file():
        raise MobileMoEError(f"law file not found: {path}")
    try:
        data = json.loads(path.read_text())
        form = get_form(data["law"])
        groups = {k: {name: float(g["coefficients"][name]) for name in form.coefficients}
                  for k, g in data["groups"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
        raise MobileMoEError(f"{path}: not a law file (needs 'law' and 'groups' with every coefficient of the "
                             f"form): {err}") from None
    return Law(form, groups, source=data.get("source", str(path)))


def paper_scale_law() -> Law:
    """The shipped coefficient set for planning at phone scale (MobileMoE's 6T-token, 0.3–0.9B-active regime).

    MobileMoE's own fitted coefficients are not public, so this set is part measured, part assumed:
    - dense part (A, B, c, alpha, beta): Epoch AI's refit of Chinchilla (Besiroglu et al. 2024) — measured.
    - delta = -0.30 (an Ê-fold MoE lowers the parameter term by Ê^-0.3 before the size effect), gamma = -0.01
      (the MoE gain shrinks with size, as Clark et al. 2022 found for routed models: the parameter term's
      Ê factor is Ê^(delta - gamma·ln N), ~Ê^-0.105 at N = 3e8), omega = +0.05, zeta = 0 (sparser models
      want slightly more data) — ASSUMED, chosen to match the signs and rough sizes reported by
      Ludziejewski et al. (2025). (The first shipped set had gamma = +0.01, which makes the gain *grow*
      with size, contrary to this note; with it the planner pushed E to the memory limit.)
    - granularity g multiplies A by 0.9 + 0.1·g^-0.6 (Krajewski et al. 2024: finer experts help, with
      diminishing returns; g = 8 -> 0.929, g = 16 -> 0.919) — ASSUMED shape.
    - a shared expert multiplies A by 0.97 — ASSUMED (DeepSeekMoE reports a small gain).
    - top-k enters only through the sparsity S = E/k — ASSUMED.
    Replace with a fitted file (`--law`) as soon as a sweep at the target scale exists.
    """
    base = {"A": 482.0, "B": 2085.0, "c": 1.82, "alpha": 0.348, "beta": 0.366}
    groups = {DENSE_GROUP: {**base, "delta": 0.0, "gamma": 0.0, "omega": 0.0, "zeta": 0.0}}
    for g in (1, 2, 4, 8, 16):
        for k in (1, 2, 4):
            for shared in (False, True):
                a = base["A"] * (0.9 + 0.1 * g ** -0.6) * (0.97 if shared else 1.0)
                groups[group_key(g, k, shared)] = {**base, "A": a, "delta": -0.30, "gamma": -0.01, "omega": 0.05,
                                                   "zeta": 0.0}
    return Law(JOINT_MOE, groups, source="paper-scale set (Epoch's Chinchilla refit + assumed MoE terms; "
                                         "see mobilemoe.scaling.laws.paper_scale_law)")
