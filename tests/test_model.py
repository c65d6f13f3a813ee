import pytest
import torch

from mobilemoe.config import PRESETS, ModelConfig, get_preset, granular_moe, resolve_model_config
from mobilemoe.errors import ConfigError
from mobilemoe.model import Transformer, build_on_meta, count_parameters
from mobilemoe.moe import Router, run_experts, run_experts_reference
from mobilemoe.quantize import weight_bytes


def _expert_problem(T=37, D=16, I=8, E=6, k=2, dead=(1, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, D, generator=g, dtype=torch.float64, requires_grad=True)
    down = torch.randn(E, D, I, generator=g, dtype=torch.float64, requires_grad=True)
    live = torch.tensor([e for e in range(E) if e not in dead])
    experts = torch.stack([live[torch.randperm(len(live), generator=g)[:k]] for _ in range(T)])
    weights = torch.rand(T, k, generator=g, dtype=torch.float64, requires_grad=True)
    return x, experts, weights, gate_up, down


def test_grouped_dispatch_matches_reference_forward_and_backward():
    dtype = torch.float32  # torch._grouped_mm on CPU takes fp32/bf16/fp16 only
    x, experts, weights, gate_up, down = _expert_problem()
    tensors = [t.detach().to(dtype).requires_grad_() for t in (x, weights, gate_up, down)]
    grads = []
    for fn in (run_experts, run_experts_reference):
        for t in tensors:
            t.grad = None
        xx, ww, gu, dn = tensors
        y = fn(xx, experts, ww, gu, dn)
        probe = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
        (y * probe).sum().backward()
        grads.append([y.detach()] + [t.grad.clone() for t in tensors])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # experts 1 and 4 received no tokens: their weight gradients are exactly zero
    assert grads[0][3][[1, 4]].abs().max() == 0


@pytest.mark.parametrize("align", [8, 128])
def test_group_padding_matches_the_packed_groups(align):
    """The padded layout (each expert's rows start at a multiple of `align`, zero rows between: CUDA's 8, CPU bf16's
    up to 128), in bf16: the same outputs and gradients as the packed groups, dead experts included."""
    from mobilemoe.moe import grouped_swiglu, grouped_swiglu_padded

    x, experts, _, gate_up, down = _expert_problem(T=29, E=6, k=2)
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=6)
    results = []
    for padded in (False, True):
        xs, gu, dn = (t.detach().to(torch.bfloat16).requires_grad_() for t in (x[order // 2], gate_up, down))
        y = (grouped_swiglu_padded(xs, flat[order], counts, gu, dn, align=align) if padded
             else grouped_swiglu(xs, torch.cumsum(counts, 0, dtype=torch.int32), gu, dn))
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), xs.grad, gu.grad, dn.grad])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("skewed", [False, True])
def test_cpu_bf16_grouped_dispatch_matches_reference(skewed):
    """On CPU under bf16 autocast, forward and gradients vs the fp32 per-expert loop: near-equal groups go through
    one bmm per projection, skewed ones (expert 0 in every token's top-k) through the padded per-expert loop."""
    from mobilemoe.moe import BATCHED_CAPACITY_ROWS, BATCHED_MAX_WASTE, cpu_bf16_group_rows

    assert [cpu_bf16_group_rows(s, 30) for s in (64, 8192, 30 * 200)] == [2, 128, 128]
    x, experts, weights, gate_up, down = (t.detach().float() if t.is_floating_point() else t
                                          for t in _expert_problem(T=300, D=64, I=32, E=8, k=2, dead=()))
    if skewed:
        experts[:, 0] = 0
        experts[:, 1] = torch.arange(300) % 7 + 1
    capacity = -(-int(experts.flatten().bincount().max()) // BATCHED_CAPACITY_ROWS) * BATCHED_CAPACITY_ROWS
    assert (8 * capacity > BATCHED_MAX_WASTE * experts.numel()) == skewed  # the path this case means to test
    results = []
    for bf16 in (False, True):
        inputs = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = (run_experts if bf16 else run_experts_reference)(inputs[0], experts, *inputs[1:])
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach()] + [t.grad for t in inputs])
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@pytest.mark.parametrize("mode", ["fp32", "bf16", "bf16 skewed"])
def test_expert_backward_is_bit_deterministic_on_two_threads(mode):
    """Two identical backward passes give bit-equal gradients (resume replays a step exactly). Sized so that an
    x[index] gather, whose backward is a parallel atomic index_put_(accumulate=True) on CPU, differs between
    passes on 2 threads (measured: 9 of 9 repeats at T=2048, D=256, k=4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, experts, weights, gate_up, down = (t.detach().float() if t.is_floating_point() else t
                                              for t in _expert_problem(T=2048, D=256, I=32, E=16, k=4, dead=()))
        if mode == "bf16 skewed":  # expert 0 in every token's top-k: the padded per-expert loop, not the bmm
            others = torch.rand(experts.shape[0], 15, generator=torch.Generator().manual_seed(2)).argsort(-1)[:, :3]
            experts = torch.cat([torch.zeros_like(experts[:, :1]), others + 1], dim=1)
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        passes = []
        for _ in range(3):
            inputs = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
                y = run_experts(inputs[0], experts, *inputs[1:])
            (y.float() * probe).sum().backward()
            passes.append([t.grad for t in inputs])
        for other in passes[1:]:
            assert all(torch.equal(a, b) for a, b in zip(passes[0], other, strict=True))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
def test_cuda_grouped_dispatch_matches_reference():
    """On CUDA: bf16 through the padded grouped GEMM vs the fp32 per-expert loop (which fp32 runs use there)."""
    x, experts, weights, gate_up, down = (t.detach().float().cuda() if t.is_floating_point() else t.cuda()
                                          for t in _expert_problem(T=300, D=64, I=32, E=8, k=2))
    want = run_experts_reference(x, experts, weights, gate_up, down)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run_experts(x, experts, weights, gate_up, down)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())
    torch.testing.assert_close(run_experts(x, experts, weights, gate_up, down), want)  # fp32: the loop itself


def test_every_token_reaches_its_experts_no_drops():
    x, experts, weights, gate_up, down = (t.float() if t.is_floating_point() else t
                                          for t in _expert_problem(T=64, E=8, k=3, dead=()))
    with torch.no_grad():
        y = run_experts(x, experts, weights, gate_up, down)
        for t in (0, 31, 63):
            want = sum(weights[t, j] * torch.nn.functional.linear(
                torch.nn.functional.silu(gate_up[experts[t, j], :8] @ x[t]) * (gate_up[experts[t, j], 8:] @ x[t]),
                down[experts[t, j]]) for j in range(3))
            torch.testing.assert_close(y[t], want)


def test_sigmoid_router_selects_by_bias_but_weights_by_score():
    x = torch.randn(50, 8)
    w = torch.randn(4, 8)
    bias = torch.tensor([0.0, 10.0, 0.0, 0.0])  # expert 1 always selected
    r = _router(w, bias, top_k=2, router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)(x)
    assert (r.experts == 1).any(-1).all()
    scores = torch.sigmoid(x @ w.T)
    picked = scores.gather(-1, r.experts)
    torch.testing.assert_close(r.weights, 2.5 * picked / picked.sum(-1, keepdim=True))
    assert r.load.sum() == 100 and r.load[1] == 50


def test_softmax_router_aux_and_z_losses():
    x, w = torch.randn(40, 8), torch.randn(5, 8)
    router = _router(w, torch.zeros(5), top_k=1, router="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
                     aux_loss_coef=0.01, z_loss_coef=0.001)
    r = router(x)
    logits = x @ w.T
    p = logits.softmax(-1)
    f = torch.bincount(p.argmax(-1), minlength=5).float() / 40
    want = 0.01 * 5 * (f * p.mean(0)).sum() + 0.001 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(r.aux_loss, want)
    torch.testing.assert_close(r.weights.squeeze(-1), p.max(-1).values)
    assert router.eval()(x).aux_loss == 0  # auxiliary losses are a training-time term only


def _router(weight: torch.Tensor, bias: torch.Tensor, **settings) -> Router:
    router = Router(ModelConfig(d_model=weight.shape[1], n_routed_experts=weight.shape[0], **settings))
    router.load_state_dict({"weight": weight, "expert_bias": bias})
    return router


@pytest.mark.parametrize("name,active,total", [("mobilemoe-s", 272e6, 1.26e9), ("mobilemoe-m", 528e6, 2.82e9),
                                               ("mobilemoe-l", 922e6, 5.33e9), ("mobilellm-pro", 1.08e9, 1.08e9)])
def test_parameter_counts_reproduce_the_paper(name, active, total):
    count = count_parameters(build_on_meta(get_preset(name)))
    assert float(f"{count.active:.3g}") == active
    assert float(f"{count.total:.3g}") == total


def test_paper_granularity_reading():
    assert granular_moe(768, experts=8, granularity=8, shared_slots=4) == dict(
        n_routed_experts=60, expert_size=384, top_k=4, n_shared_experts=1, shared_expert_size=1536)


def test_int4_bytes_near_paper():
    # MobileMoE (arXiv 2605.27358): ~0.68 GB (S) and ~2.75 GB (L) of INT4 weights (int4 + fp16 scales per 32).
    s = weight_bytes(build_on_meta(get_preset("mobilemoe-s"))) / 2**30
    big = weight_bytes(build_on_meta(get_preset("mobilemoe-l"))) / 2**30
    assert 0.62 < s < 0.72 and 2.6 < big < 2.9


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trip(tmp_path, suffix):
    for cfg in PRESETS.values():
        path = tmp_path / f"{cfg.name}{suffix}"
        cfg.save(path)
        assert ModelConfig.load(path) == cfg


def test_resolve_preset_with_overrides():
    cfg = resolve_model_config({"preset": "tiny-moe", "n_layers": 2, "rope_scaling": {"factor": 8.0}})
    assert cfg.n_layers == 2 and cfg.rope_scaling.factor == 8.0 and cfg.d_model == 128


@pytest.mark.parametrize("change,field", [
    ({"n_heads": 5}, "n_heads"),
    ({"top_k": 99}, "top_k"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"d_modle": 3}, "d_modle"),
    ({"rope_scaling": {"factr": 2}}, "factr"),
])
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        resolve_model_config({"preset": "tiny-moe", **change})


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'd_model'"):
        resolve_model_config({"preset": "tiny-moe", "d_modle": 3})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'mobilemoe-xl'.*mobilemoe-l"):
        get_preset("mobilemoe-xl")


@pytest.mark.parametrize("preset", ["micro-moe", "micro-dense"])
def test_forward_loss_and_stats(preset):
    torch.manual_seed(0)
    model = Transformer(get_preset(preset))
    tokens, targets = torch.randint(0, model.cfg.vocab_size, (2, 2, 16))
    out = model(tokens, targets=targets)
    assert out.logits.shape == (2, 16, model.cfg.vocab_size)
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(model.cfg.vocab_size)).item()) < 1.0
    out.loss.backward()
    if model.cfg.is_moe:
        assert out.expert_load.shape == (2, 30)
        assert torch.all(out.expert_load.sum(-1) == 2 * 16 * model.cfg.top_k)
        assert model.layers[0].ffn.gate_up_proj.grad.abs().sum() > 0
    else:
        assert out.expert_load is None


def test_kv_cache_decode_equals_full_forward():
    torch.manual_seed(0)
    cfg = resolve_model_config({"preset": "micro-moe", "rope_scaling": {"factor": 4.0, "original_max_position": 8}})
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        full = model(tokens).logits
        model.setup_cache(1, 32)
        prefill = model(tokens[:, :12], input_pos=torch.arange(12)).logits
        steps = [model(tokens[:, i:i + 1], input_pos=torch.tensor([i])).logits for i in range(12, 20)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, rtol=1e-4, atol=1e-4)


def test_expert_bias_moves_toward_balance():
    torch.manual_seed(0)
    model = Transformer(get_preset("micro-moe")).train()
    moe = model.layers[0].ffn
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # expert 0 gets all the love
    x = torch.randn(64, 64).abs()
    _, _, load = moe(x)
    assert load[0] == 64
    moe.load_since_update += load  # what a training forward of the model adds (tested below)
    model.update_expert_bias()
    assert moe.router.expert_bias[0] < 0
    torch.testing.assert_close(moe.router.expert_bias, 1e-3 * torch.sign(load.mean() - load))
    assert moe.load_since_update.sum() == 0
    tokens = torch.randint(0, 4096, (2, 16))
    out = model(tokens)
    torch.testing.assert_close(torch.stack([m.load_since_update for m in model.moe_layers()]), out.expert_load)
    model.eval()(tokens)
    torch.testing.assert_close(torch.stack([m.load_since_update for m in model.moe_layers()]), out.expert_load)
