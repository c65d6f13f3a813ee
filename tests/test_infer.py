"""The INT4 engine: 8da4w numerics vs QAT and torchao, every kernel variant, KV cache, sampling, errors."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mobilemoe.checkpoint import model_tensors, read_tensors, save_model
from mobilemoe.config import get_preset, resolve_model_config
from mobilemoe.errors import MobileMoEError
from mobilemoe.infer import q4
from mobilemoe.infer.engine import Int4MoE, build_int4_model, int4_format, load_int4_model, quantize_kv
from mobilemoe.infer.generate import Sampling, generate_tokens
from mobilemoe.infer.kernels import q8q4_library, supported_variants
from mobilemoe.model import Transformer
from mobilemoe.moe import run_experts
from mobilemoe.quantize import (
    Int4Scheme,
    activation_fake_quantizer,
    dequantize_int4,
    dequantize_tensors,
    prepare_qat,
    quantize_int4,
)


def _models(preset="micro-moe"):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    tensors = model_tensors(Transformer(cfg), int4=True)
    dequantized = Transformer(cfg).eval()
    dequantized.load_state_dict({k: dequantize_int4(tensors[f"{k}.qweight"], tensors[f"{k}.scales"])
                                 if f"{k}.qweight" in tensors else tensors[k] for k in dequantized.state_dict()})
    return build_int4_model(cfg, dict(tensors)), dequantized, tensors


@pytest.mark.parametrize("preset", ["micro-moe", "micro-dense"])
def test_int4_engine_matches_the_dequantized_float_model(preset):
    engine, reference, _ = _models(preset)
    tokens = torch.randint(0, 4096, (1, 40))
    with torch.no_grad():
        a, b = reference(tokens).logits, engine(tokens).logits.float()
    assert (a - b).abs().max() < 0.1 * a.abs().max()  # int8 activations (which can flip a routing choice)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def _relative_error(got, want):
    return ((got.float() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("embedding_bits", [4, 8])
def test_engine_computes_what_qat_trained_against(embedding_bits):
    """Engine logits vs the QAT model's fake-quantized forward (torchao), on a briefly QAT-trained model:
    at least 10x closer than what the engine computed before 8da4w (exact INT4 weights, bf16 activations).
    With an 8-bit embedding/head both sides compute the head as weight-only int8."""
    torch.manual_seed(0)
    cfg = get_preset("micro-moe")
    scheme = Int4Scheme(embedding_bits=embedding_bits)
    model = prepare_qat(Transformer(cfg), scheme)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (2, 33))
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    from mobilemoe.train.trainer import plain_state

    plain = Transformer(cfg)
    plain.load_state_dict(plain_state(model))
    tensors = model_tensors(plain, int4=True, scheme=scheme)
    dequantized = Transformer(cfg).eval()
    dequantized.load_state_dict(dequantize_tensors(tensors))
    engine = build_int4_model(cfg, tensors)
    tokens = torch.randint(0, cfg.vocab_size, (1, 48))
    with torch.no_grad():
        want = model(tokens).logits
        ours = _relative_error(engine(tokens).logits, want)
        bf16_engine = _relative_error(dequantized.to(torch.bfloat16)(tokens).logits, want)
    print(f"engine vs QAT forward: {ours:.2e}, bf16 activations: {bf16_engine:.2e}")
    assert ours * 10 < bf16_engine, (ours, bf16_engine)


def test_int4_moe_equals_the_fake_quantized_dispatch():
    engine, reference, _ = _models()
    fused: Int4MoE = engine.layers[1].ffn
    moe = reference.layers[1].ffn
    fq = activation_fake_quantizer()
    for n_tokens in (1, 50):
        x = torch.randn(n_tokens, 64)
        with torch.no_grad():
            y, _, load = fused(x)
            r = moe.router.eval()(x)
            want = run_experts(x, r.experts, r.weights, moe.gate_up_proj, moe.down_proj, quantize_activation=fq)
            shared = moe.shared_expert
            want = want + shared.down_proj(fq(F.silu(shared.gate_proj(fq(x))) * shared.up_proj(fq(x))))
        assert torch.equal(load, r.load)
        assert _relative_error(y, want) < 1e-5


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_int4_kv_cache_decode_equals_full_forward(cache_dtype):
    """Prefill then decode through the KV cache vs one forward without a cache (fp32 keys and values): equal
    to float precision with an fp32 cache; the fp16 cache (the engine's default) rounds keys and values to
    11 significant bits, the int8 one to 1/254 of each row's largest."""
    engine, _, _ = _models()
    tokens = torch.randint(0, 4096, (1, 24))
    with torch.no_grad():
        full = engine(tokens).logits.float()
        engine.setup_cache(1, 32, cache_dtype)
        prefill = engine(tokens[:, :16], input_pos=torch.arange(16)).logits
        steps = [engine(tokens[:, i:i + 1], input_pos=torch.tensor([i])).logits for i in range(16, 24)]
    cached = torch.cat([prefill, *steps], 1).float()
    error = _relative_error(cached, full)
    print(f"{cache_dtype} cache vs no cache: {error:.1e}")
    assert error < {torch.float32: 1e-5, torch.float16: 1e-2, torch.int8: 2e-2}[cache_dtype]
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() >= (1 if cache_dtype != torch.int8 else 0.95)


def test_c_decode_step_follows_the_cache_when_its_rows_are_replaced():
    """`keep_rows` gives a cache new tensors: the C step must write and read those, not the freed ones."""
    engine, _, _ = _models()
    prompt = torch.randint(0, engine.cfg.vocab_size, (1, 6))
    with torch.no_grad():
        engine.setup_cache(1, 16, torch.int8)
        engine(prompt, input_pos=torch.arange(6))
        want = [engine(prompt[:, i:i + 1], input_pos=torch.tensor([6 + i])).logits for i in range(3)]
        engine.setup_cache(1, 16, torch.int8)
        engine(prompt, input_pos=torch.arange(6))
        engine(prompt[:, :1], input_pos=torch.tensor([6]))
        before = engine._decode_program()
        for block in engine.layers:
            block.attn.kv_cache.keep_rows(torch.tensor([0]))  # same contents, new tensors
        got = [engine(prompt[:, i:i + 1], input_pos=torch.tensor([6 + i])).logits for i in (1, 2)]
    assert engine._decode_program() is not before
    assert all(torch.equal(g, w) for g, w in zip(got, want[1:], strict=True))


def test_int8_kv_cache_keeps_each_rows_scales_when_rows_leave_the_batch():
    """Batched generation drops finished rows from the cache (eval's `greedy_until`): an int8 cache's scales go
    with their rows."""
    from mobilemoe.infer.engine import Int8KVCache

    torch.manual_seed(0)
    cache = Int8KVCache(3, 2, 5, 8)
    k, v = torch.randn(3, 2, 4, 8) * torch.tensor([1.0, 10.0, 100.0])[:, None, None, None], torch.randn(3, 2, 4, 8)
    cache.update(torch.arange(4), k, v)
    before = cache.filled(4)
    cache.keep_rows(torch.tensor([0, 2]))
    for kept, full in zip(cache.filled(4), before, strict=True):
        assert torch.equal(kept, full[[0, 2]])


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.int8])
def test_kv_cache_decodes_what_the_fp32_cache_decodes(cache_dtype):
    """The engine's fp16 (default) and int8 KV caches vs an fp32 one, on the C decode step: the same prompt
    prefilled, then teacher-forced decode steps; the logits differ by the rounding of keys and values only."""
    torch.manual_seed(0)
    engine, _, _ = _models()
    tokens = torch.randint(0, 4096, (1, 96))
    logits = {}
    with torch.inference_mode():
        for dtype in (torch.float32, cache_dtype):
            engine.setup_cache(1, 96, dtype)
            steps = [engine(tokens[:, :32], input_pos=torch.arange(32)).logits[:, -1:]]
            steps += [engine(tokens[:, i:i + 1], input_pos=torch.tensor([i])).logits for i in range(32, 95)]
            logits[dtype] = torch.cat(steps, 1)
    error = _relative_error(logits[cache_dtype], logits[torch.float32])
    agree = (logits[cache_dtype].argmax(-1) == logits[torch.float32].argmax(-1)).float().mean().item()
    print(f"{cache_dtype} vs fp32 KV cache: logits {error:.1e} relative, argmax equal at {agree:.0%} of steps")
    assert error < {torch.float16: 1e-2, torch.int8: 2e-2}[cache_dtype] and agree >= 0.95


@pytest.mark.parametrize(("overrides", "cache_dtype"), [
    ({"preset": "micro-moe"}, torch.float16), ({"preset": "micro-moe"}, torch.float32),
    ({"preset": "micro-dense", "n_kv_heads": 1}, torch.float16),
    ({"preset": "tiny-moe", "d_model": 384, "n_heads": 6, "head_dim": 64}, torch.float16),
    ({"preset": "micro-moe"}, torch.int8), ({"preset": "tiny-moe", "d_model": 384, "n_heads": 6, "head_dim": 64},
                                            torch.int8),
    ({"preset": "micro-moe", "router": "softmax", "qk_norm": False, "tie_embeddings": False, "moe_layer_step": 2,
      "ffn_size": 192}, torch.float16)])
def test_c_decode_step_computes_what_the_torch_modules_compute(overrides, cache_dtype):
    """The whole decode step in one C call (embedding, layers, head) vs the engine's torch modules running the
    same kernels product by product, step by step from the same KV cache (fp16, the default, fp32, or int8): both
    router kinds, QK-norm on and off, a dense layer in a MoE model, an untied head, all query heads on one kv
    head, heads of 64 (MobileMoE-S's: the AVX-512 attention kernel) three to a kv head. The norms sum in another
    order than torch's, so an int8 activation can round the other way now and then (an ~1e-3 change); most
    steps agree to float precision."""
    torch.manual_seed(0)
    cfg = resolve_model_config(overrides)
    engine = build_int4_model(cfg, model_tensors(Transformer(cfg), int4=True))
    tokens = torch.randint(0, cfg.vocab_size, (1, 56))
    errors, same_argmax = [], []
    with torch.inference_mode():
        engine.setup_cache(1, 64, cache_dtype)
        engine(tokens[:, :24], input_pos=torch.arange(24))
        for i in range(24, 56):
            step = {}
            for c_decode in (True, False):  # the torch step last: its keys and values stay in the cache
                engine.c_decode = c_decode
                step[c_decode] = engine(tokens[:, i:i + 1], input_pos=torch.tensor([i])).logits
            errors.append(_relative_error(step[True], step[False]))
            same_argmax.append(torch.equal(step[True].argmax(-1), step[False].argmax(-1)))
    errors.sort()
    print(f"C step vs torch modules: median {errors[len(errors) // 2]:.1e}, max {errors[-1]:.1e}")
    assert errors[len(errors) // 2] < 1e-5 and errors[-1] < 2e-2
    assert sum(same_argmax) >= 0.9 * len(same_argmax)


def test_int4_checkpoint_stores_the_kernel_layout_and_loading_maps_it(tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("micro-moe")
    model = Transformer(cfg)
    save_model(tmp_path / "int4", model, int4=True)
    file = tmp_path / "int4" / "model.safetensors"
    stored, _ = read_tensors(file)
    assert "layers.0.attn.qkv_proj.q4_blocks" in stored and not any(k.endswith(".qweight") for k in stored)
    tensors = model_tensors(model, int4=True)
    unpacked = int4_format(cfg, stored)
    assert unpacked.keys() == tensors.keys() and all(torch.equal(unpacked[k], v) for k, v in tensors.items())
    engine, _ = load_int4_model(tmp_path / "int4")
    # no repack: the engine's weights are the file's bytes in place, inside a memory map of the file
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(file))]
    spans = [tuple(int(a, 16) for a in m[0].split("-")) for m in maps]
    for w in (engine.layers[0].attn.qkv_proj.weight, engine.layers[1].ffn.gate_up, engine.lm_head.weight):
        assert any(lo <= w.blocks.data_ptr() < hi for lo, hi in spans)
    reference = build_int4_model(cfg, tensors)  # packed at load from the INT4 format: the same model
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(engine(ids).logits, reference(ids).logits)


def test_huge_pages_copy_the_weights_out_of_the_file_and_compute_the_same(tmp_path):
    """`--huge-pages`: the weights live in one anonymous mapping starting on a 2 MB boundary, not in the file's
    mapping; prefill logits and greedy decode (the C step) are the mapped model's exactly."""
    from mobilemoe.infer.engine import HUGE_PAGE, in_huge_pages

    torch.manual_seed(0)
    cfg = get_preset("micro-moe")
    save_model(tmp_path / "int4", Transformer(cfg), int4=True)
    file = str(tmp_path / "int4" / "model.safetensors")
    mapped, _ = load_int4_model(tmp_path / "int4")
    huge, _ = load_int4_model(tmp_path / "int4", huge_pages=True)
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(file)]
    spans = [tuple(int(a, 16) for a in m[0].split("-")) for m in maps]
    for w in (huge.layers[0].attn.qkv_proj.weight, huge.layers[1].ffn.gate_up, huge.lm_head.weight):
        assert not any(lo <= w.blocks.data_ptr() < hi for lo, hi in spans)
    copies = in_huge_pages({"a": torch.arange(5, dtype=torch.int16), "b": torch.ones(3, 4)})
    assert copies["a"].data_ptr() % HUGE_PAGE == 0 and copies["b"].data_ptr() % 64 == 0
    assert torch.equal(copies["a"], torch.arange(5, dtype=torch.int16)) and torch.equal(copies["b"], torch.ones(3, 4))
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(huge(ids).logits, mapped(ids).logits)
    prompt = ids[0].tolist()
    assert list(generate_tokens(huge, prompt, 8)) == list(generate_tokens(mapped, prompt, 8))


def test_huge_pages_refuse_weights_larger_than_the_free_memory(monkeypatch, tmp_path):
    from mobilemoe.infer import engine

    torch.manual_seed(0)
    save_model(tmp_path / "int4", Transformer(get_preset("micro-moe")), int4=True)
    monkeypatch.setattr(engine, "available_memory", lambda: 1000)
    with pytest.raises(MobileMoEError, match="need .* of memory and 1 KB is available: load without huge pages"):
        load_int4_model(tmp_path / "int4", huge_pages=True)
    assert load_int4_model(tmp_path / "int4")[0] is not None  # mapped: no copy, no check


def test_sampling_is_deterministic_with_a_seed():
    model = Transformer(get_preset("micro-moe")).eval()
    prompt = [5, 17, 300, 42]
    run = lambda **kw: list(generate_tokens(model, prompt, 12, Sampling(**kw)))  # noqa: E731
    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert run(temperature=1.0, seed=3) != run(temperature=1.0, seed=4)
    assert run(temperature=1.0, top_k=1, seed=9) == run()  # top-1 sampling is greedy
    assert run(temperature=1.0, top_p=1e-6, seed=9) == run()  # so is a vanishing nucleus
    greedy = run()
    with torch.no_grad():
        full = model(torch.tensor([prompt + greedy[:-1]])).logits[0]
    assert greedy == full[len(prompt) - 1:].argmax(-1).tolist()  # cached greedy == full-forward greedy


def test_stop_tokens_and_context_errors():
    model = Transformer(get_preset("micro-moe")).eval()
    first = next(generate_tokens(model, [1, 2, 3], 5))
    assert list(generate_tokens(model, [1, 2, 3], 5, stop_ids={first})) == [first]
    with pytest.raises(MobileMoEError, match="prompt has 600 tokens but the context holds 512"):
        list(generate_tokens(model, [1] * 600, 5))


def test_engine_refuses_float_and_mismatched_checkpoints(tmp_path):
    model = Transformer(get_preset("micro-moe"))
    save_model(tmp_path / "float", model)
    with pytest.raises(MobileMoEError, match="holds float weights, not INT4"):
        load_int4_model(tmp_path / "float")
    tensors = model_tensors(model, int4=True)
    tensors.pop("layers.0.attn.q_proj.weight.qweight")
    with pytest.raises(MobileMoEError, match="INT4 weights for 'layers.0.attn.q_proj.weight' are missing"):
        build_int4_model(get_preset("micro-moe"), tensors)


@pytest.mark.slow  # torch.compile of the decode step: ~15-40 s on two shared cores
@pytest.mark.parametrize("preset", ["micro-moe", "micro-dense"])
def test_compiled_decode_generates_the_eager_tokens(preset):
    engine, _, _ = _models(preset)
    prompt = torch.randint(0, 4096, (12,)).tolist()
    eager = list(generate_tokens(engine, prompt, 16, cache_dtype=torch.float32))
    compiled = list(generate_tokens(engine, prompt, 16, cache_dtype=torch.float32, compile=True))
    assert compiled == eager


@pytest.mark.parametrize(("preset", "embedding_bits"), [("micro-moe", 4), ("micro-dense", 4), ("micro-dense", 8)])
def test_decode_step_is_one_graph_without_breaks(preset, embedding_bits):
    """What `compile_decode` hands torch.compile: one decode step over the static KV cache, as `generate_tokens`
    runs it (with the 4-bit head, and the 8-bit one). A graph break would silently run part of every step eagerly."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    engine = build_int4_model(cfg, model_tensors(Transformer(cfg), int4=True,
                                                 scheme=Int4Scheme(embedding_bits=embedding_bits)))
    engine.setup_cache(1, 32)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(engine)(torch.tensor([[7]]), input_pos=torch.tensor([5]))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.fixture(params=supported_variants())
def kernel_variant(request, monkeypatch):
    """Each kernel variant this CPU runs, forced through MOBILEMOE_KERNEL."""
    monkeypatch.setenv("MOBILEMOE_KERNEL", request.param)
    q8q4_library.cache_clear()
    assert q8q4_library().q4_variant().decode() == request.param
    yield request.param
    q8q4_library.cache_clear()


def _int4(*shape):
    return quantize_int4(torch.randn(*shape))


def test_kernel_activations_are_torchaos_int8(kernel_variant):
    x = torch.cat([torch.randn(6, 96) * 5, torch.zeros(1, 96), torch.rand(1, 96), -torch.rand(1, 96)])
    q, scale, zero = q4.quantize_activations(x)
    assert torch.equal((q.float() - zero[:, None].float()) * scale[:, None], activation_fake_quantizer()(x))


@pytest.mark.parametrize("n_tokens", [1, 3, 9])
def test_kernel_linear_equals_the_reference(kernel_variant, n_tokens):
    torch.manual_seed(n_tokens)
    packed, scales = _int4(40, 96)  # 40 rows: not whole blocks of 16
    x = torch.randn(n_tokens, 96)
    got = q4.q4_linear(x, q4.pack_q4(packed, scales))
    assert _relative_error(got, q4.reference_linear(x, packed, scales)) < 1e-6


@pytest.mark.parametrize("n_tokens", [1, 7])
def test_kernel_moe_and_ffn_equal_the_reference(kernel_variant, n_tokens):
    torch.manual_seed(n_tokens)
    n_experts, d, i, shared_i, top_k = 6, 64, 32, 64, 2
    gate_up, down, shared_gate_up, shared_down = _int4(n_experts, 2 * i, d), _int4(n_experts, d, i), \
        _int4(2 * shared_i, d), _int4(d, shared_i)
    x = torch.randn(n_tokens, d)
    experts = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, top_k)

    def swiglu(x, gu, dn):
        gate, up = q4.reference_linear(x, *gu).chunk(2, dim=-1)
        return q4.reference_linear(F.silu(gate) * up, *dn)

    shared = (q4.pack_q4(*shared_gate_up), q4.pack_q4(*shared_down))
    want = swiglu(x, shared_gate_up, shared_down)
    assert _relative_error(q4.q4_ffn(x, *shared), want) < 1e-5
    for t in range(n_tokens):
        for j in range(top_k):
            e = experts[t, j]
            want[t] += weights[t, j] * swiglu(x[t:t + 1], (gate_up[0][e], gate_up[1][e]), (down[0][e], down[1][e]))[0]
    got = q4.q4_moe(x, experts, weights, q4.pack_q4(*gate_up), q4.pack_q4(*down), shared)
    assert _relative_error(got, want) < 1e-5


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize(("hd", "length", "heads"), [(16, 23, 6), (64, 200, 6), (64, 65, 10), (64, 130, 8)])
def test_decode_attention_reads_only_the_filled_cache(kernel_variant, cache_dtype, hd, length, heads):
    """Over more than one chunk of 64 positions and a partial one; 3, 5 and 8 query heads per kv head (the
    AVX-512 kernel takes at most 6 at a time); 8 heads on one kv head (heads // 2 else). The int8 cache against
    attention over its dequantized values with the query quantized as a key is (the kernels take q . k as an
    integer dot product and apply the scales to scores and weights)."""
    torch.manual_seed(0)
    kv_heads = 1 if heads == 8 else 2
    q, k, v = torch.randn(1, heads, 1, hd), torch.randn(1, kv_heads, 240, hd), torch.randn(1, kv_heads, 240, hd)
    scales = ()
    if cache_dtype == torch.int8:
        (k, k_scale), (v, v_scale), (qq, q_scale) = quantize_kv(k), quantize_kv(v), quantize_kv(q)
        want = F.scaled_dot_product_attention(qq.float() * q_scale[..., None],
                                              (k.float() * k_scale[..., None])[:, :, :length],
                                              (v.float() * v_scale[..., None])[:, :, :length], enable_gqa=True)
        k_scale[:, :, length:], v_scale[:, :, length:] = float("nan"), float("nan")  # never read
        scales = (k_scale, v_scale)
    else:
        k, v = k.to(cache_dtype), v.to(cache_dtype)
        want = F.scaled_dot_product_attention(q, k[:, :, :length].float(), v[:, :, :length].float(), enable_gqa=True)
        k[:, :, length:], v[:, :, length:] = float("nan"), float("nan")  # never read
    torch.testing.assert_close(q4.attention_decode(q, k, v, torch.tensor(length), *scales), want, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("n_tokens", [1, 6])
def test_kernel_int8_head_equals_the_dequantized_rows(kernel_variant, n_tokens):
    """The 8-bit head's weight-only int8 product vs a float64 matmul of the dequantized rows: 101 rows (a block
    of 64 and a partial one, tails of the 4- and 8-row tiles), K = 100 (a tail past the vector lanes). Each
    token's logits are bitwise the same computed alone (decode) as among 6 (a tile of 4, then single tokens)."""
    torch.manual_seed(n_tokens)
    w, scales = torch.randint(-127, 128, (101, 100), dtype=torch.int8), torch.rand(101) / 100
    x = torch.randn(n_tokens, 100)
    got = q4.w8_linear(x, w, scales)
    assert _relative_error(got, x.double() @ (w.double() * scales.double()[:, None]).T) < 1e-6
    for t in range(n_tokens):
        assert torch.equal(got[t:t + 1], q4.w8_linear(x[t:t + 1], w, scales))


def test_kernel_int8_kv_quantization_is_torchs(kernel_variant):
    """The int8 KV cache's rows as the C decode step writes them, bitwise the torch path's (`quantize_kv`, which
    prefill uses): values, scales, a zero row, rows of tiny and huge values, halves that round to even."""
    torch.manual_seed(0)
    x = torch.randn(200, 64) * 10.0 ** torch.randint(-30, 30, (200, 1)).float()
    x[0] = 0.0
    x[1] = torch.arange(64) - 31.5  # max 32: scale 32/127, many values land near halves
    x[2, :] = 1e-39  # subnormal
    x[3] = torch.cat([torch.tensor([127.0]), torch.arange(63) - 31.5]) * 4  # scale 4, exact halves: to even
    want_q, want_scale = quantize_kv(x)
    q, scale = torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[0])
    q8q4_library().kv_quantize(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), scale.data_ptr())
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    assert q[0].eq(0).all() and q.abs().max() == 127


def test_kernel_fp16_conversions_are_torchs(kernel_variant):
    """The KV cache's fp32 <-> fp16 conversions, bitwise as torch's (round to nearest even; subnormal halves,
    overflow to inf, nan), in the vector loops and the scalar tail (37 values)."""
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-5, 6.1e-5, 3e-8, 2.98e-8,
                             -5.96e-8, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, float("inf"), float("-inf"), float("nan")])
    x = torch.cat([specials, torch.randn(1000) * 10.0 ** torch.randint(-9, 6, (1000,)).float(), torch.randn(37)])
    lib = q8q4_library()
    half = torch.empty(x.shape, dtype=torch.float16)
    lib.f16_from_f32(x.data_ptr(), half.data_ptr(), x.numel())
    assert torch.equal(half.view(torch.int16), x.half().view(torch.int16))
    back = torch.empty(x.shape)
    lib.f32_from_f16(half.data_ptr(), back.data_ptr(), x.numel())
    assert torch.equal(back.nan_to_num(7.0), half.float().nan_to_num(7.0))


def test_neon_variant_under_qemu_equals_portable_c(tmp_path):
    """The ARM NEON (sdot) variant, cross-compiled and run under qemu-aarch64, against the portable C build
    of the same self-test (tests/kernels/selftest.c). Skips where the cross toolchain is not installed
    (Debian: gcc-aarch64-linux-gnu, libgomp1-arm64-cross, qemu-user)."""
    import shutil
    import subprocess
    from pathlib import Path

    gcc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if gcc is None or qemu is None:
        pytest.skip("no aarch64 cross compiler or qemu-aarch64 here")
    source = Path(__file__).parent / "kernels" / "selftest.c"
    outputs = {}
    for variant, flags in (("neon_dot", ["-march=armv8.2-a+dotprod+fp16"]), ("portable", [])):
        binary = tmp_path / variant
        subprocess.run([gcc, "-O2", "-std=gnu11", "-fopenmp", *flags, str(source), "-o", str(binary), "-lm"],
                       check=True)
        lines = subprocess.run([qemu, "-L", "/usr/aarch64-linux-gnu", str(binary)], check=True, capture_output=True,
                               text=True).stdout.split()
        assert lines[-1] == variant
        outputs[variant] = torch.tensor([float(v) for v in lines[:-1]])
    assert _relative_error(outputs["neon_dot"], outputs["portable"]) < 1e-6
