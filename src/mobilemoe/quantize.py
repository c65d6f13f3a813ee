"""The INT4 weight format of MobileMoE (arXiv 2605.27358): symmetric int4 in [-8, 7], group size 32, fp16 scales.

Quantized: attention q/k/v/o, dense and shared FFNs, every routed expert, the (tied) embedding.
Kept in high precision: the router and expert bias (fp32), norms (16-bit).

`Int4Scheme` says how a float model fills that format. The default is the paper's: every matrix, the
embedding/head included, INT4 by round to nearest. Two options cut the loss of PTQ on a pretrained model: the
tied embedding/head at 8 bits (int8 per row, as llama.cpp and ExecuTorch keep it) and torchao's HQQ scale fit
instead of round to nearest (same format, the scales chosen to minimise the rounding error). QAT trains against
either embedding width (`prepare_qat(model, scheme)`); HQQ is post-training only. Checkpoints record their
scheme (`checkpoint.checkpoint_scheme`), so every room (PTQ at load, the engine, GGUF, .pte, sizes) reads it
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mobilemoe.errors import MobileMoEError

GROUP_SIZE = 32
INT4_BYTES_PER_PARAM = 0.5 + 2 / GROUP_SIZE  # 4-bit values + one fp16 scale per group


@dataclass(frozen=True)
class Int4Scheme:
    """How a float model is quantized to the INT4 format (PTQ, or what QAT trains against). Defaults: the paper's."""

    embedding_bits: Literal[4, 8] = 4  # 8: the tied embedding/head as int8 per row (fp16 scales)
    rounding: Literal["rtn", "hqq"] = "rtn"  # hqq: torchao's HQQ scale-only fit of the INT4 scales

    def __post_init__(self) -> None:
        if self.embedding_bits not in (4, 8) or self.rounding not in ("rtn", "hqq"):
            raise MobileMoEError(f"INT4 scheme: embedding bits must be 4 or 8 and rounding rtn or hqq, not "
                                 f"{self.embedding_bits} / {self.rounding}")

    def with_overrides(self, embedding_bits: int | None = None, rounding: str | None = None) -> Int4Scheme:
        """This scheme with the settings given (not None) replaced: flags over what a checkpoint records."""
        return Int4Scheme(self.embedding_bits if embedding_bits is None else embedding_bits,
                          self.rounding if rounding is None else rounding)

    def check_trainable(self, where: str = "QAT") -> None:
        """QAT trains the weights against round to nearest; HQQ fits scales to weights already trained."""
        if self.rounding != "rtn":
            raise MobileMoEError(f"{where}: HQQ rounding is a post-training (PTQ) choice: it fits the INT4 scales to "
                                 "weights that are already trained, while QAT trains the weights against round to "
                                 "nearest (what its fake quantizer computes and the QAT checkpoint stores). Drop "
                                 "the rounding setting from training (the QAT stage may set embedding_bits: 8); use "
                                 "`--int4 --rounding hqq` on eval/chat/generate/serve of a float checkpoint")

    @property
    def suffix(self) -> str:
        """'' for the paper's scheme, else what differs (for labels and directory names)."""
        return "".join(part for part, on in ((f"-e{self.embedding_bits}", self.embedding_bits != 4),
                                             (f"-{self.rounding}", self.rounding != "rtn")) if on)


PAPER_SCHEME = Int4Scheme()
HEAD_WEIGHTS = ("embed.weight", "lm_head.weight")


def is_quantized_weight(name: str, param: nn.Parameter) -> bool:
    """Whether the INT4 format quantizes this parameter (by its name in `Transformer`)."""
    return param.dim() >= 2 and ".router." not in name


def weight_bytes(model: nn.Module, bits: int = 4, group_size: int = GROUP_SIZE,
                 scheme: Int4Scheme = PAPER_SCHEME) -> int:
    """Bytes of the weights on device: quantized tensors at `bits` plus one fp16 scale per group (the
    embedding/head at 8 bits with one fp16 scale per row where `scheme` keeps it so); router and expert bias in
    fp32; everything else in 16 bits. bits=16 gives the bf16 size."""
    total = 0
    for name, p in model.named_parameters():
        if bits < 16 and scheme.embedding_bits == 8 and name in HEAD_WEIGHTS:
            total += p.numel() + p.shape[0] * 2
        elif bits < 16 and is_quantized_weight(name, p):
            total += p.numel() * bits // 8 + p.numel() // group_size * 2
        else:
            total += p.numel() * (4 if ".router." in name else 2)
    total += sum(b.numel() * 4 for name, b in model.named_buffers() if name.endswith("expert_bias"))
    return total


# --- the INT4 storage format ------------------------------------------------------------------------
def quantize_int4(weight: Tensor, group_size: int = GROUP_SIZE, rounding: str = "rtn") -> tuple[Tensor, Tensor]:
    """Symmetric per-group INT4 of the last dim: (packed uint8 [..., K/2], fp16 scales [..., K/group]).

    Scales and rounding are torchao's own: "rtn" `get_group_qparams_symmetric` + `quantize_affine` (fp16
    scales), the same maths as the QAT fake quantizer, so a QAT model converts to exactly what it trained
    against; "hqq" the scales of torchao's HQQ scale-only solver (least squares on the rounded values,
    iterated), rounded to fp16, then the same `quantize_affine`. Two values per byte: even index in the
    low nibble, stored as q + 8.
    """
    from torchao.quantization.quant_primitives import quantize_affine
    from torchao.quantization.utils import get_group_qparams_symmetric

    *lead, k = weight.shape
    if k % group_size:
        raise MobileMoEError(f"INT4 g{group_size}: the input dimension {k} is not a multiple of the group size")
    rows = weight.detach().float().reshape(-1, k)
    scales, zeros = get_group_qparams_symmetric(rows, 4, group_size, torch.float16)
    if rounding == "hqq":
        from torchao.quantization import IntxUnpackedToInt8Tensor

        fitted = IntxUnpackedToInt8Tensor.from_hp(rows, (1, group_size), torch.int4,
                                                  intx_choose_qparams_algorithm="hqq_scale_only")
        scales = fitted.scale.reshape(scales.shape).to(torch.float16)
    q = quantize_affine(rows, (1, group_size), scales, zeros, torch.int8, -8, 7)
    return pack_int4(q.reshape(*lead, k)), scales.reshape(*lead, k // group_size)


def quantize_int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row (torchao's `get_group_qparams_symmetric` with one group a row): (int8 [N, K],
    fp16 scales [N, 1]). The 8-bit embedding/head of `Int4Scheme(embedding_bits=8)`."""
    from torchao.quantization.quant_primitives import quantize_affine
    from torchao.quantization.utils import get_group_qparams_symmetric

    rows = weight.detach().float()
    scales, zeros = get_group_qparams_symmetric(rows, 8, rows.shape[-1], torch.float16)
    return quantize_affine(rows, (1, rows.shape[-1]), scales, zeros, torch.int8, -128, 127), scales


def quantize_weight(name: str, weight: Tensor, scheme: Int4Scheme = PAPER_SCHEME) -> tuple[Tensor, Tensor]:
    """(qweight, scales) of one weight the format quantizes, as `scheme` says."""
    if scheme.embedding_bits == 8 and name in HEAD_WEIGHTS:
        return quantize_int8_rows(weight)
    return quantize_int4(weight, rounding=scheme.rounding)


def dequantize(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Float weights from stored (qweight, scales): packed INT4 (uint8) or int8 rows."""
    if qweight.dtype == torch.int8:
        return qweight.to(dtype) * scales.to(dtype)
    return dequantize_int4(qweight, scales, dtype)


def dequantize_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A float state dict from INT4-format checkpoint tensors: every `name.qweight` / `name.scales` pair becomes
    `name`, the other tensors pass through."""
    quantized = {n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")}
    out = {n: t for n, t in tensors.items() if n.removesuffix(".qweight").removesuffix(".scales") not in quantized}
    return out | {n: dequantize(tensors[f"{n}.qweight"], tensors[f"{n}.scales"]) for n in quantized}


def pack_int4(q: Tensor) -> Tensor:
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    low, high = (packed & 0xF).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize_int4(packed: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    q = unpack_int4(packed)
    *lead, k = q.shape
    groups = q.reshape(*lead, scales.shape[-1], -1).to(dtype) * scales.unsqueeze(-1).to(dtype)
    return groups.reshape(*lead, k)


# --- quantization-aware training (torchao) ----------------------------------------------------------
def _fake_quant_configs():
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    # fp16 scales, symmetric int4 g32: the same numbers `quantize_int4` stores.
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=GROUP_SIZE, is_symmetric=True,
                                    scale_precision=torch.float16)
    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)  # int8 dynamic
    return weight, activation


def _int8_rows_config():
    """Symmetric int8 per row, fp16 scales: the numbers `quantize_int8_rows` stores (the 8-bit embedding/head)."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True, scale_precision=torch.float16)


def activation_fake_quantizer() -> nn.Module:
    """torchao's int8 dynamic per-token asymmetric fake quantizer: what QAT trains against and the engine's
    kernels compute (infer/kernels/q8q4.c)."""
    from torchao.quantization.qat import IntxFakeQuantizer

    return IntxFakeQuantizer(_fake_quant_configs()[1])


class FakeQuantizedWeight(nn.Module):
    """Parametrization that fake-quantizes a weight of any rank with torchao's IntxFakeQuantizer (default: int4
    g32; `int8_rows`: int8 per row, the 8-bit embedding/head).

    torchao's `quantize_` handles nn.Linear only and its quantizer takes 2-D input, so stacked expert
    weights [E, out, in] and the (tied) embedding go through this wrapper: view as [-1, in], fake-quantize
    per group of 32 inputs (or per row), view back. Gradients pass straight through (torchao's STE).
    """

    def __init__(self, int8_rows: bool = False) -> None:
        super().__init__()
        from torchao.quantization.qat import IntxFakeQuantizer

        self.fake_quantizer = IntxFakeQuantizer(_int8_rows_config() if int8_rows else _fake_quant_configs()[0])

    def forward(self, weight: Tensor) -> Tensor:
        return self.fake_quantizer(weight.reshape(-1, weight.shape[-1])).reshape(weight.shape)


def prepare_qat(model: nn.Module, scheme: Int4Scheme = PAPER_SCHEME) -> nn.Module:
    """Fake-quantize everything the INT4 format quantizes (see module docstring) as `scheme` says, in place.

    Linears (attention, dense and shared FFNs): torchao QAT with int4 g32 weights and int8 dynamic
    per-token activations (8da4w, the phone runtime's scheme). Stacked routed experts and the tied
    embedding (used for lookup and for the logits): int4 g32 weights via `FakeQuantizedWeight`, and
    their inputs fake-quantized like the linears' (the experts' dispatch quantizes x and the SwiGLU
    hidden per token; a hook on the final norm quantizes what the tied head multiplies), so QAT trains
    against exactly what the engine's 8da4w kernels compute. With `scheme.embedding_bits` 8 the embedding
    and head are fake-quantized as int8 rows and the head's input stays float: the engine's 8-bit head is a
    weight-only int8 product (`infer.engine.Int8Head`). The router stays in full precision.
    """
    from functools import partial

    from torch.nn.utils import parametrize
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    scheme.check_trainable()
    int8_head = scheme.embedding_bits == 8
    weight, activation = _fake_quant_configs()
    quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
              filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and not fqn.endswith("router")
              and not (int8_head and f"{fqn}.weight" in HEAD_WEIGHTS))
    for name, param in list(model.named_parameters()):
        owner_name, attr = name.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        int8_rows = int8_head and name in HEAD_WEIGHTS  # an untied lm_head was left out of quantize_ above
        stacked_or_table = name.endswith(("gate_up_proj", "down_proj", "embed.weight")) and not isinstance(
            owner, nn.Linear)
        if (int8_rows or stacked_or_table) and is_quantized_weight(name, param) and not parametrize.is_parametrized(
                owner, attr):
            parametrize.register_parametrization(owner, attr, FakeQuantizedWeight(int8_rows))
    from mobilemoe.model import MoE, Transformer
    from mobilemoe.moe import run_experts

    for module in model.modules():
        if isinstance(module, MoE):
            module.dispatch = partial(run_experts, quantize_activation=activation_fake_quantizer())
        if isinstance(module, Transformer) and module.lm_head is None and not int8_head:
            head_input = activation_fake_quantizer()
            module.norm.register_forward_hook(lambda _module, _args, out, fq=head_input: fq(out))
    return model
