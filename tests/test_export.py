"""Interop parity: GGUF (llama-cpp-python), Hugging Face transformers, released-checkpoint layout, ExecuTorch."""

import numpy as np
import pytest
import torch

from mobilemoe.checkpoint import LoadedModel, save_model
from mobilemoe.config import resolve_model_config
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import train_bpe

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Mixture of experts models route each token to experts.",
         "Hello world, small language models run on phones.", "A shared expert sees every token."] * 10
PROMPT = "The quick brown fox jumps over"


def tiny_model(seed: int = 0, **overrides) -> LoadedModel:
    """micro-moe with our BPE vocabulary and a non-zero selection bias (so the bias path is exercised)."""
    tok = train_bpe(TEXTS, vocab_size=400)
    torch.manual_seed(seed)
    model = Transformer(resolve_model_config({"preset": "micro-moe", "vocab_size": 512, **overrides})).eval()
    for moe in model.moe_layers():
        moe.router.expert_bias.normal_(0, 0.05)
    return LoadedModel(model, tok, False, "<memory>")


def greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_model()


# --- GGUF / llama.cpp -----------------------------------------------------------------------------------
def llama_cpp_run(path, ids: list[int], n_new: int) -> tuple[np.ndarray, list[int]]:
    """Prompt logits and a greedy continuation from llama-cpp-python."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    try:
        return llama_cpp_run_with(llm, ids, n_new)
    finally:
        llm.close()


def llama_cpp_run_with(llm, ids: list[int], n_new: int) -> tuple[np.ndarray, list[int]]:
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    new = []
    for _ in range(n_new):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    return logits, new


SCALED_ROPE = {"factor": 16.0, "original_max_position": 64}  # low frequencies of micro's head_dim 16 scaled


@pytest.mark.parametrize("overrides, arch", [
    ({"rope_scaling": SCALED_ROPE}, "exaone-moe"),
    ({"n_shared_experts": 0, "shared_expert_size": 0}, "exaone-moe"),
    ({"qk_norm": False}, "glm4moe"),
    ({"qk_norm": False, "n_shared_experts": 0, "shared_expert_size": 0}, "glm4moe"),
    ({"preset": "micro-dense", "qk_norm": False, "rope_scaling": SCALED_ROPE}, "llama"),
    ({"preset": "micro-dense"}, "qwen3"),
    ({"preset": "micro-dense", "rope_scaling": SCALED_ROPE}, "exaone-moe"),
], ids=["moe-llama3-rope", "moe-no-shared", "moe-no-qk-norm", "moe-no-qk-norm-no-shared", "dense-llama3-rope",
        "dense-qk-norm", "dense-qk-norm-llama3-rope"])
def test_gguf_f32_greedy_and_q8_logits_match(overrides, arch, tmp_path):
    import gguf

    from mobilemoe.export.gguf import export_gguf

    loaded = tiny_model(**overrides)
    cfg = loaded.model.cfg
    if not cfg.qk_norm:  # sharpen attention (random q.k is tiny) so the RoPE frequencies show in the logits
        with torch.no_grad():
            for block in loaded.model.layers:
                block.attn.q_proj.weight.mul_(10)
                block.attn.k_proj.weight.mul_(10)
    ids = loaded.tokenizer.encode(" ".join(TEXTS[:3]))  # ~30 positions: long enough for the scaled frequencies
    with torch.no_grad():
        ref = loaded.model(torch.tensor([ids])).logits[0].numpy()
    want = greedy(loaded.model, ids, 8)

    path = export_gguf(loaded, tmp_path / "m.gguf", "f32")
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == arch
    assert fields[f"{arch}.attention.head_count_kv"].contents() == cfg.n_kv_heads < cfg.n_heads  # GQA kept
    logits, got = llama_cpp_run(path, ids, 8)
    assert got == want
    assert np.abs(logits - ref).max() / np.abs(ref).max() < 1e-3

    logits, _ = llama_cpp_run(export_gguf(loaded, tmp_path / "m8.gguf", "q8_0"), ids, 0)
    assert np.abs(logits - ref).max() / np.abs(ref).max() < 5e-2  # a near-tie expert may flip at q8_0
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.8

    if cfg.rope_scaling is not None:  # the scaling matters here, so a GGUF without rope_freqs would fail above
        unscaled = Transformer(resolve_model_config({**cfg.to_dict(), "rope_scaling": None})).eval()
        unscaled.load_state_dict(loaded.model.state_dict())
        with torch.no_grad():
            assert np.abs(unscaled(torch.tensor([ids])).logits[0].numpy() - ref).max() / np.abs(ref).max() > 1e-2


@pytest.mark.slow  # MobileMoE-S shapes (128K vocab, 60 experts): ~1 GB of weights, f16 + q8_0 exports
def test_gguf_mobilemoe_s_logits_match(tmp_path):
    from mobilemoe.export.gguf import export_gguf

    loaded = tiny_model(preset="mobilemoe-s", n_layers=2, vocab_size=128_256)  # llama3 RoPE, GQA 12/4, real layers
    assert loaded.model.cfg.rope_scaling is not None
    ids = loaded.tokenizer.encode(" ".join(TEXTS[:4]))
    with torch.no_grad():
        ref = loaded.model(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(ref).max()
    logits, _ = llama_cpp_run(export_gguf(loaded, tmp_path / "s-f16.gguf", "f16"), ids, 0)
    assert np.abs(logits - ref).max() / scale < 1e-2  # measured 1.1e-3
    assert (logits.argmax(-1) == ref.argmax(-1)).all()
    # q8_0 (weights and, in llama.cpp's dot products, activations): random routers are near-ties among 60 experts,
    # so some positions pick another expert (our own model on the q8_0-rounded weights differs from float by 0.19
    # at its worst position); the typical position is within q8_0 rounding: median measured 3.3e-2.
    logits, _ = llama_cpp_run(export_gguf(loaded, tmp_path / "s-q8_0.gguf", "q8_0"), ids, 0)
    assert np.median(np.abs(logits - ref).max(-1)) / scale < 5e-2
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_smollm2_gguf_export_keeps_the_model_and_its_tokenizer(smollm2, smollm2_gguf, tmp_path):
    """The real model (imported from its Q4_1 GGUF) out again through `export gguf`: the original file's
    architecture, tokenizer and chat metadata kept; llama.cpp's f32 greedy tokens equal ours."""
    import gguf
    from llama_cpp import Llama

    from mobilemoe.export.gguf import export_gguf
    from mobilemoe.infer.generate import generate_tokens

    original = gguf.GGUFReader(smollm2_gguf).fields
    path = export_gguf(smollm2, tmp_path / "s.gguf", "f32")
    fields = gguf.GGUFReader(path).fields
    for key in ("general.architecture", "llama.attention.head_count_kv", "llama.rope.freq_base", "tokenizer.ggml.pre",
                "tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert fields[key].contents() == original[key].contents(), key

    tok = smollm2.tokenizer
    questions = ["What is the capital of France?"]
    prompts = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in questions]
    llm = Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    try:
        for q, ids in zip(questions, prompts, strict=True):
            rendered = tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
            assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids
            with torch.no_grad():
                ref = smollm2.model(torch.tensor([ids])).logits[0].numpy()
            logits, theirs = llama_cpp_run_with(llm, ids, 16)
            assert theirs == list(generate_tokens(smollm2.model, ids, 16))
            assert np.abs(logits - ref).max() / np.abs(ref).max() < 3e-3  # 30 layers in f32: measured 1.1e-3
    finally:
        llm.close()


def test_gguf_tokenizer_matches_ours(loaded, tmp_path):
    from llama_cpp import Llama

    from mobilemoe.export.gguf import export_gguf

    llm = Llama(str(export_gguf(loaded, tmp_path / "m.gguf", "q4_0")), n_ctx=32, vocab_only=True, verbose=False)
    try:
        for text in (PROMPT, "Hello world, experts!  Two  spaces\nand 123 numbers"):
            assert llm.tokenize(text.encode(), add_bos=False) == loaded.tokenizer.encode(text)
    finally:
        llm.close()


def test_gguf_refuses_bad_input_without_leaving_a_file(loaded, tmp_path):
    from mobilemoe.export.gguf import export_gguf

    with pytest.raises(MobileMoEError, match="K-quants"):
        export_gguf(loaded, tmp_path / "a.gguf", "q4_k_m")
    interleaved = tiny_model(n_layers=2, moe_layer_step=2, ffn_size=128)
    with pytest.raises(MobileMoEError, match="interleaved dense and MoE"):
        export_gguf(interleaved, tmp_path / "b.gguf", "f32")
    with pytest.raises(MobileMoEError, match="without QK-norm but with llama3 RoPE scaling"):
        export_gguf(tiny_model(qk_norm=False, rope_scaling=SCALED_ROPE), tmp_path / "c.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_gguf_from_checkpoint_dir(loaded, tmp_path):
    from mobilemoe.export.gguf import export_gguf

    save_model(tmp_path / "ckpt", loaded.model, loaded.tokenizer)
    assert export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f16").stat().st_size > 0


# --- Hugging Face transformers --------------------------------------------------------------------------
def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("overrides", [{}, {"rope_scaling": {"factor": 8.0, "original_max_position": 64}},
                                       {"n_layers": 1, "n_routed_experts": 0, "ffn_size": 128},
                                       {"qk_norm": False},
                                       {"n_layers": 1, "n_routed_experts": 0, "ffn_size": 128, "qk_norm": False}],
                         ids=["dots1", "dots1-llama3-rope", "qwen3-dense", "glm4moe", "llama-dense"])
def test_hf_export_logits_match_and_import_round_trips(overrides, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mobilemoe.export.hf import export_hf, import_hf

    loaded = tiny_model(**overrides)
    export_hf(loaded, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = " ".join(TEXTS[:4])
    ids = loaded.tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        want = loaded.model(torch.tensor([ids])).logits
        assert max_rel_error(hf_model(torch.tensor([ids])).logits, want) < 1e-4
        back = import_hf(tmp_path / "hf")
        assert max_rel_error(back.model(torch.tensor([ids])).logits, want) < 1e-6
    assert back.tokenizer.encode(text) == ids


def test_hf_chat_template_matches_ours(loaded, tmp_path):
    from transformers import AutoTokenizer

    from mobilemoe.export.hf import export_hf

    export_hf(loaded, tmp_path / "hf")
    messages = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "A shared expert."}]
    hf_ids = AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(messages, tokenize=True,
                                                                                  add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert list(hf_ids) == loaded.tokenizer.encode_chat(messages, add_generation_prompt=True)[0]


def test_hf_export_keeps_the_models_own_special_tokens_and_bos(loaded, tmp_path):
    """A tokenizer that came with a model (SmolLM2: bos <|im_start|>, eos = pad = <|im_end|>) names those tokens in
    config.json, generation_config.json and the HF tokenizer; add_bos_token decides whether a sequence's text
    starts with BOS, in our tokenizer and in transformers' tokenizer(text) alike."""
    import json

    from transformers import AutoTokenizer

    from mobilemoe.export.hf import export_hf
    from mobilemoe.tokenizer import Tokenizer

    im_start, im_end = loaded.tokenizer.im_start_id, loaded.tokenizer.im_end_id
    for add_bos in (False, True):
        tok = Tokenizer(loaded.tokenizer.hf, config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                     "pad_token": "<|im_end|>", "add_bos_token": add_bos})
        ids = tok.encode(PROMPT, start=True)
        assert ids == [im_start] * add_bos + tok.encode(PROMPT) == tok.encode_batch([PROMPT], start=True)[0]
        out = export_hf(LoadedModel(loaded.model, tok, False, "<memory>"), tmp_path / f"bos-{add_bos}")
        config = json.loads((out / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (im_start, im_end, im_end)
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [im_end, tok.eos_id]
        hf_tok = AutoTokenizer.from_pretrained(out)
        assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
        assert hf_tok(PROMPT)["input_ids"] == ids
    with pytest.raises(MobileMoEError, match="asks for a BOS token"):
        Tokenizer(loaded.tokenizer.hf, config={"add_bos_token": True})


def test_hf_refuses_softmax_routing(tmp_path):
    from mobilemoe.export.hf import export_hf

    with pytest.raises(MobileMoEError, match="softmax routing"):
        export_hf(tiny_model(router="softmax"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --- released facebook/MobileMoE-* layout ---------------------------------------------------------------
def write_released(loaded: LoadedModel, directory, n_shards: int = 2) -> None:
    """A synthetic released checkpoint: Llama-4-text config names, interleaved-RoPE q/k, sharded safetensors."""
    import json

    from safetensors.torch import save_file

    from mobilemoe.export.released import released_tensors

    cfg = loaded.model.cfg
    directory.mkdir()
    tensors = released_tensors(loaded.model)
    names = sorted(tensors)
    weight_map = {}
    for shard in range(n_shards):
        file = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[shard::n_shards]
        save_file({n: tensors[n] for n in part}, directory / file)
        weight_map |= dict.fromkeys(part, file)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "mobilemoe", "architectures": ["MobileMoEForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        "num_local_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.top_k,
        "intermediate_size": cfg.expert_size, "intermediate_size_mlp": cfg.shared_expert_size,
        "interleave_moe_layer_step": 1, "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": True, "use_qk_norm": True, "tie_word_embeddings": True}))
    loaded.tokenizer.save(directory / "tokenizer.json")


def test_released_layout_loads_with_equal_logits(tmp_path):
    from mobilemoe.export.released import load_released

    loaded = tiny_model(rope_scaling={"factor": 8.0, "original_max_position": 64})
    write_released(loaded, tmp_path / "MobileMoE-micro")
    back = load_released(tmp_path / "MobileMoE-micro")
    assert back.model.cfg.rope_scaling == loaded.model.cfg.rope_scaling
    ids = torch.tensor([loaded.tokenizer.encode(" ".join(TEXTS[:3]))])
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, loaded.model(ids).logits)
    # Loading the interleaved layout as if it were rotate-half must not match: the permutation matters.
    with torch.no_grad():
        assert not torch.allclose(load_released(tmp_path / "MobileMoE-micro", rope_layout="half").model(ids).logits,
                                  loaded.model(ids).logits, atol=1e-4)


def test_released_missing_shard_is_a_clear_error(loaded, tmp_path):
    from mobilemoe.export.released import load_released

    write_released(loaded, tmp_path / "r")
    (tmp_path / "r" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MobileMoEError, match="1 of 2 shards are missing.*model-00002-of-00002"):
        load_released(tmp_path / "r")


# --- ExecuTorch -----------------------------------------------------------------------------------------
@pytest.mark.slow  # torch.export + XNNPACK lowering takes ~35 s on two shared cores
def test_pte_greedy_tokens_match_the_quantized_model(loaded, tmp_path):
    from mobilemoe.export.pte import EagerSteps, PteRunner, export_pte, quantized_decoder

    ids = loaded.tokenizer.encode(PROMPT)
    runner = PteRunner(export_pte(loaded, tmp_path / "m.pte", max_seq_len=32))
    eager = quantized_decoder(loaded, max_seq_len=32)
    with torch.no_grad():
        for pos, token in enumerate(ids):
            want = eager(torch.tensor([[token]]), torch.tensor([pos]))[0, -1]
            assert max_rel_error(runner.step(token, pos), want) < 2e-2
    runner = PteRunner(tmp_path / "m.pte")  # fresh KV cache
    assert runner.greedy(ids, 8) == EagerSteps(quantized_decoder(loaded, 32)).greedy(ids, 8)


@pytest.mark.slow  # torch.export + XNNPACK lowering, ~40 s on two shared cores
def test_pte_of_a_dense_model_with_smollm2s_49k_vocabulary(tmp_path):
    from mobilemoe.export.pte import EagerSteps, PteRunner, export_pte, quantized_decoder

    dense = tiny_model(n_layers=1, n_routed_experts=0, ffn_size=128, qk_norm=False, vocab_size=49152)
    ids = dense.tokenizer.encode(PROMPT)
    runner = PteRunner(export_pte(dense, tmp_path / "m.pte", max_seq_len=32))
    assert runner.greedy(ids, 8) == EagerSteps(quantized_decoder(dense, 32)).greedy(ids, 8)


@pytest.mark.parametrize("embedding_bits", [4, 8])
def test_pte_source_holds_the_checkpoints_integers(loaded, tmp_path, embedding_bits):
    """The .pte's eager source takes an INT4 checkpoint's own integers and scales (re-quantizing the dequantized
    weights would move them to a coarser grid) and its embedding width: int8 rows for an 8-bit scheme."""
    from mobilemoe.checkpoint import read_tensors
    from mobilemoe.export.pte import quantized_decoder
    from mobilemoe.infer.engine import int4_format
    from mobilemoe.quantize import Int4Scheme, unpack_int4

    save_model(tmp_path / "q", loaded.model, loaded.tokenizer, int4=True, scheme=Int4Scheme(embedding_bits))
    stored = int4_format(loaded.model.cfg, read_tensors(tmp_path / "q" / "model.safetensors")[0])
    step = quantized_decoder(tmp_path / "q", max_seq_len=16).model
    table, scales = stored["embed.weight.qweight"], stored["embed.weight.scales"].float()
    assert table.dtype == (torch.int8 if embedding_bits == 8 else torch.uint8)
    for module in (step.embed, step.lm_head):
        assert torch.equal(module.weight.qdata, table if embedding_bits == 8 else unpack_int4(table))
    assert torch.equal(step.embed.weight.scale, scales)
    # the head's scales: per row (8 bits) stay fp32 in XNNPACK, per group (4 bits) are rounded to bf16 as it does
    assert torch.equal(step.lm_head.weight.scale, scales if embedding_bits == 8 else scales.bfloat16().float())
    q_proj = step.layers[0].attn.q_proj.weight
    assert torch.equal(q_proj.qdata, unpack_int4(stored["layers.0.attn.q_proj.weight.qweight"]))
    assert torch.equal(q_proj.scale, stored["layers.0.attn.q_proj.weight.scales"].to(torch.bfloat16).float())


@pytest.mark.slow  # two torch.export + XNNPACK lowerings, ~30 s on two shared cores
def test_pte_follows_an_8bit_embedding(loaded, tmp_path):
    """A checkpoint whose scheme keeps the embedding/head at 8 bits gives a .pte with an int8 embedding lookup and
    an 8da8w head that runs in the ExecuTorch runtime with its eager source's logits and greedy tokens."""
    from mobilemoe.export.pte import EagerSteps, PteRunner, export_pte, pte_kernels, quantized_decoder
    from mobilemoe.quantize import Int4Scheme

    ids = loaded.tokenizer.encode(PROMPT)
    paths = {}
    for bits in (4, 8):
        save_model(tmp_path / f"e{bits}", loaded.model, loaded.tokenizer, int4=True, scheme=Int4Scheme(bits))
        paths[bits] = export_pte(tmp_path / f"e{bits}", tmp_path / f"e{bits}.pte", max_seq_len=32)
    assert "quantized_decomposed::embedding_byte" in pte_kernels(paths[8])[0]
    assert "quantized_decomposed::embedding_byte" not in pte_kernels(paths[4])[0]
    assert paths[8].stat().st_size > paths[4].stat().st_size
    runner, eager = PteRunner(paths[8]), quantized_decoder(tmp_path / "e8", max_seq_len=32)
    with torch.no_grad():
        for pos, token in enumerate(ids):
            want = eager(torch.tensor([[token]]), torch.tensor([pos]))[0, -1]
            assert max_rel_error(runner.step(token, pos), want) < 2e-2
    assert PteRunner(paths[8]).greedy(ids, 8) == EagerSteps(eager).greedy(ids, 8)
