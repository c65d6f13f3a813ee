"""`mobilemoe scaling sweep`: a grid of architectures trained through the normal trainer, resumably.

A spec (YAML):

    name: cpu_sweep
    recipe: ../quickstart.yaml      # its data and first stage are the template; `stage` overrides fields
    stage: {steps: 200, seq_len: 128, batch_size: 8, eval_every: 100, checkpoint_every: 100}
    base: {n_layers: 4, vocab_size: 4096, max_seq_len: 512, rope_theta: 10000.0, rope_scaling: null}
    grid:                           # each entry is expanded as a product; experts 1 = dense
      - {d_model: [64, 96, 128], experts: [1], steps: [100, 200, 400]}
      - {d_model: [64, 96, 128], experts: [8], granularity: [1, 4], shared: [false]}

`steps` (optional) varies the training tokens per run (a fresh schedule per budget, as Chinchilla-style
fits need); a point at the stage's own steps keeps the plain run name, others get `-s<steps>`.
Each point is a run directory under `<out>/runs/<name>`; a finished one (summary.json) is never redone,
an interrupted one resumes from its checkpoints. `results.csv` is rebuilt from every finished run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

from mobilemoe.config import from_dict, granular_moe
from mobilemoe.io import atomic_write_text, read_mapping
from mobilemoe.ui import console

COLUMNS = ["run", "d_model", "n_layers", "experts", "top_k", "granularity", "shared", "params", "total_params",
           "tokens", "flops", "loss", "best_loss", "wall_time_s"]


@dataclasses.dataclass
class SweepSpec:
    """The keys of a sweep spec (see the module docstring), checked by `config.from_dict`."""

    name: str
    recipe: str
    grid: list[dict[str, Any]]
    stage: dict[str, Any] = dataclasses.field(default_factory=dict)
    base: dict[str, Any] = dataclasses.field(default_factory=dict)
    out: str | None = None


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    points = []
    for entry in spec["grid"]:
        keys = list(entry)
        for values in itertools.product(*(v if isinstance(v, list) else [v] for v in entry.values())):
            defaults = {"experts": 1, "top_k": 1, "granularity": 1, "shared": False}
            points.append({**defaults, **dict(zip(keys, values, strict=True))})
    return points


def run_name(p: dict[str, Any], default_steps: int) -> str:
    steps = f"-s{p['steps']}" if p.get("steps", default_steps) != default_steps else ""
    if p["experts"] == 1:
        return f"dense-d{p['d_model']}{steps}"
    shared = "-shared" if p["shared"] else ""
    return f"moe-d{p['d_model']}-E{p['experts']}-k{p['top_k']}-g{p['granularity']}{shared}{steps}"


def model_spec(p: dict[str, Any], base: dict[str, Any], name: str) -> dict[str, Any]:
    d = p["d_model"]
    heads = max(2, d // 32)
    shape = (granular_moe(d, p["experts"], p["granularity"], p["top_k"],
                          shared_slots=p["top_k"] * p["granularity"] // 2 if p["shared"] else 0)
             if p["experts"] > 1 else {"ffn_size": 4 * d, "n_routed_experts": 0})
    return {**base, "name": name, "d_model": d, "n_heads": heads, "n_kv_heads": heads // 2,
            "head_dim": d // heads, **shape}


def run_sweep(spec_path: str | Path, out: str | Path | None = None) -> Path:
    from mobilemoe.train.recipe import StageConfig, load_recipe
    from mobilemoe.train.trainer import run_recipe

    spec_path = Path(spec_path)
    spec = dataclasses.asdict(from_dict(SweepSpec, read_mapping(spec_path), str(spec_path)))
    template = load_recipe(spec_path.parent / spec["recipe"])
    stage = from_dict(StageConfig, {**dataclasses.asdict(template.stages[0]), **spec["stage"]},
                      f"{spec_path}: stage").validate(f"{spec_path}: stage")
    out = Path(out or spec["out"] or f"results/scaling/{spec['name']}")
    points = expand(spec)
    n_layers = spec.get("base", {}).get("n_layers", template.model_config().n_layers)
    names = [run_name(p, stage.steps) for p in points]
    for i, (p, name) in enumerate(zip(points, names, strict=True)):
        run_dir = out / "runs" / name
        if (run_dir / "summary.json").exists():
            continue
        console.rule(f"[bold]{i + 1}/{len(points)} {name}")
        run_stage = dataclasses.replace(stage, steps=p.get("steps", stage.steps))
        recipe = dataclasses.replace(template, name=name, model=model_spec(p, spec.get("base", {}), name),
                                     stages=[run_stage])
        run_recipe(recipe, run_dir, resume=(run_dir / "recipe.yaml").exists())
        write_results(points, names, out, n_layers)
    return write_results(points, names, out, n_layers)


def write_results(points: list[dict[str, Any]], names: list[str], out: Path, n_layers: int) -> Path:
    rows = []
    for p, name in zip(points, names, strict=True):
        summary = out / "runs" / name / "summary.json"
        if not summary.exists():
            continue
        s = json.loads(summary.read_text())
        rows.append({"run": name, "d_model": p["d_model"], "n_layers": n_layers, "experts": p["experts"],
                     "top_k": p["top_k"], "granularity": p["granularity"], "shared": int(p["shared"]),
                     "params": s["params_active"], "total_params": s["params_total"], "tokens": s["tokens"],
                     "flops": s["flops_per_token"] * s["tokens"], "loss": s["final_val_loss"],
                     "best_loss": s["best_val_loss"], "wall_time_s": round(s["wall_time_s"], 1)})
    path = out / "results.csv"
    lines = [",".join(COLUMNS)] + [",".join(str(r[c]) for c in COLUMNS) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
