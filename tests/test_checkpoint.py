import json

import pytest
import torch

from mobilemoe.checkpoint import load_model, save_model
from mobilemoe.config import get_preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Transformer
from mobilemoe.quantize import dequantize_int4, quantize_int4
from mobilemoe.tokenizer import train_bpe


def test_float_round_trip_with_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_preset("micro-moe"))
    model.layers[0].ffn.router.expert_bias.fill_(0.25)
    tok = train_bpe(["hello world, the quick brown fox"] * 20, vocab_size=300)
    save_model(tmp_path / "ckpt", model, tok)
    loaded = load_model(tmp_path / "ckpt")
    assert not loaded.int4 and loaded.tokenizer.encode("hello") == tok.encode("hello")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k



def test_checkpoint_from_before_the_router_module_loads(tmp_path):
    """The selection bias was `ffn.expert_bias` before `moe.Router` owned it; such checkpoints still load."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = Transformer(get_preset("micro-moe"))
    model.layers[0].ffn.router.expert_bias.fill_(0.25)
    save_model(tmp_path / "old", model)
    file = tmp_path / "old" / "model.safetensors"
    save_file({k.replace(".router.expert_bias", ".expert_bias"): v for k, v in load_file(file).items()}, file)
    assert (load_model(tmp_path / "old").model.layers[0].ffn.router.expert_bias == 0.25).all()


def test_int4_round_trip_is_the_quantized_model(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_preset("micro-moe"))
    save_model(tmp_path / "q", model, int4=True)
    loaded = load_model(tmp_path / "q")
    assert loaded.int4
    w = model.layers[1].ffn.gate_up_proj.detach()
    want = dequantize_int4(*quantize_int4(w))
    assert torch.equal(loaded.model.layers[1].ffn.gate_up_proj, want)
    assert torch.equal(loaded.model.layers[1].ffn.router.weight, model.layers[1].ffn.router.weight)
    assert (want - w).abs().max() <= w.abs().max() / 7.5 / 2 + 1e-3


def test_int4_pack_values():
    w = torch.tensor([[7.5, -7.5, 1.0, 0.0] * 8])
    packed, scales = quantize_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 16) and scales.dtype == torch.float16
    torch.testing.assert_close(dequantize_int4(packed, scales)[0, :4], torch.tensor([7.0, -8.0, 1.0, 0.0]))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    save_model(tmp_path / "a", Transformer(get_preset("micro-moe")))
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["d_model"], cfg["head_dim"] = 128, 32
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MobileMoEError, match="does not match its config.json.*wrong shape"):
        load_model(tmp_path / "a")


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(MobileMoEError, match="config.json is missing"):
        load_model(tmp_path)
    save_model(tmp_path / "c", Transformer(get_preset("micro-dense")))
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MobileMoEError, match="corrupt"):
        load_model(tmp_path / "c")


def test_int4_scheme_8bit_head_and_hqq(tmp_path):
    """PTQ options: an 8-bit embedding/head (int8 rows) and HQQ scales. The checkpoint, the in-memory PTQ of
    eval --int4 and the engine all compute the same head; HQQ rounds with less error than round to nearest."""
    from mobilemoe.checkpoint import checkpoint_scheme, model_tensors
    from mobilemoe.eval.runner import quantize_weights_int4
    from mobilemoe.infer.engine import Int8Head, build_int4_model
    from mobilemoe.quantize import Int4Scheme

    torch.manual_seed(0)
    model = Transformer(get_preset("micro-moe")).eval()
    scheme = Int4Scheme(embedding_bits=8, rounding="hqq")
    save_model(tmp_path / "q", model, int4=True, scheme=scheme)
    loaded = load_model(tmp_path / "q")
    assert checkpoint_scheme(tmp_path / "q") == loaded.scheme == scheme
    in_memory = Transformer(model.cfg).eval()
    in_memory.load_state_dict(model.state_dict())
    quantize_weights_int4(in_memory, scheme)
    for (k, a), (_, b) in zip(loaded.model.state_dict().items(), in_memory.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    w = model.embed.weight.detach()
    assert (loaded.model.embed.weight - w).abs().max() <= w.abs().max(-1).values.max() / 127  # 8-bit, not 4
    gate_up = model.layers[1].ffn.gate_up_proj.detach()
    error = {r: (dequantize_int4(*quantize_int4(gate_up, rounding=r)) - gate_up).pow(2).mean() for r in ("rtn", "hqq")}
    assert error["hqq"] < error["rtn"]

    engine = build_int4_model(model.cfg, model_tensors(model, True, scheme))
    assert isinstance(engine.lm_head, Int8Head) and engine.embed.head is engine.lm_head  # tied: one table
    tokens = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(engine.embed(tokens), loaded.model.embed(tokens))
    x = torch.randn(3, model.cfg.d_model)
    torch.testing.assert_close(engine.lm_head(x), x @ loaded.model.embed.weight.T, rtol=1e-4, atol=1e-4)
    from mobilemoe.infer.generate import generate_tokens

    decoded = list(generate_tokens(engine, [1, 5, 9], 4))  # the C decode step, head and lookup in torch
    with torch.no_grad():
        logits = engine(torch.tensor([[1, 5, 9, *decoded[:-1]]])).logits[0, 2:]  # one prefill pass, no cache
    assert decoded == logits.argmax(-1).tolist()


def test_gguf_q4_0_follows_an_8bit_embedding(tmp_path):
    import gguf

    from mobilemoe.export.gguf import export_gguf
    from mobilemoe.quantize import Int4Scheme

    torch.manual_seed(0)
    tok = train_bpe(["hello world, the quick brown fox"] * 20, vocab_size=300)
    model = Transformer(get_preset("micro-moe"))
    types = {}
    for bits in (4, 8):
        save_model(tmp_path / f"e{bits}", model, tok, int4=True, scheme=Int4Scheme(embedding_bits=bits))
        reader = gguf.GGUFReader(export_gguf(tmp_path / f"e{bits}", tmp_path / f"e{bits}.gguf", "q4_0"))
        types[bits] = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types[4]["token_embd.weight"] == "Q4_0" and types[8]["token_embd.weight"] == "Q8_0"
    assert types[8]["blk.0.attn_q.weight"] == "Q4_0"


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_follow_the_int4_scheme(tied):
    """INT4 sizes (`mobilemoe models`, `mobilemoe bench`'s size and bytes per token) count the quantized weights as
    an INT4 checkpoint stores them: int4 g32 + fp16 scales, and the embedding/head as int8 rows + one fp16 scale
    per row where the scheme keeps it at 8 bits."""
    from mobilemoe.checkpoint import model_tensors
    from mobilemoe.config import resolve_model_config
    from mobilemoe.infer.bench import active_int4_bytes
    from mobilemoe.quantize import Int4Scheme, is_quantized_weight, weight_bytes

    model = Transformer(resolve_model_config({"preset": "micro-moe", "tie_embeddings": tied}))
    quantized = sum(p.numel() for name, p in model.named_parameters() if is_quantized_weight(name, p))
    size, per_token = {}, {}
    for bits in (4, 8):
        scheme = Int4Scheme(embedding_bits=bits)
        stored = sum(t.numel() * t.element_size() for name, t in model_tensors(model, True, scheme).items()
                     if name.endswith((".qweight", ".scales")))
        size[bits], per_token[bits] = weight_bytes(model, scheme=scheme), active_int4_bytes(model.cfg, scheme)
        assert size[bits] == weight_bytes(model, bits=16) - 2 * quantized + stored
    assert size[8] > size[4] and per_token[8] - per_token[4] == size[8] - size[4]  # the head is read every token


def test_int4_flags_default_to_the_scheme_a_checkpoint_records(tmp_path):
    """`--int4` without --embedding-bits/--rounding quantizes a float checkpoint the way it records (a QAT stage's
    best/); each flag overrides its field; a checkpoint recording nothing gets the paper's scheme; an unreadable
    record is one clear error."""
    import argparse

    from safetensors.torch import save_file

    from mobilemoe.argtypes import int4_scheme
    from mobilemoe.checkpoint import read_tensors
    from mobilemoe.quantize import PAPER_SCHEME, Int4Scheme

    model = Transformer(get_preset("micro-dense"))
    save_model(tmp_path / "qat", model, scheme=Int4Scheme(embedding_bits=8))
    save_model(tmp_path / "plain", model)

    def flags(embedding_bits=None, rounding=None):
        return argparse.Namespace(embedding_bits=embedding_bits, rounding=rounding)

    assert int4_scheme(flags(), tmp_path / "qat") == Int4Scheme(8) == load_model(tmp_path / "qat").scheme
    assert int4_scheme(flags(rounding="hqq"), tmp_path / "qat") == Int4Scheme(8, "hqq")
    assert int4_scheme(flags(embedding_bits=4), tmp_path / "qat") == PAPER_SCHEME
    assert int4_scheme(flags(), tmp_path / "plain") == PAPER_SCHEME == load_model(tmp_path / "plain").scheme
    file = tmp_path / "qat" / "model.safetensors"
    tensors, meta = read_tensors(file)
    save_file(tensors, file, metadata={**meta, "int4_scheme": '{"embedding_bits": 6}'})
    with pytest.raises(MobileMoEError, match="records an unreadable INT4 scheme"):
        load_model(tmp_path / "qat")
