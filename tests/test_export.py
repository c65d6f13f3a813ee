"""Interop parity: GGUF (llama-cpp-python), Hugging Face transformers, released-checkpoint layout, ExecuTorch."""

import numpy as np
import pytest
import torch

from mobilemoe.checkpoint import LoadedModel, save_model
from mobilemoe.config import resolve_model_config
from mobilemoe.data.tokenizer import train_bpe
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Transformer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Mixture of experts models route each token to experts.",
         "Hello world, small language models run on phones.", "A shared expert sees every token."] * 10
PROMPT = "The quick brown fox jumps over"


def tiny_model(seed: int = 0, **overrides) -> LoadedModel:
    """micro-moe with our BPE vocabulary and a non-zero selection bias (so the bias path is exercised)."""
    tok = train_bpe(TEXTS, vocab_size=400)
    torch.manual_seed(seed)
    model = Transformer(resolve_model_config({"preset": "micro-moe", "vocab_size": 512, **overrides})).eval()
    for moe in model.moe_layers():
        moe.expert_bias.normal_(0, 0.05)
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
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        new = []
        for _ in range(n_new):
            new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([new[-1]])
        return logits, new
    finally:
        llm.close()


def test_gguf_f32_greedy_and_q8_logits_match(loaded, tmp_path):
    from mobilemoe.export.gguf import export_gguf

    ids = loaded.tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = loaded.model(torch.tensor([ids])).logits[0].numpy()
    want = greedy(loaded.model, ids, 8)

    logits, got = llama_cpp_run(export_gguf(loaded, tmp_path / "m.gguf", "f32"), ids, 8)
    assert got == want
    assert np.abs(logits - ref).max() / np.abs(ref).max() < 1e-3

    logits, _ = llama_cpp_run(export_gguf(loaded, tmp_path / "m8.gguf", "q8_0"), ids, 0)
    assert np.abs(logits - ref).max() / np.abs(ref).max() < 5e-2  # a near-tie expert may flip at q8_0
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


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
    scaled = tiny_model(rope_scaling={"factor": 8.0})
    with pytest.raises(MobileMoEError, match="RoPE scaling"):
        export_gguf(scaled, tmp_path / "b.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_gguf_from_checkpoint_dir(loaded, tmp_path):
    from mobilemoe.export.gguf import export_gguf

    save_model(tmp_path / "ckpt", loaded.model, loaded.tokenizer)
    assert export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f16").stat().st_size > 0
