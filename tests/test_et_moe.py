"""ExecuTorch's fused MoE op `llama::quantized_moe_ffn` on our packed INT4 experts, eager and in the runtime."""

import copy

import pytest
import torch

from mobilemoe.config import resolve_model_config
from mobilemoe.export.et_moe_pack import HEADER_BYTES, pack_linear_int4
from mobilemoe.model import MoE
from mobilemoe.quantize import dequantize_int4, quantize_int4, unpack_int4


def unpack_like_torchao(blob: torch.Tensor, n: int, k: int, group_size: int) -> tuple:
    """A literal port of torchao's `unpack_weights<4, nr=8, kr=16, sr=2>` (weight_packing.h, fallback uint4.h):
    returns the header's int32 fields, the values [n, k], the scales [n, k/group] and the stored group sums."""
    data = blob.numpy().tobytes()
    header = list(torch.frombuffer(bytearray(data[:HEADER_BYTES]), dtype=torch.int32))
    at = HEADER_BYTES
    groups = k // group_size
    q = torch.zeros(n, k, dtype=torch.int32)
    scales, sums = torch.zeros(n, groups), torch.zeros(n, groups, dtype=torch.int32)
    for n0 in range(0, n, 8):
        for g in range(groups):
            for c0 in range(g * group_size, (g + 1) * group_size, 16):
                chunk = data[at:at + 64]
                at += 64
                packed_values = []
                for run in range(4):  # unpack_32_uint4_values on each 16-byte run
                    lo = [b & 0x0F for b in chunk[run * 16:run * 16 + 16]]
                    hi = [b >> 4 for b in chunk[run * 16:run * 16 + 16]]
                    packed_values += [v - 8 for v in lo + hi]
                for half in range(2):  # unpack_values(nr=8, kr=16, sr=2)
                    for j in range(8):
                        start = (half * 8 + j) * 8
                        if n0 + j < n:
                            q[n0 + j, c0 + half * 8:c0 + half * 8 + 8] = torch.tensor(packed_values[start:start + 8])
            s = torch.frombuffer(bytearray(data[at:at + 32]), dtype=torch.float32)
            t = torch.frombuffer(bytearray(data[at + 32:at + 64]), dtype=torch.int32)
            at += 64
            rows = min(8, n - n0)
            scales[n0:n0 + rows, g], sums[n0:n0 + rows, g] = s[:rows], t[:rows]
    assert at == len(data)
    return [int(h) for h in header], q, scales, sums


@pytest.mark.parametrize("n", [24, 20])  # 20 rows: the last block of 8 is padded with zero rows, as torchao does
def test_packed_blob_is_torchaos_universal_int4_layout(n):
    torch.manual_seed(0)
    k = 64
    packed, scales = quantize_int4(torch.randn(n, k))
    q = unpack_int4(packed)
    header, got_q, got_scales, got_sums = unpack_like_torchao(pack_linear_int4(q, scales.float()), n, k, 32)
    # magic, universal linear_8bit_act_xbit_weight, weight_nbit 4, no zeros, no bias, nr 8, kr 16, sr 2
    assert header == [6712, 1, 4, 0, 0, 8, 16, 2] + [0] * 8
    assert torch.equal(got_q, q.int())
    assert torch.equal(got_scales, scales.float())
    # The group sums feed the int8-activation kernels (aarch64); the x86 reference path never reads them.
    assert torch.equal(got_sums, q.reshape(n, 2, 32).sum(-1, dtype=torch.int32))


def int4_moe(**overrides) -> MoE:
    cfg = resolve_model_config({"preset": "micro-moe", "vocab_size": 512, **overrides})
    torch.manual_seed(1)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.router.expert_bias.normal_(0, 0.05)
    return moe


def dequantized(moe: MoE) -> MoE:
    """Our eager MoE block computing with the INT4 values the op is given."""
    ref = copy.deepcopy(moe)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(ref, name).copy_(dequantize_int4(*quantize_int4(getattr(moe, name))))
    return ref


@pytest.mark.parametrize("routing", [{"router": "sigmoid", "routed_scaling_factor": 2.5},
                                     {"router": "softmax", "routed_scaling_factor": 2.0}])
def test_fused_op_on_our_packed_experts_equals_our_moe_block(routing):
    from mobilemoe.export.pte import FusedInt4Experts, GatheredInt4Experts

    moe = int4_moe(**routing)
    x = torch.randn(2, 5, moe.cfg.d_model)
    with torch.no_grad():
        want = dequantized(moe)(x)[0]
        fused = FusedInt4Experts(moe)(x)
        gathered = GatheredInt4Experts(moe)(x)
    assert moe.shared_expert is not None and moe.router.expert_bias.abs().sum() > 0  # both paths exercised
    scale = want.abs().max()
    assert (fused - want).abs().max() < 1e-5 * scale
    assert (gathered - want).abs().max() < 1e-5 * scale


def test_router_without_top_k_renormalisation_keeps_the_gather_path():
    from mobilemoe.export.pte import DecodeStep, FusedInt4Experts, GatheredInt4Experts, fused_moe_unsupported
    from mobilemoe.model import Transformer

    def ffn_kinds(**overrides) -> set[type]:
        cfg = resolve_model_config({"preset": "micro-moe", "vocab_size": 512, **overrides})  # every layer MoE
        return {type(block.ffn) for block in DecodeStep(Transformer(cfg).eval(), 8).model.layers}

    assert ffn_kinds() == {FusedInt4Experts}
    assert ffn_kinds(norm_topk_prob=False) == {GatheredInt4Experts}
    assert "renormalises" in fused_moe_unsupported(int4_moe(norm_topk_prob=False))


def test_fused_moe_pte_runs_in_the_executorch_runtime(tmp_path):
    """One-layer MoE model -> .pte whose MoE layer is the op; runtime logits and greedy tokens equal its source."""
    from pathlib import Path
    from types import SimpleNamespace

    from mobilemoe.checkpoint import LoadedModel
    from mobilemoe.export.pte import PteRunner, export_pte, pte_kernels, quantized_decoder
    from mobilemoe.model import Transformer

    cfg = resolve_model_config({"preset": "micro-moe", "vocab_size": 512, "n_layers": 1})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.layers[0].ffn.router.expert_bias.normal_(0, 0.05)
    loaded = LoadedModel(model, None, False, Path("<memory>"))
    path = export_pte(loaded, tmp_path / "m.pte", max_seq_len=16)
    operators, delegates = pte_kernels(path)
    assert "llama::quantized_moe_ffn" in operators and "aten::index_select" not in operators  # no gathered experts
    assert set(delegates) == {"XnnpackBackend"}  # attention, shared expert, head
    prompt = [1, 7, 42, 300, 9]
    fused, gathered = quantized_decoder(loaded, 16), quantized_decoder(loaded, 16, fused_moe=False)
    runner = PteRunner(path)
    with torch.no_grad():
        for pos, token in enumerate(prompt):
            args = torch.tensor([[token]]), torch.tensor([pos])
            got, want = runner.step(token, pos), gathered(*args)[0, -1]
            assert (got - want).norm() < 1e-4 * want.norm()
            assert (fused(*args)[0, -1] - want).norm() < 1e-5 * want.norm()
        source = SimpleNamespace(step=lambda token, pos: gathered(torch.tensor([[token]]), torch.tensor([pos]))[0, -1])
        assert PteRunner(path).greedy(prompt, 8) == PteRunner.greedy(source, prompt, 8)

