"""FLOPs accounting and `mobilemoe train --dry-run` on the paper's recipes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mobilemoe.cli import main
from mobilemoe.config import get_preset
from mobilemoe.errors import ConfigError
from mobilemoe.train.flops import device_peak, flops_per_token, peak_memory_mb, recipe_cost
from mobilemoe.train.recipe import load_recipe, parse_recipe

RECIPES = Path(__file__).parents[1] / "recipes"
BENCH = Path(__file__).parents[1] / "bench"


def test_flops_per_token_matches_a_hand_count():
    # micro-dense: vocab 4096, d 64, 2 layers, 4 heads (2 kv) of 16, SwiGLU 256, tied embeddings.
    attn = 64 * 64 + 2 * (64 * 32) + 64 * 64
    layer = attn + 3 * 64 * 256 + 2 * 64  # + two RMSNorm scales
    matmul = 2 * layer + 64 + 4096 * 64  # + final norm + the tied head (the input lookup is no matmul)
    assert flops_per_token(get_preset("micro-dense"), 256) == 6 * matmul + 12 * 2 * 4 * 16 * 256
    # micro-moe: 30 routed experts of 64 (top-2), one shared expert of 128, a 30-way router.
    layer = attn + 2 * 3 * 64 * 64 + 3 * 64 * 128 + 64 * 30 + 2 * 64
    matmul = 2 * layer + 64 + 4096 * 64
    assert flops_per_token(get_preset("micro-moe"), 256) == 6 * matmul + 12 * 2 * 4 * 16 * 256


@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_dry_run_on_the_paper_recipes(size, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPES / f"mobilemoe-{size}.yaml")
    tokens = {s.name: s.steps * s.batch_size * s.grad_accum * s.seq_len for s in recipe.stages}
    assert tokens["pretrain"] == pytest.approx(6e12, rel=0.01)
    assert tokens["midtrain"] == pytest.approx(5e11, rel=0.01)
    assert tokens["sft"] == pytest.approx(1.26e11, rel=0.01) and tokens["qat"] == pytest.approx(2.1e10, rel=0.01)
    main(["train", str(RECIPES / f"mobilemoe-{size}.yaml"), "--dry-run", "--device-profile", "h200", "--mfu", "0.4"])
    out = capsys.readouterr().out
    assert f"recipe 'mobilemoe-{size}' is valid" in out and "GPU-hours" in out and "1,430,512" in out
    assert not any(tmp_path.iterdir())  # wrote nothing, opened no data
    costs = recipe_cost(recipe, device_peak("h200"), 0.4)
    hours = costs[0].flops / (989e12 * 0.4) / 3600
    assert costs[0].gpu_hours == pytest.approx(hours) and f"{hours:,.0f}" in out


def test_bad_hub_recipes_are_refused():
    recipe = yaml.safe_load((RECIPES / "mobilemoe-s.yaml").read_text())
    with pytest.raises(ConfigError, match="hub_data.dclm must be a dataset name"):
        parse_recipe({**recipe, "hub_data": {**recipe["hub_data"], "dclm": "not a name"}})
    with pytest.raises(ConfigError, match="mixture source 'dclm' is not in hub_data"):
        parse_recipe({**recipe, "hub_data": {k: v for k, v in recipe["hub_data"].items() if k != "dclm"}})
    with pytest.raises(ConfigError, match="hub_data needs 'tokenizer'"):
        parse_recipe({k: v for k, v in recipe.items() if k != "tokenizer"})
    with pytest.raises(ConfigError, match="exactly one of 'data'"):
        parse_recipe({**recipe, "data": "recipes/data/embedded.yaml"})
    with pytest.raises(ConfigError, match="--mfu must be in"):
        recipe_cost(parse_recipe(recipe), device_peak("h100"), 1.5)
    with pytest.raises(ConfigError, match="unknown device profile 'tpu'"):
        device_peak("tpu")


def test_a_paper_recipe_without_the_hub_stops_clearly(tmp_path, capsys, monkeypatch):
    """Offline, training a paper recipe stops at its tokenizer (or, when that is cached, its first dataset) with one
    message and writes nothing (tests/test_train_stream.py trains such a recipe from local dataset directories)."""
    import huggingface_hub.constants  # a submodule: huggingface_hub 2.x no longer imports it with the package

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(RECIPES / "mobilemoe-s.yaml"), "--out", str(tmp_path / "run")])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code != 0
    assert "could not download the tokenizer of 'meta-llama/Llama-3.2-1B-Instruct'" in err or (
        "could not open Hugging Face dataset" in err)
    assert not (tmp_path / "run").exists()


def test_peak_memory_is_the_resident_high_water_mark():
    assert peak_memory_mb() > 10  # this Python process with torch loaded holds well over 10 MiB


def test_gpu_train_bench_runs_two_fsdp_processes_on_cpu(tmp_path):
    """bench/gpu_train.py's code path (FSDP2 bf16 mixed precision, fused AdamW, MFU, peak memory) at micro size on
    CPU under torchrun; on a GPU machine the same script trains full-size MobileMoE-S."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29541", str(BENCH / "gpu_train.py"), "--preset", "micro-moe",
                             "--device", "cpu", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "0",
                             "--no-compile", "--json", str(tmp_path / "result.json")], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu bf16 (FSDP2 mixed precision)" in result.stdout and "MFU" in result.stdout
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["processes"] == 2 and r["timed_steps"] == 2 and r["tokens_per_s"] > 0
    assert 0 < r["mfu"] < 1 and r["peak_memory_mb"] > 0 and math.isfinite(r["last_loss"])
