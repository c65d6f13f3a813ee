"""Fitting scaling laws to a results table: Huber loss on log-loss residuals, L-BFGS from a grid of starts,
bootstrap confidence intervals, plots.

Hand-written because no library fits these forms the way the literature does ("Training
Compute-Optimal Large Language Models", Hoffmann et al. 2022, arXiv 2203.15556; "Chinchilla Scaling: A
replication attempt", Besiroglu et al. 2024, arXiv 2404.10102): the objective is
sum_i Huber_delta(log L_hat_i - log L_i) with log L_hat = logsumexp of the law's terms, minimised with
L-BFGS from many initialisations because the surface has many shallow local minima. scipy supplies
L-BFGS; the law, objective, start grid and bootstrap are here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_write_json
from mobilemoe.scaling.laws import CHINCHILLA, DENSE_GROUP, JOINT_MOE, Law, LawForm, get_form, group_key

# Hoffmann et al.'s start grid (Epoch reuses it): alpha, beta in 0..2, log E in -1..1, log A, log B in 0..25.
BASE_GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
                 alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))
# The joint law's Ê terms start near zero (Ê = 1 is Chinchilla): delta, omega in {-0.2, 0, 0.2}, gamma = zeta = 0.
MOE_GRID = dict(delta=np.array([-0.2, 0.0, 0.2]), gamma=np.zeros(1), omega=np.array([-0.2, 0.0, 0.2]),
                zeta=np.zeros(1))


@dataclass
class GroupFit:
    coefficients: dict[str, float]
    ci95: dict[str, list[float]]
    n_points: int
    quality: dict[str, float]


@dataclass
class FitResult:
    law: LawForm
    groups: dict[str, GroupFit]
    source: str
    huber_delta: float
    dropped_highest: int
    skipped: dict[str, str] = field(default_factory=dict)

    def to_law(self) -> Law:
        return Law(self.law, {k: g.coefficients for k, g in self.groups.items()}, source=self.source)

    def to_json(self) -> dict[str, Any]:
        return {"law": self.law.name, "source": self.source, "huber_delta": self.huber_delta,
                "dropped_highest": self.dropped_highest,
                "groups": {k: vars(g) for k, g in self.groups.items()}, "skipped": self.skipped}


# --- the results table -----------------------------------------------------------------------------------
def load_table(path: str | Path, rename: dict[str, str] | None = None):
    """Read a csv/parquet results table; `rename` maps source column names to ours (params, tokens, ...).

    A table with `flops` (training FLOPs) instead of `tokens` gets tokens = flops / (6 params), the
    Chinchilla convention, so published tables such as Epoch's can be read as they are.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise MobileMoEError(f"results table not found: {path}")
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, OSError) as err:  # pandas' ParserError is a ValueError
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MobileMoEError(f"{path}: not a readable {'parquet' if path.suffix == '.parquet' else 'CSV'} table "
                             f"({detail})") from None
    table = table.rename(columns=rename or {})
    if "tokens" not in table and {"flops", "params"} <= set(table.columns):
        table["tokens"] = table["flops"] / (6 * table["params"])
    return table


def check_columns(table, form: LawForm, where: str) -> None:
    missing = [c for c in form.columns if c not in table.columns]
    if missing:
        raise MobileMoEError(
            f"{where}: missing column(s) {', '.join(missing)} needed by the {form.name} law; it has "
            f"{', '.join(map(str, table.columns))}. Rename columns with --rename 'Their Name=params' (or give "
            "'flops' and 'params' for tokens = flops / 6N).")
    import pandas as pd

    for column in [*form.columns, *(c for c in ("experts", "top_k") if c in table and c not in form.columns)]:
        values = pd.to_numeric(table[column], errors="coerce")
        bad_rows = np.flatnonzero(~np.isfinite(values.to_numpy(float)))
        if len(bad_rows):
            first = bad_rows[0]
            more = f" (and {len(bad_rows) - 1} more rows)" if len(bad_rows) > 1 else ""
            raise MobileMoEError(
                f"{where}: column '{column}' must hold a finite number in every row; row {first + 1} holds "
                f"{_shown(table[column].iloc[first])}{more}. Fix or remove those rows.")
        table[column] = values
    bad = table[(table["params"] <= 0) | (table["tokens"] <= 0) | (table["loss"] <= 0)]
    if len(bad):
        raise MobileMoEError(f"{where}: params, tokens and loss must be positive; {len(bad)} row(s) are not, "
                             f"e.g. row {bad.index[0]}")


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _columns(table) -> dict[str, np.ndarray]:
    cols = {"params": table["params"].to_numpy(float), "tokens": table["tokens"].to_numpy(float),
            "loss": table["loss"].to_numpy(float)}
    if "experts" in table:
        cols["sparsity"] = table["experts"].to_numpy(float) / table["top_k"].clip(lower=1).to_numpy(float)
    return cols


# --- one fit ---------------------------------------------------------------------------------------------
def _objective(theta: np.ndarray, form: LawForm, cols: dict[str, np.ndarray], delta: float) -> float:
    residual = logsumexp(form.log_terms(theta, cols), axis=0) - np.log(cols["loss"])
    return float(huber(delta, residual).sum())


def _start_grid(form: LawForm) -> np.ndarray:
    grids = [*BASE_GRID.values()] + ([*MOE_GRID.values()] if form is JOINT_MOE else [])
    return np.array(list(itertools.product(*grids)))


def _grid_objectives(starts: np.ndarray, form: LawForm, cols: dict[str, np.ndarray], delta: float) -> np.ndarray:
    """The objective at every start, vectorised (thousands of starts; L-BFGS runs only from the best)."""
    out = np.empty(len(starts))
    for i in range(0, len(starts), 2048):
        chunk = starts[i:i + 2048].T[:, :, None]  # [n_coef, chunk, 1] broadcasts against [n_points]
        residual = logsumexp(form.log_terms(chunk, cols), axis=0) - np.log(cols["loss"])
        out[i:i + 2048] = huber(delta, residual).sum(axis=-1)
    return out


def _lbfgs(theta0: np.ndarray, form: LawForm, cols: dict[str, np.ndarray], delta: float) -> tuple[np.ndarray, float]:
    # Tight tolerances: the objective is ~1e-4 in size, so scipy's defaults stop far from the minimum
    # (the point Besiroglu et al. make about Hoffmann et al.'s published fit).
    res = minimize(_objective, theta0, args=(form, cols, delta), method="L-BFGS-B",
                   options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
    return res.x, float(res.fun)


def fit_points(form: LawForm, cols: dict[str, np.ndarray], delta: float = 1e-3, n_starts: int = 16) -> np.ndarray:
    """Best fitting-space theta: L-BFGS from the `n_starts` best points of the start grid."""
    starts = _start_grid(form)
    best = starts[np.argsort(_grid_objectives(starts, form, cols, delta))[:n_starts]]
    results = [_lbfgs(theta0, form, cols, delta) for theta0 in best]
    return min(results, key=lambda r: r[1])[0]


def _quality(form: LawForm, coefficients: dict[str, float], cols: dict[str, np.ndarray], delta: float) -> dict:
    predicted = form.predict(coefficients, cols)
    residual = np.log(predicted) - np.log(cols["loss"])
    total = ((cols["loss"] - cols["loss"].mean()) ** 2).sum()
    return {"huber_objective": float(huber(delta, residual).sum()), "rmse_log": float(np.sqrt((residual ** 2).mean())),
            "r2": float(1 - ((cols["loss"] - predicted) ** 2).sum() / total) if total > 0 else float("nan")}


def fit_group(form: LawForm, cols: dict[str, np.ndarray], delta: float, bootstrap: int, seed: int) -> GroupFit:
    theta = fit_points(form, cols, delta)
    coefficients = form.to_coefficients(theta)
    n = len(cols["loss"])
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):  # each resample restarts from the full-data optimum: cheap and stable
        idx = rng.integers(0, n, n)
        samples.append(form.to_coefficients(_lbfgs(theta, form, {k: v[idx] for k, v in cols.items()}, delta)[0]))
    ci95 = {name: [float(np.percentile([s[name] for s in samples], 2.5)),
                   float(np.percentile([s[name] for s in samples], 97.5))] for name in form.coefficients} \
        if samples else {}
    return GroupFit(coefficients, ci95, n, _quality(form, coefficients, cols, delta))


def _need_points(n: int, form: LawForm, what: str) -> str | None:
    need = len(form.coefficients) + 1
    return None if n >= need else (f"{what} has {n} point(s); the {form.name} law has {len(form.coefficients)} "
                                   f"coefficients, so at least {need} are needed")


def fit_table(table, law: str, source: str = "", delta: float = 1e-3, bootstrap: int = 100,
              drop_highest: int = 0, seed: int = 0) -> FitResult:
    """Fit `law` to a results table. joint-moe: one fit per (granularity, top-k, shared) group, each on the
    group's MoE rows plus every dense row (experts == 1, Ê = 1: they pin the dense part of the law), and a
    Chinchilla fit of the dense rows alone as group `dense`."""
    import pandas as pd

    form = get_form(law)
    check_columns(table, form, source or "results table")
    if drop_highest:  # Epoch leaves out the highest-loss points (tiny models far from the law's regime)
        table = table.sort_values("loss").iloc[:-drop_highest]
    if form is CHINCHILLA:
        problem = _need_points(len(table), form, "the table")
        if problem:
            raise MobileMoEError(problem)
        groups = {"all": fit_group(form, _columns(table), delta, bootstrap, seed)}
        return FitResult(form, groups, source, delta, drop_highest)

    dense = table[table["experts"] <= 1]
    moe = table[table["experts"] > 1]
    groups, skipped = {}, {}
    if _need_points(len(dense), CHINCHILLA, "dense") is None:
        fit = fit_group(CHINCHILLA, _columns(dense), delta, bootstrap, seed)
        extras = {"delta": 0.0, "gamma": 0.0, "omega": 0.0, "zeta": 0.0}
        c = fit.coefficients
        fit.coefficients = {"A": c["A"], "B": c["B"], "c": c["E"], "alpha": c["alpha"], "beta": c["beta"], **extras}
        fit.ci95 = {("c" if k == "E" else k): v for k, v in fit.ci95.items()}
        groups[DENSE_GROUP] = fit
    for (g, k, shared), rows in moe.groupby(["granularity", "top_k", "shared"]):
        key = group_key(int(g), int(k), bool(shared))
        both = _columns(pd.concat([rows, dense]))
        problem = _need_points(len(both["loss"]), form, f"group {key} (its MoE rows plus the dense rows)")
        if problem:
            skipped[key] = problem
            continue
        groups[key] = fit_group(form, both, delta, bootstrap, seed)
    if not any(k != DENSE_GROUP for k in groups):
        raise MobileMoEError("no MoE group could be fitted: " + ("; ".join(skipped.values()) or
                                                                  "the table has no rows with experts > 1"))
    return FitResult(form, groups, source, delta, drop_highest, skipped)


def write_fit(result: FitResult, table, out_dir: str | Path) -> list[Path]:
    """coefficients.json plus the three figures; returns the files written."""
    from mobilemoe.scaling.plots import plot_fit

    out = Path(out_dir)
    path = out / f"{result.law.name}_fit.json"
    atomic_write_json(path, result.to_json())
    return [path, *plot_fit(result, table, out)]
