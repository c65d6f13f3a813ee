"""Scaling laws: recovery of known coefficients, the real Chinchilla data, the planner's budgets, sweep resume."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mobilemoe.errors import ConfigError, MobileMoEError
from mobilemoe.model import build_on_meta, count_parameters
from mobilemoe.quantize import INT4_BYTES_PER_PARAM
from mobilemoe.scaling.fit import fit_table, load_table, write_fit
from mobilemoe.scaling.laws import CHINCHILLA, JOINT_MOE, Law, paper_scale_law
from mobilemoe.scaling.plan import (
    Candidate,
    candidates,
    count_params,
    decode_tok_s,
    load_profile,
    pareto_front,
    plan,
)

CHINCHILLA_CSV = Path(__file__).parents[1] / "data" / "chinchilla_epoch_replication.csv"  # see data/README.md
TRUE = {"A": 400.0, "B": 1800.0, "E": 1.7, "alpha": 0.34, "beta": 0.28}


def _synthetic(seed=0, noise=0.005):
    rng = np.random.default_rng(seed)
    n = 10 ** rng.uniform(7, 10, 120)
    d = 10 ** rng.uniform(9, 12, 120)
    loss = CHINCHILLA.predict(TRUE, {"params": n, "tokens": d}) * np.exp(rng.normal(0, noise, 120))
    return pd.DataFrame({"params": n, "tokens": d, "loss": loss})


def test_fit_recovers_a_known_law_from_noisy_data(tmp_path):
    result = fit_table(_synthetic(), "chinchilla", bootstrap=3)
    got = result.groups["all"].coefficients
    assert got["E"] == pytest.approx(TRUE["E"], rel=0.03)
    assert got["alpha"] == pytest.approx(TRUE["alpha"], abs=0.03)
    assert got["beta"] == pytest.approx(TRUE["beta"], abs=0.03)
    assert result.groups["all"].quality["r2"] > 0.98
    files = write_fit(result, _synthetic(), tmp_path)
    assert json.loads(files[0].read_text())["groups"]["all"]["coefficients"]["E"] == got["E"]
    assert all(f.exists() for f in files) and len(files) == 4


def test_fit_on_real_chinchilla_data_matches_epochs_refit():
    table = load_table(CHINCHILLA_CSV, {"Model Size": "params", "Training FLOP": "flops"})
    got = fit_table(table, "chinchilla", bootstrap=0, drop_highest=5).groups["all"].coefficients
    assert got["E"] == pytest.approx(1.82, abs=0.02)
    assert got["alpha"] == pytest.approx(0.348, abs=0.01) and got["beta"] == pytest.approx(0.366, abs=0.01)


@pytest.mark.slow  # ~40k starting points x 9 coefficients: a minute or two on 2 cores
def test_joint_moe_fit_on_a_tiny_table():
    rng = np.random.default_rng(1)
    truth = {"A": 300.0, "B": 900.0, "c": 1.5, "alpha": 0.3, "beta": 0.25, "delta": -0.3, "gamma": 0.0,
             "omega": 0.0, "zeta": 0.0}
    rows = []
    for experts in (1, 8):
        for n, d in zip(10 ** rng.uniform(6, 9, 20), 10 ** rng.uniform(8, 11, 20), strict=True):
            cols = {"params": np.array([n]), "tokens": np.array([d]), "sparsity": np.array([float(experts)])}
            rows.append({"params": n, "tokens": d, "loss": JOINT_MOE.predict(truth, cols)[0], "experts": experts,
                         "top_k": 1, "granularity": 4, "shared": False})
    result = fit_table(pd.DataFrame(rows), "joint-moe", bootstrap=0)
    assert set(result.groups) == {"dense", "g4-k1-noshared"}
    assert result.groups["g4-k1-noshared"].coefficients["delta"] == pytest.approx(-0.3, abs=0.05)


def test_fit_errors_are_clear():
    with pytest.raises(MobileMoEError, match="missing column"):
        fit_table(pd.DataFrame({"params": [1.0], "loss": [2.0]}), "chinchilla")
    with pytest.raises(MobileMoEError, match="at least 6 are needed"):
        fit_table(_synthetic().iloc[:4], "chinchilla")


def test_fast_counts_equal_the_built_module():
    for arch in ((20, 768, 8, 1, 8, True), (16, 512, 4, 2, 2, False), (24, 1024, 1, 1, 1, False)):
        cfg = Candidate(*arch, 0, 0).config()
        built = count_parameters(build_on_meta(cfg))
        assert count_params(*arch) == (built.active, built.total)


# --- the planner's logic, on synthetic laws and device profiles ------------------------------------------
DENSE_ONLY_IN_N = Law(CHINCHILLA, {"all": TRUE}, source="synthetic chinchilla")
# A joint law that knows the dense group and one MoE group, whose MoE term is strongly favourable.
_BASE = {"A": 400.0, "B": 1800.0, "c": 1.7, "alpha": 0.34, "beta": 0.28, "gamma": 0.0, "omega": 0.0, "zeta": 0.0}
TWO_GROUPS = Law(JOINT_MOE, {"dense": {**_BASE, "delta": 0.0}, "g2-k1-noshared": {**_BASE, "delta": -0.5}},
                 source="synthetic joint")


def _meets(c, memory, max_active, min_tok_s=None, profile=None):
    return (c.int4_bytes <= memory and c.active <= max_active
            and (min_tok_s is None or decode_tok_s(c, profile) >= min_tok_s))


@pytest.mark.parametrize("law", [DENSE_ONLY_IN_N, TWO_GROUPS], ids=["chinchilla", "joint"])
@pytest.mark.parametrize("memory, max_active", [(0.5e9, 2e8), (2e9, 6e8), (1e10, 3e9)])
def test_plan_is_the_best_feasible_candidate(law, memory, max_active):
    feasible, scored = plan(law, memory, max_active, tokens=1e12)
    # exactly the scored candidates within every budget, best first, each scored by the law
    assert {c.label() for c in feasible} == {c.label() for c in scored if _meets(c, memory, max_active)}
    assert [c.predicted_loss for c in feasible] == sorted(c.predicted_loss for c in feasible)
    for c in feasible[:: max(1, len(feasible) // 20)]:
        assert c.predicted_loss == law.predict_one(c.active, 1e12, c.experts, c.top_k, c.granularity, c.shared)
    assert any(not _meets(c, memory, max_active) for c in scored)  # the budgets really cut something
    # a looser budget never plans worse, a tighter one never better
    looser, _ = plan(law, memory * 2, max_active * 2, tokens=1e12)
    assert looser[0].predicted_loss <= feasible[0].predicted_loss
    best = feasible[0]
    tighter, _ = plan(law, best.int4_bytes, best.active, tokens=1e12)  # budgets at the plan itself: it still fits
    assert tighter[0].predicted_loss == best.predicted_loss


def test_plan_follows_the_law_not_the_shapes():
    # loss falls with active parameters only: the plan uses as many active parameters as the budgets allow
    feasible, _ = plan(DENSE_ONLY_IN_N, 2e9, 4e8, tokens=1e12)
    assert feasible[0].active == max(c.active for c in feasible)
    # a law that knows only dense and g2-k1-noshared scores only those, and its MoE gain wins when memory allows
    feasible, scored = plan(TWO_GROUPS, 1e10, 4e8, tokens=1e12)
    assert {(c.granularity, c.top_k, c.shared) for c in scored if c.experts > 1} == {(2, 1, False)}
    assert feasible[0].experts > 1
    dense_best = min((c for c in feasible if c.experts == 1), key=lambda c: c.predicted_loss)
    assert feasible[0].predicted_loss < dense_best.predicted_loss


def test_decode_speed_budget_on_a_synthetic_device(tmp_path):
    (tmp_path / "slow-phone.yaml").write_text("name: slow-phone\nmemory_bandwidth_gb_s: 10\nmatmul_gflops: 200\n")
    profile = load_profile(str(tmp_path / "slow-phone.yaml"))
    c = Candidate(20, 768, 8, 1, 8, True, *count_params(20, 768, 8, 1, 8, True))
    # roofline: the slower of streaming the active INT4 weights and 2 FLOPs per active parameter
    assert decode_tok_s(c, profile) == pytest.approx(min(10e9 / (c.active * INT4_BYTES_PER_PARAM),
                                                         200e9 / (2 * c.active)))
    unconstrained, _ = plan(DENSE_ONLY_IN_N, 3e9, 1e9, 1e12)
    speed = decode_tok_s(unconstrained[0], profile) * 1.5  # the unconstrained plan is too slow for this
    fast, scored = plan(DENSE_ONLY_IN_N, 3e9, 1e9, 1e12, min_decode_tok_s=speed, profile=profile)
    assert {x.label() for x in fast} == {x.label() for x in scored if _meets(x, 3e9, 1e9, speed, profile)}
    assert fast[0].predicted_loss > unconstrained[0].predicted_loss
    with pytest.raises(ConfigError, match="needs --device"):
        plan(DENSE_ONLY_IN_N, 3e9, 1e9, 1e12, min_decode_tok_s=speed)
    with pytest.raises(MobileMoEError, match="unknown device profile"):
        load_profile("nokia-3310")


@pytest.mark.parametrize("key", ["int4_bytes", "active"])
def test_pareto_front_is_the_non_dominated_set(key):
    _, scored = plan(TWO_GROUPS, 1e12, 1e12, tokens=1e12)
    front = pareto_front(scored, key)
    cost = [getattr(c, key) for c in front]
    assert cost == sorted(cost) and [c.predicted_loss for c in front] == sorted(
        (c.predicted_loss for c in front), reverse=True)

    def dominated(c):
        return any(getattr(o, key) <= getattr(c, key) and o.predicted_loss <= c.predicted_loss
                   and (getattr(o, key), o.predicted_loss) != (getattr(c, key), c.predicted_loss) for o in scored)

    want = {c.label() for c in scored if not dominated(c)}
    assert {c.label() for c in front} == want
    same_cost = [Candidate(16, 512, 1, 1, 1, False, 10, 100, 3.0), Candidate(16, 768, 1, 1, 1, False, 10, 100, 2.5)]
    assert pareto_front(same_cost, key) == same_cost[1:]  # a tie in cost: only the lower loss is on the front


def test_infeasible_budgets_and_unusable_laws_are_clear_errors():
    with pytest.raises(MobileMoEError, match="no architecture meets the budgets.*smallest candidate.*Loosen"):
        plan(DENSE_ONLY_IN_N, memory_bytes=1e6, max_active=1e9, tokens=1e12)
    with pytest.raises(MobileMoEError, match="no architecture meets the budgets"):
        plan(DENSE_ONLY_IN_N, memory_bytes=1e10, max_active=1e3, tokens=1e12)
    unknown_group = Law(JOINT_MOE, {"g3-k3-noshared": {**_BASE, "delta": 0.0}}, source="synthetic")
    with pytest.raises(MobileMoEError, match="coefficients for none of the planner's architecture groups"):
        plan(unknown_group, 1e10, 1e10, 1e12)


def test_shipped_law_covers_every_candidate():
    _, scored = plan(paper_scale_law(), 1e12, 1e12, tokens=6e12)
    assert len(scored) == len(candidates())


def test_sweep_runs_each_point_once_and_resumes(tmp_path, monkeypatch):
    import mobilemoe.train.trainer as trainer
    from mobilemoe.scaling.sweep import run_sweep

    calls, steps = [], {}

    def fake_run(recipe, out, resume=False, **kw):  # bookkeeping only; real training is tested in test_train
        calls.append((recipe.name, resume))
        steps[recipe.name] = recipe.stages[0].steps
        if recipe.name == "moe-d64-E4-k1-g1" and len(calls) == 2:  # crash on its first attempt
            (Path(out) / "recipe.yaml").parent.mkdir(parents=True, exist_ok=True)
            (Path(out) / "recipe.yaml").write_text("x")
            raise KeyboardInterrupt
        summary = {"params_active": 1000, "params_total": 4000, "tokens": 10, "flops_per_token": 6000,
                   "final_val_loss": 3.0, "best_val_loss": 2.9, "wall_time_s": 1.0}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps(summary))

    monkeypatch.setattr(trainer, "run_recipe", fake_run)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "recipe": str(Path("recipes/quickstart.yaml").resolve()),
                                    "grid": [{"d_model": [64], "experts": [1]},
                                             {"d_model": [64], "experts": [4], "granularity": [1]}]}))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path / "out")
    results = run_sweep(spec, tmp_path / "out")
    assert calls == [("dense-d64", False), ("moe-d64-E4-k1-g1", False), ("moe-d64-E4-k1-g1", True)]
    table = pd.read_csv(results)
    assert list(table["run"]) == ["dense-d64", "moe-d64-E4-k1-g1"] and table["flops"].iloc[0] == 60000
    run_sweep(spec, tmp_path / "out")
    assert len(calls) == 3  # finished runs are never redone

    # a token-budget axis: each budget is its own run, named by its steps unless it is the stage default
    default = steps["dense-d64"]
    spec.write_text(yaml.safe_dump({"name": "s", "recipe": str(Path("recipes/quickstart.yaml").resolve()),
                                    "grid": [{"d_model": [64], "experts": [1], "steps": [default, 7]}]}))
    table = pd.read_csv(run_sweep(spec, tmp_path / "out"))
    assert list(table["run"]) == ["dense-d64", "dense-d64-s7"] and steps["dense-d64-s7"] == 7
    assert len(calls) == 4
