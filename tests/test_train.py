"""The trainer on tiny data made here: every stage, resume, QAT, distributed, and the failure modes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mobilemoe.checkpoint import load_model, save_model
from mobilemoe.config import get_preset
from mobilemoe.data import PackedBatches
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Transformer
from mobilemoe.quantize import prepare_qat
from mobilemoe.train import run_recipe
from mobilemoe.train.plots import plot_run


@pytest.fixture(scope="module")
def data_recipe(tmp_path_factory, write_tiny_corpus):
    root = tmp_path_factory.mktemp("data")
    prose, chat = write_tiny_corpus(root, docs=30, sentences=30, chats=60)
    recipe = root / "data.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "val_fraction": 0.1, "tokenizer": {"train_bpe": 300},
        "sources": {"prose": {"kind": "pretrain", "from": [str(prose)]},
                    "chat": {"kind": "sft", "from": [str(chat)]}}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILEMOE_CACHE", str(root / "cache"))
        yield recipe


def _stage(name, kind, mixture, **kw):
    return {"name": name, "kind": kind, "mixture": mixture, "steps": 4, "seq_len": 32, "batch_size": 4,
            "lr": 3e-3, "eval_every": 2, "eval_batches": 2, "checkpoint_every": 2, "log_every": 1, **kw}


def _recipe(data_recipe, stages, model="micro-moe"):
    return {"name": "t", "seed": 7, "model": model, "data": str(data_recipe), "stages": stages}


def _losses(run_dir: Path, stage: str):
    return [r["loss"] for r in map(json.loads, (run_dir / stage / "metrics.jsonl").read_text().splitlines())]


def test_four_stages_chain_and_report(data_recipe, tmp_path):
    stages = [_stage("pretrain", "pretrain", {"prose": 1.0}),
              _stage("midtrain", "midtrain", {"prose": 1.0}, schedule="linear", lr=1e-3),
              _stage("sft", "sft", {"chat": 1.0}, lr=1e-3),
              _stage("qat", "qat", {"chat": 1.0}, lr=1e-4)]
    summary = run_recipe(_recipe(data_recipe, stages), tmp_path / "run")
    assert list(summary["stages"]) == ["pretrain", "midtrain", "sft", "qat"]
    assert summary["tokens"] == 4 * 4 * 32 and summary["params_active"] < summary["params_total"]
    for name in summary["stages"]:
        assert (tmp_path / "run" / name / "final" / "model.safetensors").is_file()
        assert (tmp_path / "run" / name / "best" / "model.safetensors").is_file()
    assert load_model(tmp_path / "run" / "qat" / "final").int4
    assert not load_model(tmp_path / "run" / "sft" / "final").int4
    records = [json.loads(line) for line in (tmp_path / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(records[0]["expert_load"]) == 2 and abs(sum(records[0]["expert_load"][0]) - 1) < 1e-5
    assert any("val_loss" in r for r in records)
    assert all(0 < r["mfu"] < 1 and r["peak_memory_mb"] > 0 for r in records)
    # each stage starts from the previous one's weights: midtrain's first loss is below pretrain's first
    assert _losses(tmp_path / "run", "midtrain")[0] < _losses(tmp_path / "run", "pretrain")[0]
    assert {p.name for p in plot_run(tmp_path / "run")} == {"loss.png"} | {
        f"expert_load_{s}.png" for s in summary["stages"]}
    # finished stages are skipped on a re-run
    again = run_recipe(_recipe(data_recipe, stages), tmp_path / "run")
    assert again["stages"] == summary["stages"]


def test_resume_reproduces_the_uninterrupted_run(data_recipe, tmp_path, monkeypatch):
    recipe = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}, steps=6, checkpoint_every=3)])
    run_recipe(recipe, tmp_path / "a")
    calls = {"n": 0}
    original = PackedBatches.__next__

    def crash_on_fifth(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(PackedBatches, "__next__", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "b")
    monkeypatch.setattr(PackedBatches, "__next__", original)
    with pytest.raises(MobileMoEError, match="pass --resume"):
        run_recipe(recipe, tmp_path / "b")
    run_recipe(recipe, tmp_path / "b", resume=True)
    assert _losses(tmp_path / "b", "pretrain")[-3:] == _losses(tmp_path / "a", "pretrain")[-3:]
    a, b = load_model(tmp_path / "a" / "pretrain" / "final"), load_model(tmp_path / "b" / "pretrain" / "final")
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_qat_prepare_then_int4_checkpoint_is_what_qat_trained(tmp_path):
    torch.manual_seed(0)
    model = prepare_qat(Transformer(get_preset("micro-moe")))
    tokens = torch.randint(0, 4096, (2, 16))
    model(tokens, tokens).loss.backward()
    assert model.layers[0].ffn.parametrizations.gate_up_proj.original.grad.abs().sum() > 0
    assert model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0
    from mobilemoe.train.trainer import plain_state

    plain = Transformer(get_preset("micro-moe"))
    plain.load_state_dict(plain_state(model))
    save_model(tmp_path / "q", plain, int4=True)
    loaded = load_model(tmp_path / "q").model
    expert = model.layers[0].ffn.gate_up_proj  # the fake-quantized view QAT trains through
    assert torch.equal(loaded.layers[0].ffn.gate_up_proj, expert.detach())
    assert torch.equal(loaded.embed.weight, model.embed.weight.detach())
    with torch.no_grad():
        qat_logits, int4_logits = model(tokens).logits, loaded(tokens).logits
    assert (qat_logits - int4_logits).abs().max() < 0.05 * qat_logits.abs().max()  # int8 activations differ


def test_nan_loss_stops_and_names_the_step(data_recipe, tmp_path):
    model = Transformer(get_preset("micro-moe"))
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    save_model(tmp_path / "bad", model)
    recipe = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}, init_from=str(tmp_path / "bad"))])
    with pytest.raises(MobileMoEError, match="loss became nan at step 0.*Last good checkpoint: none"):
        run_recipe(recipe, tmp_path / "run")


def test_stage_without_its_input_checkpoint(data_recipe, tmp_path):
    recipe = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}), _stage("sft", "sft", {"chat": 1})])
    with pytest.raises(MobileMoEError, match="--stage pretrain` first"):
        run_recipe(recipe, tmp_path / "run", stage="sft")


def test_checkpoint_of_another_architecture(data_recipe, tmp_path):
    save_model(tmp_path / "dense", Transformer(get_preset("micro-dense")))
    recipe = _recipe(data_recipe, [_stage("sft", "sft", {"chat": 1.0}, init_from=str(tmp_path / "dense"))])
    with pytest.raises(MobileMoEError, match="'micro-dense' model whose architecture differs from the recipe's "
                                             "model 'micro-moe' \\(ffn_size 256 vs 0; n_routed_experts 0 vs 30"):
        run_recipe(recipe, tmp_path / "run")


def test_unknown_mixture_source(data_recipe, tmp_path):
    recipe = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"wiki": 1.0})])
    with pytest.raises(MobileMoEError, match="data source 'wiki'.*known sources: chat, prose"):
        run_recipe(recipe, tmp_path / "run")


def test_disk_full_keeps_the_previous_checkpoint(data_recipe, tmp_path, monkeypatch):
    import mobilemoe.train.trainer as trainer

    recipe = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}, steps=6)])
    real_save, calls = trainer.save_file, {"n": 0}

    def full_disk_on_second_checkpoint(tensors, path, *args, **kwargs):
        if str(path).endswith("optimizer.safetensors"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_file", full_disk_on_second_checkpoint)
    with pytest.raises(MobileMoEError, match="no space left on the device.*previous version.*untouched"):
        run_recipe(recipe, tmp_path / "run")
    kept = sorted((tmp_path / "run" / "pretrain" / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-0000002"]
    assert json.loads((kept[0] / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(data_recipe, tmp_path, mode):
    one = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}, batch_size=4, steps=3)])
    two = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}, batch_size=2, steps=3)])
    run_recipe(one, tmp_path / "one")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", "-m", "mobilemoe", "train", str(tmp_path / "two.yaml"),
                             "--out", str(tmp_path / "two"), "--parallel", mode], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _losses(tmp_path / "two", "pretrain") == pytest.approx(_losses(tmp_path / "one", "pretrain"), rel=1e-4)


def test_cli_reports_bad_recipe_without_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\nmodel: micro-moe\ndata: d.yaml\nstages:\n  - {name: a, mixtur: {}}\n")
    result = subprocess.run([sys.executable, "-m", "mobilemoe", "train", str(tmp_path / "r.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown key 'mixtur'; did you mean 'mixture'" in result.stderr and "Traceback" not in result.stderr
