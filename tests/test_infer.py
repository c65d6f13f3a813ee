"""The INT4 engine: quantized vs float, fused MoE vs reference, KV cache, sampling, errors."""

import pytest
import torch

from mobilemoe.checkpoint import model_tensors, save_model
from mobilemoe.config import get_preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.infer.engine import (
    Int4MoE,
    build_int4_model,
    experts_sorted,
    int4_experts,
    load_int4_model,
    pack_stacked_for_cpu_kernel,
)
from mobilemoe.infer.generate import Sampling, generate_tokens
from mobilemoe.infer.kernels import moe_decode_kernel
from mobilemoe.model import Transformer
from mobilemoe.moe import run_experts_reference
from mobilemoe.quantize import dequantize_int4


def _models(preset="micro-moe"):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    tensors = model_tensors(Transformer(cfg), int4=True)
    dequantized = Transformer(cfg).eval()
    dequantized.load_state_dict({k: dequantize_int4(tensors[f"{k}.qweight"], tensors[f"{k}.scales"])
                                 if f"{k}.qweight" in tensors else tensors[k] for k in dequantized.state_dict()})
    return build_int4_model(cfg, tensors), dequantized, tensors


@pytest.mark.parametrize("preset", ["micro-moe", "micro-dense"])
def test_int4_engine_matches_the_dequantized_float_model(preset):
    engine, reference, _ = _models(preset)
    tokens = torch.randint(0, 4096, (1, 40))
    with torch.no_grad():
        a, b = reference(tokens).logits, engine(tokens).logits.float()
    assert (a - b).abs().max() < 0.02 * a.abs().max()  # bf16 activations
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_fused_int4_moe_equals_the_reference_loop():
    engine, reference, _ = _models()
    fused: Int4MoE = engine.layers[1].ffn
    moe = reference.layers[1].ffn
    x = torch.randn(50, 64)
    with torch.no_grad():
        y, _, load = fused(x)
        r = moe.router.eval()(x.bfloat16())
        want = run_experts_reference(x.bfloat16().float(), r.experts, r.weights, moe.gate_up_proj, moe.down_proj)
        want = want + moe.shared_expert(x.bfloat16().float())
    assert torch.equal(load, r.load)
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.02 * want.abs().max().item())


def test_int4_kv_cache_decode_equals_full_forward():
    engine, _, _ = _models()
    tokens = torch.randint(0, 4096, (1, 24))
    with torch.no_grad():
        full = engine(tokens).logits.float()
        engine.setup_cache(1, 32, torch.bfloat16)
        prefill = engine(tokens[:, :16], input_pos=torch.arange(16)).logits
        steps = [engine(tokens[:, i:i + 1], input_pos=torch.tensor([i])).logits for i in range(16, 24)]
    cached = torch.cat([prefill, *steps], 1).float()
    assert (cached - full).abs().max() < 0.02 * full.abs().max()
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


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
    eager = list(generate_tokens(engine, prompt, 16, cache_dtype=torch.bfloat16))
    compiled = list(generate_tokens(engine, prompt, 16, cache_dtype=torch.bfloat16, compile=True))
    assert compiled == eager



@pytest.mark.parametrize("preset", ["micro-moe", "micro-dense"])
def test_decode_step_is_one_graph_without_breaks(preset):
    """What `compile_decode` hands torch.compile: one decode step over the static KV cache, as `generate_tokens`
    runs it. A graph break would silently run part of every step eagerly."""
    engine, _, _ = _models(preset)
    engine.setup_cache(1, 32, torch.bfloat16)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(engine)(torch.tensor([[7]]), input_pos=torch.tensor([5]))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_moe_decode_kernel_equals_the_aten_path():
    if moe_decode_kernel() is None:
        pytest.skip("no C compiler here, or aten's int4pack layout is not the AVX-512 one the kernel reads")
    torch.manual_seed(0)
    n_experts, d, i = 12, 128, 64
    gate_up = pack_stacked_for_cpu_kernel(torch.randint(0, 256, (n_experts, 2 * i, d // 2), dtype=torch.uint8),
                                          torch.rand(n_experts, 2 * i, d // 32).half() * 0.05)
    down = pack_stacked_for_cpu_kernel(torch.randint(0, 256, (n_experts, d, i // 2), dtype=torch.uint8),
                                       torch.rand(n_experts, d, i // 32).half() * 0.05)
    for _ in range(5):
        x = torch.randn(1, d).bfloat16()
        experts = torch.randperm(n_experts)[:3].unsqueeze(0)
        weights = torch.rand(1, 3)
        got = int4_experts(x, experts, weights, *gate_up, *down).float()
        want = experts_sorted(x, experts, weights, *gate_up, *down).float()
        assert (got - want).abs().max() < 0.02 * want.abs().max()  # aten rounds to bf16 in between
