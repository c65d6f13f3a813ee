"""Scaling laws: recovery of known coefficients, the real Chinchilla data, the planner's budgets, sweep resume."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mobilemoe.config import get_preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import build_on_meta, count_parameters
from mobilemoe.scaling.fit import fit_table, load_table, write_fit
from mobilemoe.scaling.laws import CHINCHILLA, JOINT_MOE, paper_scale_law
from mobilemoe.scaling.plan import Candidate, count_params, decode_tok_s, load_profile, plan

CHINCHILLA_CSV = Path("/work/shared/data/chinchilla_epoch_replication.csv")
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


@pytest.mark.skipif(not CHINCHILLA_CSV.exists(), reason="shared published data not on this machine")
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


def test_planner_respects_every_budget():
    law = paper_scale_law()
    feasible, scored = plan(law, memory_bytes=0.75e9, max_active=3e8, tokens=6e12)
    assert feasible and all(c.int4_bytes <= 0.75e9 and c.active <= 3e8 for c in feasible)
    assert feasible[0].predicted_loss == min(c.predicted_loss for c in feasible)
    assert any(c.int4_bytes > 0.75e9 for c in scored)  # the budget really cut something
    profile = load_profile("apple-a18-pro")
    fast, _ = plan(law, 3e9, 1e9, 6e12, min_decode_tok_s=200, profile=profile)
    assert all(decode_tok_s(c, profile) >= 200 for c in fast)
    with pytest.raises(MobileMoEError, match="no architecture meets the budgets"):
        plan(law, memory_bytes=1e6, max_active=1e9, tokens=6e12)
    with pytest.raises(MobileMoEError, match="unknown device profile"):
        load_profile("nokia-3310")


@pytest.mark.parametrize("preset, memory, max_active", [("mobilemoe-s", 0.75e9, 2.8e8),
                                                         ("mobilemoe-m", 1.6e9, 5.3e8),
                                                         ("mobilemoe-l", 3.0e9, 9.3e8)])
def test_paper_scale_law_proposes_the_mobilemoe_shapes(preset, memory, max_active):
    cfg = get_preset(preset)
    top_two = plan(paper_scale_law(), memory, max_active, tokens=6e12)[0][:2]
    assert all((c.n_layers, c.d_model, c.experts, c.top_k, c.shared) == (cfg.n_layers, cfg.d_model, 8, 1, True)
               for c in top_two)
    assert 8 in {c.granularity for c in top_two}  # the preset's own granularity is one of the two


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
