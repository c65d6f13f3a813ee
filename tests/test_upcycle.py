"""Upcycling a dense checkpoint into a MobileMoE: exactness of split, copy, shapes, and every room after it."""

import json

import pytest
import torch
import yaml

from mobilemoe.checkpoint import load_model, save_model
from mobilemoe.cli import main
from mobilemoe.config import get_preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import train_bpe
from mobilemoe.upcycle.grow import MoEShape, upcycle

TEXTS = ["Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.",
         "The State of the Union is strong, and the Congress shall assemble at least once in every year.",
         "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."] * 20
# micro-dense: d 64, FFN 256. 64 shared + 6 slices of 32.
SPLIT = MoEShape(n_routed_experts=6, expert_size=32, top_k=2, shared_expert_size=64)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("upcycle") / "dense"
    save_model(directory, Transformer(get_preset("micro-dense")), train_bpe(TEXTS, vocab_size=400))
    return directory


def grow(parent, out, shape=SPLIT, method="split", **kw):
    upcycle(parent, out, shape, method, calibration_tokens=512, **kw)
    return load_model(out).model


def test_split_with_every_expert_selected_is_the_parent(parent, tmp_path):
    dense = load_model(parent).model
    every = MoEShape(6, 32, top_k=6, shared_expert_size=64)
    moe = grow(parent, tmp_path / "all", every)
    tokens = torch.randint(0, 400, (2, 48))
    x = torch.randn(100, 64)
    with torch.no_grad():
        for i, block in enumerate(dense.layers):
            torch.testing.assert_close(moe.layers[i].ffn(x)[0], block.ffn(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moe(tokens).logits, dense(tokens).logits, rtol=1e-4, atol=1e-5)
    record = json.loads((tmp_path / "all" / "upcycle.json").read_text())
    assert all(r["slice_scale"] == 0.0 and r["rel_error"] < 1e-10 for r in record["layers"])
    assert record["params"]["total"] == record["params"]["parent_total"] + 2 * 6 * 64  # + the router rows


def test_split_partitions_the_neurons_and_is_reproducible(parent, tmp_path):
    dense = load_model(parent).model
    a, b = grow(parent, tmp_path / "a", seed=1), grow(parent, tmp_path / "b", seed=1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    ffn, moe = dense.layers[0].ffn, a.layers[0].ffn
    rows = torch.cat([moe.shared_expert.gate_proj.weight, *moe.gate_up_proj[:, :32]])
    # every parent neuron lands in exactly one expert (rows are a permutation of the parent's gate rows)
    assert torch.equal(rows[torch.argsort(rows[:, 0])], ffn.gate_proj.weight[torch.argsort(ffn.gate_proj.weight[:, 0])])
    assert a.cfg.top_k == 2 and a.cfg.norm_topk_prob and a.cfg.routed_scaling_factor == 2.0
    assert torch.count_nonzero(moe.router.expert_bias) == 0
    record = json.loads((tmp_path / "a" / "upcycle.json").read_text())
    assert all(0 <= r["oracle_recall"] <= 1 for r in record["layers"])


def test_copy_repeats_the_split_slices_with_noise(parent, tmp_path):
    split = grow(parent, tmp_path / "split", seed=3)
    copy = grow(parent, tmp_path / "copy", MoEShape(12, 32, 2, 64), "copy", seed=3, noise=0.05)
    s, c = split.layers[1].ffn, copy.layers[1].ffn
    torch.testing.assert_close(c.gate_up_proj[:6], s.gate_up_proj)  # copy 0 is the split itself
    diff = c.gate_up_proj[6:] - s.gate_up_proj
    parent_std = torch.cat([load_model(parent).model.layers[1].ffn.gate_proj.weight,
                            load_model(parent).model.layers[1].ffn.up_proj.weight]).std()
    assert 0.8 * 0.05 * parent_std < diff.std() < 1.2 * 0.05 * parent_std
    assert copy.cfg.n_routed_experts == 12 and copy.cfg.top_k == 2


def test_planner_terms_resolve_to_the_documented_shapes():
    # SmolLM2-135M (FFN 1536): (a) half the FFN active at the parent's total, (b) the parent's active at 4x the FFN
    assert MoEShape.from_planner(1536, 2, 4, 1, 2, coarse_size=768) == MoEShape(6, 192, 2, 384)
    assert MoEShape.from_planner(1536, 4, 8, 1, 4) == MoEShape(28, 192, 4, 768)
    MoEShape(6, 192, 2, 384).check(1536, "split")
    MoEShape(28, 192, 4, 768).check(1536, "copy")


@pytest.mark.parametrize("shape,method,match", [
    (MoEShape(1, 128, 1, 64), "split", "does not tile"),
    (MoEShape(4, 48, 2, 64), "split", "not a multiple of 32"),
    (MoEShape(6, 32, 7, 64), "split", "top-k .7. is more than the routed experts .6."),
    (MoEShape(5, 32, 2, 64), "split", "exactly 6 experts"),
    (MoEShape(9, 32, 2, 64), "copy", "multiple of 6"),
    (MoEShape(6, 32, 2, 256), "split", "leaves none"),
])
def test_bad_shapes_are_clear_errors(shape, method, match):
    with pytest.raises(MobileMoEError, match=match):
        shape.check(256, method)


def test_cli_planner_terms_and_its_errors(parent, tmp_path, capsys):
    out = tmp_path / "moe"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    main(["upcycle", str(parent), str(out), "--coarse-experts", "1", "--granularity", "8", "--shared-slots", "2",
          "--calibration-tokens", "512"])
    assert load_model(out).model.cfg.n_routed_experts == 6
    assert json.loads((out / "upcycle.json").read_text())["planner_terms"]["g"] == 8
    for argv, message in (([str(tmp_path / "mine"), "--coarse-experts", "1", "--granularity", "8"],
                           "holds files mobilemoe did not write"),
                          ([str(tmp_path / "x"), "--experts", "6", "--coarse-experts", "1"], "one way"),
                          ([str(tmp_path / "x"), "--experts", "6"], "also needs --expert-size, --top-k"),
                          ([str(tmp_path / "x"), "--coarse-experts", "1", "--granularity", "5"], "must divide")):
        with pytest.raises(SystemExit) as exit_:
            main(["upcycle", str(parent), *argv, "--calibration-tokens", "512"])
        assert exit_.value.code != 0 and message in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(SystemExit):
        main(["upcycle", str(out), str(tmp_path / "y"), "--experts", "6", "--expert-size", "32", "--top-k", "2"])
    assert "already an MoE" in capsys.readouterr().err


def test_bench_names_models_by_their_recorded_name_not_their_path(parent, tmp_path):
    from mobilemoe.infer.bench import bench_names

    grow(parent, tmp_path / "moe")
    assert bench_names([str(tmp_path / "moe"), f"parent={parent}", "micro-moe"]) == [
        ("micro-dense-split-6x32-top2", str(tmp_path / "moe")), ("parent", str(parent)), ("micro-moe", "micro-moe")]
    with pytest.raises(MobileMoEError, match="two models would be called 'micro-dense'.*--preset a=DIR"):
        bench_names([str(parent), "micro-dense"])


def test_upcycled_checkpoint_goes_through_every_room(parent, tmp_path):
    """Train a few steps, INT4 engine (with the C decode kernel where it builds), eval, export hf and gguf."""
    from mobilemoe.eval.runner import evaluate
    from mobilemoe.eval.tasks import Task, multiple_choice_example
    from mobilemoe.export.gguf import export_gguf
    from mobilemoe.export.hf import export_hf, import_hf
    from mobilemoe.infer.bench import bench_models
    from mobilemoe.infer.engine import load_int4_model
    from mobilemoe.infer.generate import generate_tokens
    from mobilemoe.train import run_recipe
    from mobilemoe.train.recipe import parse_recipe, start_from

    moe_dir = tmp_path / "moe"
    grow(parent, moe_dir)
    (tmp_path / "prose").mkdir()
    (tmp_path / "prose" / "a.txt").write_text(" ".join(TEXTS))
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": t[:30]}, {"role": "assistant", "content": t[30:]}]}) for t in TEXTS))
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"name": "up", "val_fraction": 0.1, "tokenizer": {"path": str(moe_dir)},
                                    "sources": {"prose": {"kind": "pretrain", "from": [str(tmp_path / "prose")]},
                                                "chat": {"kind": "sft", "from": [str(tmp_path / "chat.jsonl")]}}}))
    stage = {"steps": 3, "seq_len": 32, "batch_size": 2, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 3,
             "log_every": 1, "lr": 1e-3}
    recipe = parse_recipe({"name": "up", "model": "micro-dense", "data": str(data), "stages": [
        {"name": "midtrain", "kind": "midtrain", "mixture": {"prose": 1.0}, **stage},
        {"name": "qat", "kind": "qat", "mixture": {"chat": 1.0}, **stage}]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILEMOE_CACHE", str(tmp_path / "cache"))
        summary = run_recipe(start_from(recipe, moe_dir), tmp_path / "run")  # `train --init-from`
    int4_dir = tmp_path / "run" / "qat" / "final"
    assert summary["stages"]["midtrain"]["steps"] == 3

    engine, tokenizer = load_int4_model(int4_dir)
    reference = load_model(int4_dir).model  # dequantized
    prompt = tokenizer.encode(TEXTS[0][:40])
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits
        got = engine(torch.tensor([prompt])).logits.float()
    assert (got - want).abs().max() < 0.03 * want.abs().max()
    assert len(list(generate_tokens(engine, prompt, 6, cache_dtype=torch.bfloat16))) == 6  # decode: C kernel
    speed = bench_models([f"upcycled={int4_dir}", "micro-dense"], [8], [8], decode_steps=2, rounds=1, compile=False)
    assert speed[0].active_params < speed[0].total_params and all(r.decode_tok_s[8] > 0 for r in speed)
    assert [r.name for r in speed] == ["upcycled", "micro-dense"]

    task = Task("local", "multiple_choice", lambda: [multiple_choice_example("Call me", [" Ishmael", " Ahab"], 0)],
                ("acc",), "acc", "test")
    assert 0 <= evaluate(int4_dir, [task])["tasks"]["local"]["score"] <= 1

    float_dir = tmp_path / "run" / "midtrain" / "final"
    trained = load_model(float_dir)
    back = import_hf(export_hf(float_dir, tmp_path / "hf"))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids).logits, trained.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert export_gguf(float_dir, tmp_path / "m.gguf", "q8_0").stat().st_size > 0


@pytest.mark.slow  # torch.export + XNNPACK lowering, ~35 s on two shared cores
def test_upcycled_checkpoint_exports_to_pte(parent, tmp_path):
    from mobilemoe.export.pte import PteRunner, export_pte, quantized_decoder

    moe = grow(parent, tmp_path / "moe")
    runner = PteRunner(export_pte(tmp_path / "moe", tmp_path / "m.pte", max_seq_len=16))
    eager = quantized_decoder(tmp_path / "moe", max_seq_len=16)
    with torch.no_grad():
        want = eager(torch.tensor([[5]]), torch.tensor([0]))[0, -1]
    assert moe.cfg.is_moe and (runner.step(5, 0) - want).abs().max() < 2e-2 * want.abs().max()


def test_plot_compares_runs_stage_by_stage(tmp_path, capsys):
    """`mobilemoe plot RUN...` (the upcycling report's loss curves): every run's stages on one axis."""
    for name, shift in (("dense", 0.0), ("moe", 0.2)):
        for stage, steps in (("midtrain", 12), ("sft", 5)):
            (tmp_path / name / stage).mkdir(parents=True)
            rows = [{"step": s, "tokens": 64 * s, "loss": 3 - 0.05 * s + shift, **({"val_loss": 3.1} if s == 5 else {})}
                    for s in range(1, steps + 1)]
            (tmp_path / name / stage / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    main(["plot", str(tmp_path / "dense"), str(tmp_path / "moe"), "--out", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "compare_loss.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "moe" / "loss.png").is_file() and "compare_loss.png" in capsys.readouterr().out
