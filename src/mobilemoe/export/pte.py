"""ExecuTorch export: torch.export -> XNNPACK -> .pte, 8-bit dynamic activations / 4-bit g32 weights.

The exported program is one decode step with a static KV cache: forward(tokens [1, 1], input_pos [1])
-> logits [1, 1, V]; the prompt is fed one token at a time (same program). Quantization (torchao):
attention and shared-expert linears and the output head `Int8DynamicActivationIntxWeightConfig(int4,
PerGroup(32))` (XNNPACK runs them; dense FFN linears too), the embedding `IntxWeightOnlyConfig(int4,
PerGroup(32))`. The router and selection bias stay fp32 (as in our INT4 format). XNNPACK keeps the linears'
group scales in bf16, so `quantized_decoder` rounds them to bf16 as well: the eager module is the .pte's exact
reference (SmolLM2-135M, first decode step: logits rel. error 3.7e-2 -> 1.6e-5).

The program follows the checkpoint's `quantize.Int4Scheme`: with an 8-bit embedding/head the embedding is
`IntxWeightOnlyConfig(int8, PerAxis(0))` (ExecuTorch's `quantized_decomposed::embedding_byte`) and the head
`Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0))`, 8da8w on XNNPACK (per-row scales kept in fp32). Our
engine runs that head weight-only (float input); a weight-only int8 linear lowered by ExecuTorch 1.5.1's XNNPACK
partitioner gave logits off by ~2500x relative in its runtime (tiny model, measured), so the head's input is
rounded to int8 per token here, as every other linear's is. Every quantized weight takes the checkpoint's own
integers and scales (`Int4Values`), not a re-quantization of their dequantized values.

Routed experts (MoE layers) run in ExecuTorch's fused MoE op `llama::quantized_moe_ffn` (registered by
`executorch.extension.llm.custom_ops.custom_ops`): router GEMM, sigmoid (+ selection bias) or softmax top-k,
weight renormalisation and route scale, and the INT4 g32 SwiGLU experts of the selected experts, in one call.
Its weights are our INT4 values (the QAT checkpoint's exactly) in torchao's packed layout (`et_moe_pack`);
the shared expert is an ordinary 8da4w FFN beside it (XNNPACK). The op always renormalises the top-k weights,
so a router with `norm_topk_prob: false` keeps the previous path, `GatheredInt4Experts`: per token
`index_select` of the top-k experts' packed INT4 weights, unpack, scale, `einsum` (portable kernels, fp32
activations). Which kernel computes the experts: built with torchao's kernels
(`EXECUTORCH_QUANTIZED_MOE_USE_TORCHAO`, an aarch64 build) the op runs torchao's int8-activation x int4 GEMMs;
the pip x86-64 build of ExecuTorch 1.5.1 has the other branch (its library carries that branch's error strings):
it dequantizes each selected expert to fp32 on every call and runs an fp32 GEMM, serially over experts. That
is also what `FusedInt4Experts` computes in eager (same library), with fp32 activations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobilemoe.checkpoint import LoadedModel
from mobilemoe.errors import MobileMoEError
from mobilemoe.export import as_loaded
from mobilemoe.export.et_moe_pack import pack_experts
from mobilemoe.io import atomic_file
from mobilemoe.model import MoE, Transformer
from mobilemoe.quantize import GROUP_SIZE, HEAD_WEIGHTS, Int4Scheme, quantize_int4, quantize_weight, unpack_int4

WeightValues = Callable[[str], tuple[Tensor, Tensor]]  # weight name -> (qweight, scales) in our INT4 format


class Int4Values:
    """(qweight, scales) of each weight of a model in our INT4 format under `scheme`: the ones an INT4 checkpoint
    stores, else those `quantize_weight` gives its float weights. Why not re-quantize an INT4 checkpoint's
    dequantized weights: a symmetric scale is max|w| / 7.5 (int8 rows: / 127.5), so a group holding -8 gets a
    coarser grid the second time and the integers QAT trained against are lost."""

    def __init__(self, loaded: LoadedModel, scheme: Int4Scheme):
        self.model, self.scheme, self.stored = loaded.model, scheme, {}
        if loaded.int4 and (Path(loaded.path) / "model.safetensors").is_file():
            from mobilemoe.checkpoint import read_tensors
            from mobilemoe.infer.engine import int4_format

            self.stored = int4_format(loaded.model.cfg, read_tensors(Path(loaded.path) / "model.safetensors")[0])

    def __call__(self, name: str) -> tuple[Tensor, Tensor]:
        stored = self.stored.get(f"{name}.qweight")
        int8_rows = self.scheme.embedding_bits == 8 and name in HEAD_WEIGHTS
        if stored is not None and (stored.dtype == torch.int8) == int8_rows:  # else another embedding width asked
            return stored, self.stored[f"{name}.scales"]
        return quantize_weight(name, self.model.get_parameter(name), self.scheme)


class GatheredInt4Experts(nn.Module):
    """The model's own `Router` + only the selected experts, from INT4 stacked weights, in ops ExecuTorch runs."""

    def __init__(self, moe: MoE, values: WeightValues | None = None):
        super().__init__()
        self.top_k, self.expert_size = moe.cfg.top_k, moe.cfg.expert_size
        self.router = copy.deepcopy(moe.router).float()
        for name in ("gate_up_proj", "down_proj"):
            packed, scales = _expert_values(moe, name, values)
            self.register_buffer(f"{name}_packed", packed)
            self.register_buffer(f"{name}_scales", scales.float())
        self.shared_expert = copy.deepcopy(moe.shared_expert)

    @staticmethod
    def _gather(packed: Tensor, scales: Tensor, experts: Tensor) -> Tensor:
        """Dequantized weights of `experts` only: [n, out, in] float."""
        p = packed.index_select(0, experts).to(torch.int32)
        s = scales.index_select(0, experts)
        # Unpack two nibbles per byte with plain arithmetic (shifts are not in the core ATen opset).
        high = torch.div(p, 16, rounding_mode="floor")
        low = p - high * 16
        low, high = low - 8, high - 8
        q = torch.stack((low, high), dim=-1).reshape(p.shape[0], p.shape[1], s.shape[-1], GROUP_SIZE)
        return (q.float() * s.unsqueeze(-1)).reshape(p.shape[0], p.shape[1], -1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens = x.shape[0]
        routing = self.router(x)
        experts, weights = routing.experts, routing.weights

        flat = experts.reshape(-1)
        xk = x.unsqueeze(1).expand(n_tokens, self.top_k, shape[-1]).reshape(-1, shape[-1])
        hidden = torch.einsum("nd,nod->no", xk, self._gather(self.gate_up_proj_packed, self.gate_up_proj_scales, flat))
        act = F.silu(hidden[:, : self.expert_size]) * hidden[:, self.expert_size:]
        out = torch.einsum("ni,ndi->nd", act, self._gather(self.down_proj_packed, self.down_proj_scales, flat))
        y = (out.reshape(n_tokens, self.top_k, -1) * weights.unsqueeze(-1)).sum(1).to(x.dtype)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y.reshape(shape)


def _expert_values(moe: MoE, name: str, values: WeightValues | None) -> tuple[Tensor, Tensor]:
    """The INT4 stacked expert weights `name` of `moe`: from `values` (keyed by the attribute name), else rounded
    from its float weights."""
    return quantize_int4(getattr(moe, name).detach()) if values is None else values(name)


def fused_moe_unsupported(moe: MoE) -> str | None:
    """Why `llama::quantized_moe_ffn` cannot compute this MoE layer's routed experts, or None if it can."""
    if not moe.cfg.norm_topk_prob:
        return "the op always renormalises the top-k routing weights (this router has norm_topk_prob: false)"
    return None


class FusedInt4Experts(nn.Module):
    """Routing + routed INT4 experts as one `llama::quantized_moe_ffn` call; the shared expert beside it."""

    def __init__(self, moe: MoE, values: WeightValues | None = None):
        super().__init__()
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers llama::quantized_moe_ffn

        cfg = moe.cfg
        self.n_experts, self.top_k, self.expert_size, self.score_func = (cfg.n_routed_experts, cfg.top_k,
                                                                         cfg.expert_size, cfg.router)
        self.register_buffer("gate_weight", moe.router.weight.detach().float().clone())
        # The op shifts only sigmoid selection by the bias (our softmax router ignores it) and refuses it with
        # softmax; an empty tensor means "no bias".
        sigmoid = cfg.router == "sigmoid"
        self.register_buffer("expert_bias", moe.router.expert_bias.detach().float().clone() if sigmoid
                             else torch.empty(0))
        for name, blob in (("gate_up_proj", "packed_w13"), ("down_proj", "packed_w2")):  # gate rows, then up rows
            packed, scales = _expert_values(moe, name, values)
            self.register_buffer(blob, pack_experts(packed, scales))
        # The op's softmax path (softmax over the top-k logits = our renormalised top-k probabilities) takes no
        # route scale, so ours multiplies the output.
        self.route_scale = cfg.routed_scaling_factor if sigmoid else 1.0
        self.output_scale = 1.0 if sigmoid else cfg.routed_scaling_factor
        self.shared_expert = copy.deepcopy(moe.shared_expert)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        y = torch.ops.llama.quantized_moe_ffn(x, self.gate_weight, self.expert_bias, self.packed_w13, self.packed_w2,
                                              self.top_k, self.n_experts, self.expert_size, shape[-1], GROUP_SIZE,
                                              4, self.score_func, self.route_scale)
        if self.output_scale != 1.0:
            y = y * self.output_scale
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y.reshape(shape)


class DecodeStep(nn.Module):
    """forward(tokens [1, T], input_pos [T]) -> logits [1, T, V] over a static KV cache."""

    def __init__(self, model: Transformer, max_seq_len: int, fused_moe: bool = True,
                 values: WeightValues | None = None):
        super().__init__()
        self.model = copy.deepcopy(model).float().eval()
        for i, block in enumerate(self.model.layers):
            if isinstance(block.ffn, MoE):
                use_op = fused_moe and fused_moe_unsupported(block.ffn) is None
                experts = None if values is None else (lambda name, i=i: values(f"layers.{i}.ffn.{name}"))
                block.ffn = (FusedInt4Experts if use_op else GatheredInt4Experts)(block.ffn, experts)
        self.model.setup_cache(1, max_seq_len)
        # A separate output head so it can be quantized as a linear (8da4w) and the embedding as a lookup.
        self.model.lm_head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
        self.model.lm_head.weight = nn.Parameter(model.embed.weight.detach().float().clone())

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return self.model(tokens, input_pos=input_pos).logits


def quantized_decoder(source: str | Path | LoadedModel, max_seq_len: int = 256, fused_moe: bool = True,
                      embedding_bits: int | None = None) -> DecodeStep:
    """The eager module the .pte is exported from: our model, 8da4w linears, INT4 embedding and experts — or,
    where the checkpoint's scheme (or `embedding_bits`) keeps the embedding/head at 8 bits, an int8 embedding and
    an 8da8w head (module docstring). Every quantized weight holds the checkpoint's integers (`Int4Values`).

    `fused_moe=False` keeps every MoE layer on the gather + einsum path (the previous .pte, for comparisons).
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    loaded = as_loaded(source)
    cfg = loaded.model.cfg
    if not cfg.tie_embeddings:
        raise MobileMoEError("ExecuTorch export supports tied embeddings only (every MobileMoE model has them)")
    if cfg.d_model % GROUP_SIZE or (cfg.is_moe and cfg.expert_size % GROUP_SIZE):
        raise MobileMoEError(f"4-bit group-{GROUP_SIZE} weights need d_model and expert_size divisible by "
                             f"{GROUP_SIZE}")
    scheme = loaded.scheme.with_overrides(embedding_bits)
    values = Int4Values(loaded, scheme)
    step = DecodeStep(loaded.model, max_seq_len, fused_moe, values).eval()
    bits = torch.int8 if scheme.embedding_bits == 8 else torch.int4
    table = PerAxis(0) if bits == torch.int8 else PerGroup(GROUP_SIZE)
    quantize_(step, IntxWeightOnlyConfig(weight_dtype=bits, granularity=table),
              filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    if bits == torch.int8:
        quantize_(step, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                  filter_fn=lambda m, fqn: fqn == "model.lm_head")
    quantize_(step, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                          weight_granularity=PerGroup(GROUP_SIZE)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not (bits == torch.int8 and fqn == "model.lm_head"))
    with torch.no_grad():
        for fqn, module in step.model.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):  # all quantized above (routers are no nn.Linear)
                qweight, scales = values("embed.weight" if fqn in ("embed", "lm_head") else f"{fqn}.weight")
                module.weight.qdata.copy_(unpack_int4(qweight) if qweight.dtype == torch.uint8 else qweight)
                module.weight.scale.copy_(scales.reshape(module.weight.scale.shape))
                # The XNNPACK delegate stores per-group weight scales as bf16 (executorch 1.5.1, backends/xnnpack/
                # operators/node_visitor.py `get_quant_params`; per-row scales stay fp32); rounding them here too
                # makes this module compute what the .pte computes. Without it a 30-layer model (SmolLM2-135M)
                # drifts by ~10% of the logits and greedy tokens differ.
                if isinstance(module, nn.Linear) and qweight.dtype == torch.uint8:
                    module.weight.scale.copy_(module.weight.scale.to(torch.bfloat16).float())
    return step


def float_decoder(source: str | Path | LoadedModel, max_seq_len: int = 256, fused_moe: bool = True) -> DecodeStep:
    """The eager module an `f32` .pte is exported from: our model in float32 (routed experts keep their INT4 path)."""
    return DecodeStep(as_loaded(source).model, max_seq_len, fused_moe).eval()


def export_pte(source: str | Path | LoadedModel, path: str | Path, max_seq_len: int = 256,
               fused_moe: bool = True, quantize: bool = True, embedding_bits: int | None = None) -> Path:
    """Write an ExecuTorch program (XNNPACK-delegated, fused MoE op) of a checkpoint: 8da4w (see module
    docstring; the embedding/head at the checkpoint's bits, or `embedding_bits`), or with `quantize=False`
    float32 linears and embedding.

    Why both: an 8da4w program reproduces its eager source only up to float summation order (~1e-7), and
    per-token int8 activation rounding turns that into an avalanche on deep models — a rounding that flips in
    one layer re-rolls the quantization noise of every later one. Measured on SmolLM2-135M (30 layers): 1e-7
    relative noise injected into the eager 8da4w model's attention output moves the logits at positions > 0 by
    6-11%, the size of the .pte-vs-eager gap; the float32 model moves by 1e-6. The float32 program is the exact
    check of the runtime's KV cache, attention, RoPE and mask (docs/training.md has the numbers)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    step = (quantized_decoder(source, max_seq_len, fused_moe, embedding_bits) if quantize
            else float_decoder(source, max_seq_len, fused_moe))
    example = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        program = torch.export.export(step, example, strict=False)
    # The edge IR verifier rejects llama::quantized_moe_ffn (not a core ATen op); to_executorch still maps it to
    # its registered out variant, which the runtime runs.
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                          compile_config=EdgeCompileConfig(_check_ir_validity=False))
    et_program = lowered.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
    with atomic_file(path) as tmp:
        tmp.write_bytes(et_program.buffer)
    return Path(path)


def pte_kernels(path: str | Path) -> tuple[list[str], list[str]]:
    """What a .pte runs: its non-delegated operators ("llama::quantized_moe_ffn", ...) and its delegate blobs."""
    from executorch.exir._serialize._program import deserialize_pte_binary  # ExecuTorch's own .pte reader

    program = deserialize_pte_binary(Path(path).read_bytes())
    plan = getattr(program, "program", program).execution_plan[0]
    return [op.name for op in plan.operators], [d.id for d in plan.delegates]


class PteRunner:
    """Greedy decoding with a .pte in the ExecuTorch Python runtime (one token per call)."""

    def __init__(self, path: str | Path):
        import executorch.kernels.quantized  # noqa: F401  registers the quantized embedding kernels
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  and llama::quantized_moe_ffn
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(Path(path)).load_method("forward")

    def step(self, token: int, pos: int) -> Tensor:
        out = self.method.execute([torch.tensor([[token]]), torch.tensor([pos])])
        return out[0][0, -1]

    def greedy(self, prompt: list[int], n_new: int) -> list[int]:
        logits = None
        for pos, token in enumerate(prompt):
            logits = self.step(token, pos)
        new = []
        for i in range(n_new):
            new.append(int(logits.argmax()))
            logits = self.step(new[-1], len(prompt) + i)
        return new


class EagerSteps:
    """A .pte's eager source (`quantized_decoder` / `float_decoder`) behind PteRunner's interface, the reference
    its runtime tokens are checked against."""

    def __init__(self, module: DecodeStep):
        self.module = module

    def step(self, token: int, pos: int) -> Tensor:
        with torch.no_grad():
            return self.module(torch.tensor([[token]]), torch.tensor([pos]))[0, -1]

    greedy = PteRunner.greedy
