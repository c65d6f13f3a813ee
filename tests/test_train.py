"""The trainer on tiny data made here: every stage, resume, QAT, distributed, and the failure modes."""

import json
import os
import shutil
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
from mobilemoe.quantize import Int4Scheme, prepare_qat
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


def test_resume_reproduces_the_uninterrupted_run(data_recipe, tmp_path, interrupted_at):
    recipe = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}, steps=6, checkpoint_every=3)])
    run_recipe(recipe, tmp_path / "a")
    with interrupted_at(PackedBatches, 5), pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "b")
    with pytest.raises(MobileMoEError, match="pass --resume"):
        run_recipe(recipe, tmp_path / "b")
    run_recipe(recipe, tmp_path / "b", resume=True)
    assert _losses(tmp_path / "b", "pretrain")[-3:] == _losses(tmp_path / "a", "pretrain")[-3:]
    a, b = load_model(tmp_path / "a" / "pretrain" / "final"), load_model(tmp_path / "b" / "pretrain" / "final")
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("embedding_bits", [4, 8])
def test_qat_prepare_then_int4_checkpoint_is_what_qat_trained(tmp_path, embedding_bits):
    scheme = Int4Scheme(embedding_bits=embedding_bits)
    torch.manual_seed(0)
    model = prepare_qat(Transformer(get_preset("micro-moe")), scheme)
    tokens = torch.randint(0, 4096, (2, 16))
    model(tokens, tokens).loss.backward()
    assert model.layers[0].ffn.parametrizations.gate_up_proj.original.grad.abs().sum() > 0
    assert model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert model.embed.parametrizations.weight.original.grad.abs().sum() > 0
    from mobilemoe.train.trainer import plain_state

    plain = Transformer(get_preset("micro-moe"))
    plain.load_state_dict(plain_state(model))
    save_model(tmp_path / "q", plain, int4=True, scheme=scheme)
    loaded = load_model(tmp_path / "q")
    assert loaded.scheme == scheme
    expert = model.layers[0].ffn.gate_up_proj  # the fake-quantized view QAT trains through
    assert torch.equal(loaded.model.layers[0].ffn.gate_up_proj, expert.detach())
    assert torch.equal(loaded.model.embed.weight, model.embed.weight.detach())  # int4 g32 or int8 rows, both exact
    with torch.no_grad():
        qat_logits, int4_logits = model(tokens).logits, loaded.model(tokens).logits
    assert (qat_logits - int4_logits).abs().max() < 0.05 * qat_logits.abs().max()  # int8 activations differ


def test_qat_stage_with_an_8bit_embedding(data_recipe, tmp_path):
    """A recipe's QAT stage with `embedding_bits: 8`: its INT4 output keeps the embedding/head as int8 rows, its
    float checkpoints record the scheme (so `--int4` on them applies it), and the INT4 model computes what the
    fake-quantized QAT model computes."""
    from mobilemoe.checkpoint import read_tensors

    stage = _stage("qat", "qat", {"chat": 1.0}, steps=2, eval_every=2, embedding_bits=8)
    run_recipe(_recipe(data_recipe, [stage]), tmp_path / "run")
    final, best = load_model(tmp_path / "run" / "qat" / "final"), load_model(tmp_path / "run" / "qat" / "best")
    assert final.int4 and not best.int4 and final.scheme == best.scheme == Int4Scheme(embedding_bits=8)
    assert read_tensors(tmp_path / "run" / "qat" / "final" / "model.safetensors")[0][
        "embed.weight.qweight"].dtype == torch.int8
    qat = prepare_qat(best.model, best.scheme).eval()  # best/ holds the last step's latent weights
    assert torch.equal(final.model.embed.weight, qat.embed.weight.detach())
    tokens = torch.randint(0, final.model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        qat_logits, int4_logits = qat(tokens).logits, final.model(tokens).logits
    assert (qat_logits - int4_logits).abs().max() < 0.05 * qat_logits.abs().max()


@pytest.mark.parametrize("stage, pattern", [
    ({"kind": "qat", "rounding": "hqq"}, r"HQQ rounding is a post-training \(PTQ\) choice"),
    ({"kind": "sft", "embedding_bits": 8}, r"field 'embedding_bits' sets the INT4 scheme a qat stage trains against"),
    ({"kind": "qat", "embedding_bits": 6}, r"field 'embedding_bits' must be one of 4, 8, got 6"),
], ids=["qat-hqq", "sft-bits", "bits-6"])
def test_qat_scheme_of_a_recipe_is_checked(data_recipe, stage, pattern):
    from mobilemoe.train.recipe import parse_recipe

    with pytest.raises(MobileMoEError, match=pattern):
        parse_recipe(_recipe(data_recipe, [_stage("s", stage.pop("kind"), {"chat": 1.0}, **stage)]))


def test_train_flags_set_the_qat_scheme(data_recipe):
    from mobilemoe.train.recipe import parse_recipe, with_qat_scheme

    stages = [_stage("sft", "sft", {"chat": 1.0}), _stage("qat", "qat", {"chat": 1.0})]
    recipe = parse_recipe(_recipe(data_recipe, stages))
    assert [s.embedding_bits for s in with_qat_scheme(recipe, 8, None).stages] == [4, 8]
    with pytest.raises(MobileMoEError, match="HQQ rounding is a post-training"):
        with_qat_scheme(recipe, None, "hqq")
    with pytest.raises(MobileMoEError, match="recipe 't' has no qat stage"):
        with_qat_scheme(parse_recipe(_recipe(data_recipe, [_stage("sft", "sft", {"chat": 1.0})])), 8, None)


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


@pytest.mark.parametrize(("mode", "precision", "rel"), [("ddp", "fp32", 1e-4), ("fsdp", "fp32", 1e-4),
                                                       ("fsdp", "bf16", 2e-2)])
def test_two_gloo_processes_match_one_process(data_recipe, tmp_path, mode, precision, rel):
    """fp32: the same maths. bf16: FSDP2's mixed-precision policy (bf16 parameters and activations throughout,
    fp32 gradient reduction) vs one process under autocast (fp32 residual stream): bf16 rounding apart."""
    one = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}, batch_size=4, steps=3)])
    two = _recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}, batch_size=2, steps=3)])
    run_recipe({**one, "precision": precision}, tmp_path / "one")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", "-m", "mobilemoe", "train", str(tmp_path / "two.yaml"),
                             "--out", str(tmp_path / "two"), "--parallel", mode, "--device", "cpu",
                             "--precision", precision], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"training on cpu {precision}" in result.stdout
    assert _losses(tmp_path / "two", "pretrain") == pytest.approx(_losses(tmp_path / "one", "pretrain"), rel=rel)


# --- compute modes (train/runtime.py): each against the fp32 eager run, and resumed within the mode -----------
# Tolerance on the 4 pretraining losses of micro-moe (about 5.6 here): bf16 rounds every matmul input to 8 bits
# of mantissa, so its losses sit within 2% of fp32's; activation checkpointing recomputes the same fp32 maths.
MODES = {
    "bf16": ({"precision": "bf16"}, 2e-2),
    "activation_checkpointing": ({"activation_checkpointing": True}, 1e-6),
    "bf16_compile_checkpointing": ({"precision": "bf16", "compile": True, "activation_checkpointing": True}, 2e-2),
}


@pytest.fixture(scope="module")
def fp32_eager_run(data_recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("fp32") / "run"
    run_recipe(_mode_recipe(data_recipe, {}), run)
    return run


def _mode_recipe(data_recipe, mode):
    return {**_recipe(data_recipe, [_stage("pretrain", "pretrain", {"prose": 1.0}, eval_every=4)]), **mode}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "compile" in n else n for n in MODES])
def test_compute_mode_matches_fp32_and_resumes_exactly(data_recipe, fp32_eager_run, tmp_path, name):
    mode, rel = MODES[name]
    recipe = _mode_recipe(data_recipe, mode)
    run_recipe(recipe, tmp_path / "a")
    as_run = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert as_run["device"] == "auto" and {k: as_run[k] for k in mode} == mode
    losses = _losses(tmp_path / "a", "pretrain")
    assert losses == pytest.approx(_losses(fp32_eager_run, "pretrain"), rel=rel)
    # resume from the step-2 checkpoint of the same run: the same losses and bit-identical final weights
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for done in ("pretrain/final", "pretrain/best", "summary.json"):
        shutil.rmtree(tmp_path / "b" / done) if (tmp_path / "b" / done).is_dir() else (tmp_path / "b" / done).unlink()
    run_recipe(recipe, tmp_path / "b", resume=True)
    assert _losses(tmp_path / "b", "pretrain") == losses
    a, b = load_model(tmp_path / "a" / "pretrain" / "final"), load_model(tmp_path / "b" / "pretrain" / "final")
    for (key, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert x.dtype == torch.float32 and torch.equal(x, y), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
def test_cuda_bf16_compile_trains_like_cpu_fp32(data_recipe, fp32_eager_run, tmp_path):
    """CUDA's atomics make its runs reproducible to rounding only, so resume is compared with a tolerance here."""
    recipe = _mode_recipe(data_recipe, {"device": "cuda", "precision": "bf16", "compile": True})
    run_recipe(recipe, tmp_path / "a")
    losses = _losses(tmp_path / "a", "pretrain")
    assert losses == pytest.approx(_losses(fp32_eager_run, "pretrain"), rel=2e-2)
    shutil.rmtree(tmp_path / "a" / "pretrain" / "final")
    (tmp_path / "a" / "summary.json").unlink()
    run_recipe(recipe, tmp_path / "a", resume=True)
    assert _losses(tmp_path / "a", "pretrain") == pytest.approx(losses, rel=1e-3)


def test_fused_adamw_is_the_optimizer_and_agrees_with_foreach():
    from mobilemoe.train.runtime import build_optimizer

    torch.manual_seed(0)
    fused_model = Transformer(get_preset("micro-moe"))
    foreach_model = Transformer(get_preset("micro-moe"))
    foreach_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, 1e-3, (0.9, 0.95), 0.1)
    assert all(group["fused"] for group in fused.param_groups)
    foreach = torch.optim.AdamW([{"params": [p for p in foreach_model.parameters() if p.dim() >= 2]},
                                 {"params": [p for p in foreach_model.parameters() if p.dim() < 2],
                                  "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    tokens = torch.randint(0, 4096, (2, 17))
    for model, optimizer in ((fused_model, fused), (foreach_model, foreach)):
        for _ in range(2):
            model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (key, x), y in zip(fused_model.state_dict().items(), foreach_model.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=key)


def test_device_and_precision_are_checked(data_recipe):
    from mobilemoe.errors import ConfigError
    from mobilemoe.train.recipe import parse_recipe
    from mobilemoe.train.runtime import resolve_device

    with pytest.raises(ConfigError, match="field 'precision' must be one of fp32, bf16, got 'fp16'"):
        parse_recipe(_mode_recipe(data_recipe, {"precision": "fp16"}))
    if not torch.cuda.is_available():
        with pytest.raises(MobileMoEError, match="sees no CUDA GPU; train with --device cpu"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cli_reports_bad_recipe_without_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\nmodel: micro-moe\ndata: d.yaml\nstages:\n  - {name: a, mixtur: {}}\n")
    result = subprocess.run([sys.executable, "-m", "mobilemoe", "train", str(tmp_path / "r.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown key 'mixtur'; did you mean 'mixture'" in result.stderr and "Traceback" not in result.stderr
