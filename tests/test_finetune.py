"""Fine-tuning an imported model: data in its tokenizer, recipe/checkpoint matching by architecture, SFT ->
QAT and the PTQ control stage from an imported (small, synthetic) checkpoint."""

import dataclasses
import hashlib
import json
import random

import numpy as np
import pytest
import torch
import yaml

from mobilemoe.checkpoint import load_model, save_model
from mobilemoe.config import get_preset
from mobilemoe.data import Shard, prepare
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import train_bpe
from mobilemoe.train import run_recipe
from mobilemoe.train.heldout import heldout_losses

WORDS = ["the", "whale", "sea", "ship", "captain", "crew", "wind", "storm", "harbour", "island", "king", "queen"]
# The imported model: a Llama-shaped micro model (no QK-norm), exported to HF and imported back, so its config
# carries the import directory's name, not the recipe preset's.
LLAMA = {"preset": "micro-dense", "qk_norm": False}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """An imported checkpoint (`mobilemoe import hf`) with its own tokenizer, and a chat data recipe that
    tokenizes with it."""
    from mobilemoe.config import resolve_model_config
    from mobilemoe.export.hf import export_hf, import_hf

    root = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    chats = [[{"role": "user", "content": f"{i}: " + " ".join(rng.choices(WORDS, k=5)) + "?"},
              {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=8)) + "."}] for i in range(60)]
    with (root / "chat.jsonl").open("w") as f:
        f.writelines(json.dumps({"messages": c}) + "\n" for c in chats)
    tok = train_bpe([m["content"] for c in chats for m in c], vocab_size=300)
    torch.manual_seed(0)
    save_model(root / "ours", Transformer(resolve_model_config(LLAMA)), tok)
    export_hf(root / "ours", root / "hf-export")
    loaded = import_hf(root / "hf-export")
    save_model(root / "imported", loaded.model, loaded.tokenizer)
    (root / "data.yaml").write_text(yaml.safe_dump({
        "name": "chat", "val_fraction": 0.1, "tokenizer": {"path": str(root / "imported")},
        "sources": {"chat": {"kind": "sft", "from": [str(root / "chat.jsonl")]}}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILEMOE_CACHE", str(root / "cache"))
        yield root


def test_data_prepared_with_a_checkpoint_tokenizer(imported, tmp_path):
    data = prepare(imported / "data.yaml", quiet=True)
    tok = load_model(imported / "imported").tokenizer
    ckpt_sha = hashlib.sha256((imported / "imported" / "tokenizer.json").read_bytes()).hexdigest()
    assert data.manifest["tokenizer"]["sha256"] == ckpt_sha and data.tokenizer.vocab_size == tok.vocab_size
    shard = Shard.open(data.shard_dir("chat", "train"))
    ids, mask = shard.tokens[: shard.offsets[1]].tolist(), shard.mask[: shard.offsets[1]].tolist()
    chats = [json.loads(line)["messages"] for line in (imported / "chat.jsonl").read_text().splitlines()]
    chat = next(c for c in chats if tok.encode_chat(c)[0] == ids[:-1])  # the shard's first document, EOS-closed
    assert mask[:-1] == tok.encode_chat(chat)[1] and ids[-1] == tok.eos_id and mask[-1] == 0
    assert ids[0] == tok.im_start_id and tok.im_end_id in ids
    # the targets are exactly the assistant's content and its closing <|im_end|>
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == chat[1]["content"] + "<|im_end|>"

    # the cache is keyed by the tokenizer's content: another tokenizer at the same path re-tokenizes
    other = train_bpe(["a different corpus, a different vocabulary"] * 20, vocab_size=280)
    other.save(imported / "other-tokenizer.json")
    recipe = yaml.safe_load((imported / "data.yaml").read_text())
    recipe["tokenizer"] = {"path": str(imported / "other-tokenizer.json")}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(recipe))
    again = prepare(tmp_path / "data.yaml", quiet=True)
    assert again.dir != data.dir and again.tokenizer.vocab_size == 280


def test_missing_checkpoint_tokenizer_is_a_clear_error(imported, tmp_path):
    recipe = yaml.safe_load((imported / "data.yaml").read_text())
    recipe["tokenizer"] = {"path": str(tmp_path / "not-imported-yet")}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(MobileMoEError, match="not-imported-yet is not a tokenizer.json nor a directory"):
        prepare(tmp_path / "data.yaml", quiet=True)


def _stage(name, kind, **kw):
    return {"name": name, "kind": kind, "mixture": {"chat": 1.0}, "steps": 3, "seq_len": 32, "batch_size": 4,
            "lr": 1e-3, "eval_every": 3, "eval_batches": 2, "checkpoint_every": 3, "log_every": 1, **kw}


def _losses(run, stage):
    return [r["loss"] for r in map(json.loads, (run / stage / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def finetuned(imported, tmp_path_factory):
    """SFT -> QAT, and the float control stage(s), from the imported checkpoint: (recipe, run dir, summary)."""
    stages = [_stage("sft", "sft", init_from=str(imported / "imported")),
              _stage("qat", "qat", lr=1e-4, data_seed=5),
              _stage("sft_more", "sft", lr=1e-4, data_seed=5, init_from="sft"),
              _stage("sft_more_again", "sft", lr=1e-4, data_seed=5, init_from="sft")]
    recipe = {"name": "ft", "seed": 3, "model": LLAMA, "data": str(imported / "data.yaml"), "stages": stages}
    run = tmp_path_factory.mktemp("run")
    return recipe, run, run_recipe(recipe, run)


def test_sft_qat_and_ptq_control_from_an_imported_checkpoint(imported, finetuned, tmp_path):
    assert load_model(imported / "imported").model.cfg.name == "hf-export"  # not the recipe's 'micro-dense'
    recipe, run, summary = finetuned
    parent = load_model(imported / "imported").model
    from mobilemoe.data import PackedBatches

    data = prepare(imported / "data.yaml", quiet=True)
    x, y = next(PackedBatches([(data.shard_dir("chat"), 1.0)], 32, 4, seed=3))
    with torch.no_grad():  # the first SFT step trained the imported weights themselves
        assert parent(x, y).lm_loss.item() == pytest.approx(_losses(run, "sft")[0], rel=1e-5)
    parent_loss, sft_loss = (r["loss"] for r in heldout_losses(recipe, [imported / "imported", run / "sft" / "final"]))
    assert sft_loss < parent_loss and sft_loss == pytest.approx(summary["stages"]["sft"]["final_val_loss"], rel=1e-6)
    assert load_model(run / "qat" / "final").int4 and not load_model(run / "sft_more" / "final").int4
    # PTQ of the control in memory scores exactly what its saved INT4 checkpoint scores
    control = load_model(run / "sft_more" / "final")
    save_model(tmp_path / "ptq", control.model, control.tokenizer, int4=True)
    ptq_in_memory, ptq_saved = heldout_losses(recipe, [run / "sft_more" / "final", tmp_path / "ptq"], int4=True)
    assert ptq_in_memory["int4"] and ptq_in_memory["loss"] == ptq_saved["loss"]
    # init_from names an earlier stage; equal data_seed: the same batches, so two float runs are identical
    assert _losses(run, "sft_more") == _losses(run, "sft_more_again")
    assert _losses(run, "sft_more")[0] != _losses(run, "sft")[0]


def _greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_the_qat_output_exports_to_hf_and_gguf_with_equal_greedy_tokens(finetuned, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from mobilemoe.export.gguf import export_gguf
    from mobilemoe.export.hf import export_hf

    _, run, _ = finetuned
    result = load_model(run / "qat" / "final")  # INT4, dequantized: the weights QAT trained against
    prompt = result.tokenizer.encode_chat([{"role": "user", "content": "the whale?"}], add_generation_prompt=True)[0]
    want = _greedy(result.model, prompt, 8)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(result, tmp_path / "hf"))  # stock, no remote code
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        # eos_token_id=[]: no stop, as our greedy (the export's generation_config stops at the end of turn)
        assert hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=[],
                           pad_token_id=0)[0, len(prompt):].tolist() == want
    llm = Llama(str(export_gguf(result, tmp_path / "m.gguf", "f32")), n_ctx=64, logits_all=True, verbose=False,
                n_threads=1)
    try:
        llm.eval(prompt)
        got = []
        for _ in range(8):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([got[-1]])
        assert got == want
    finally:
        llm.close()


@pytest.mark.slow  # two torch.export + XNNPACK lowerings, ~60 s on two shared cores
def test_the_qat_output_exports_to_pte_with_equal_greedy_tokens(finetuned, tmp_path):
    """The .pte in the ExecuTorch runtime gives its eager source's greedy tokens, 8da4w and f32; the f32 program
    also the float model's own (full-sequence, no KV cache): the runtime's cache, attention, RoPE and mask."""
    from mobilemoe.export.pte import EagerSteps, PteRunner, export_pte, float_decoder, quantized_decoder

    _, run, _ = finetuned
    result = load_model(run / "qat" / "final")
    prompt = result.tokenizer.encode_chat([{"role": "user", "content": "the whale?"}], add_generation_prompt=True)[0]
    for quantize, source in ((True, quantized_decoder), (False, float_decoder)):
        runner = PteRunner(export_pte(result, tmp_path / f"{quantize}.pte", max_seq_len=64, quantize=quantize))
        assert runner.greedy(prompt, 12) == EagerSteps(source(result, 64)).greedy(prompt, 12)
    assert runner.greedy(prompt, 12) == _greedy(result.model, prompt, 12)


def test_same_architecture_under_another_name_is_accepted(imported, tmp_path):
    # another name, norm_eps as read back from float32, another context length: all accepted
    cfg = dataclasses.replace(get_preset("micro-dense"), name="someone-elses-model", max_seq_len=128,
                              norm_eps=float(np.float32(get_preset("micro-dense").norm_eps)))
    save_model(tmp_path / "ckpt", Transformer(cfg), load_model(imported / "imported").tokenizer)
    recipe = {"name": "ft", "model": "micro-dense", "data": str(imported / "data.yaml"),
              "stages": [_stage("sft", "sft", steps=1, init_from=str(tmp_path / "ckpt"))]}
    assert run_recipe(recipe, tmp_path / "run")["steps"] == 1


def test_same_shapes_but_another_architecture_is_refused(imported, tmp_path):
    # 2 heads of 32 instead of 4 of 16 (and 1 KV head of 32 instead of 2 of 16): every tensor has the same
    # shape, but the weights would be read as other heads
    cfg = dataclasses.replace(get_preset("micro-dense"), name="other", n_heads=2, n_kv_heads=1, head_dim=32)
    assert {k: v.shape for k, v in Transformer(cfg).state_dict().items()} == {
        k: v.shape for k, v in Transformer(get_preset("micro-dense")).state_dict().items()}
    save_model(tmp_path / "ckpt", Transformer(cfg))
    recipe = {"name": "ft", "model": "micro-dense", "data": str(imported / "data.yaml"),
              "stages": [_stage("sft", "sft", steps=1, init_from=str(tmp_path / "ckpt"))]}
    with pytest.raises(MobileMoEError, match=r"'other' model whose architecture differs from the recipe's model "
                                             r"'micro-dense' \(n_heads 2 vs 4; n_kv_heads 1 vs 2; head_dim 32 vs 16\)"):
        run_recipe(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "sft" / "final").exists()


def test_smollm2_chat_data_is_in_its_vocabulary_and_template(smollm2, tmp_path, monkeypatch):
    """The real model (skipped when the package registry is unreachable): chat data prepared with SmolLM2's
    tokenizer holds its ids, its own chat template (default system prompt, digits one by one), and targets only
    the assistant's turn."""
    monkeypatch.setenv("MOBILEMOE_CACHE", str(tmp_path / "cache"))
    tok = smollm2.tokenizer
    (tmp_path / "ckpt").mkdir()
    tok.save(tmp_path / "ckpt" / "tokenizer.json")  # what a checkpoint directory holds
    chats = [[{"role": "user", "content": f"What is {i} plus 30?"}, {"role": "assistant", "content": f"{i + 30}."}]
             for i in range(10)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({
        "name": "smol", "val_fraction": 0.1, "tokenizer": {"path": str(tmp_path / "ckpt")},
        "sources": {"chat": {"kind": "sft", "from": [str(tmp_path / "chat.jsonl")]}}}))
    data = prepare(tmp_path / "data.yaml", quiet=True)
    shard = Shard.open(data.shard_dir("chat", "train"))
    ids, mask = shard.tokens[: shard.offsets[1]].tolist(), shard.mask[: shard.offsets[1]].tolist()
    chat = next(c for c in chats if tok.encode_chat(c)[0] == ids[:-1])
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert (tok.im_start_id, tok.im_end_id) == (1, 2) and ids.count(1) == 3 and ids.count(2) == 3
    answer = chat[1]["content"]
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == answer + "<|im_end|>"
    assert sum(mask) == len(answer) + 1  # "42." is "4", "2", "." one token each, then <|im_end|>
