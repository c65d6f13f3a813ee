"""The CPU inference engine: the same `Transformer`, with INT4 modules swapped in, and a static KV cache.

Every product with an INT4 weight is 8da4w, the numbers QAT trained against: the input quantized to int8
per token (asymmetric, torchao's scheme) and multiplied by the INT4 g32 weights in integer arithmetic, on
our own C kernels and weight layout (`infer/q4.py`, `infer/kernels/q8q4.c`; AVX-512 VNNI, AVX-VNNI, AVX2,
NEON sdot or portable C, chosen from the CPU). Activations between the products, norms, RoPE and routing
are fp32; the KV cache is fp16 by default (as llama.cpp's: half the bytes that long-context decode reads,
converted to fp32 on read), int8 or fp32 on request (`setup_cache(..., torch.int8)`; `Int8KVCache`: a quarter
of fp32's bytes plus one scale per row). Prefill writes the same keys and values as decode would (int8:
bitwise the same quantization) and attends to them as stored, so a prompt's logits are what decoding it
token by token would give (int8: but for the query, which decode rounds to int8 for an integer q . k and
prefill keeps in float).

A one-token decode step is one C call (`decode_step` in kernels/q8q4.c): embedding, every layer (norms,
q/k/v, QK-norm, RoPE, the KV cache write, attention over the filled cache only, o, the router's top-k with
its selection bias, shared and routed experts, residuals) and the head, in one OpenMP parallel region whose
threads split weight rows and meet only where a phase needs the last one's output. Prefill (many tokens)
runs the torch modules with the same kernels per product: q/k/v one product, o one, a layer's whole FFN one
call. That torch path still compiles to one graph (the kernels are opaque custom ops), but the C step makes
torch.compile unnecessary for the engine: `compile_decode` hands an engine model back unchanged.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobilemoe.config import ModelConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.infer.kernels import q8q4_library
from mobilemoe.infer.q4 import (
    KV_TYPE_CODES,
    Q4Weight,
    attention_decode,
    pack_q4,
    q4_ffn,
    q4_linear,
    q4_moe,
    unpack_q4,
    unpack_q4_rows,
    w8_linear,
)
from mobilemoe.model import Attention, FeedForward, KVCache, ModelOutput, MoE, Transformer, rope_frequencies
from mobilemoe.moe import Router
from mobilemoe.quantize import GROUP_SIZE

COMPUTE_DTYPE = torch.float32  # activations between the 8da4w products
KV_CACHE_DTYPE = torch.float16  # the engine's default KV cache
# the engine's KV caches by name (`--kv-cache`); every one runs in the C decode step
KV_CACHE_DTYPES = {"fp16": torch.float16, "int8": torch.int8, "fp32": torch.float32}


def quantize_kv(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of keys or values [..., hd] as the int8 KV cache stores them: symmetric per row, scale = max |x| / 127
    (at least the smallest normal float, so a zero row stays zero), q = round(x / scale) half to even. Bitwise
    what the C decode step writes (`kv_quantize` in kernels/q8q4.c). Returns (q int8 [..., hd], scale fp32 [...])."""
    x = x.float()
    scale = (x.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale


class Int8KVCache(KVCache):
    """A KV cache of int8 keys and values with one fp32 scale per (position, kv head) row (`quantize_kv`), as
    llama.cpp's q8_0 cache but one scale per head_dim values instead of per 32 (a little less accurate per row;
    end to end both are inside the 8da4w noise, docs/inference.md). Long-context decode reads 53% of an
    fp16 cache's bytes at head_dim 64."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int):
        super().__init__(batch, n_kv_heads, max_len, head_dim, torch.int8)
        self.register_buffer("k_scale", torch.zeros(batch, n_kv_heads, max_len), persistent=False)
        self.register_buffer("v_scale", torch.zeros(batch, n_kv_heads, max_len), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[:, :, input_pos], self.k_scale[:, :, input_pos] = quantize_kv(k)
        self.v[:, :, input_pos], self.v_scale[:, :, input_pos] = quantize_kv(v)
        return self.k, self.v

    def keep_rows(self, rows: Tensor) -> None:
        super().keep_rows(rows)
        self.k_scale, self.v_scale = self.k_scale[rows], self.v_scale[rows]

    def filled(self, end: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions 0 .. end-1, dequantized to fp32."""
        return (self.k[:, :, :end].float() * self.k_scale[:, :, :end, None],
                self.v[:, :, :end].float() * self.v_scale[:, :, :end, None])


class Int4Linear(nn.Module):
    """8da4w linear (fused products, e.g. q/k/v, are one weight whose outputs are concatenated)."""

    def __init__(self, weight: Q4Weight):
        super().__init__()
        self.weight = weight
        self.out_features = self.weight.out_features

    def forward(self, x: Tensor) -> Tensor:
        return q4_linear(x, self.weight)


class Int4Embedding(nn.Module):
    """Row lookup from an INT4 table in the kernels' layout (only the looked-up rows are dequantized); the
    tied output head shares the same weight."""

    def __init__(self, weight: Q4Weight):
        super().__init__()
        self.weight = weight

    def forward(self, tokens: Tensor) -> Tensor:
        return unpack_q4_rows(self.weight, tokens)


class Int8Head(nn.Module):
    """The tied embedding/head kept at 8 bits (`quantize.Int4Scheme(embedding_bits=8)`: int8 per row): the
    logits are weight-only int8 products on our kernel (`q4.w8_linear`: fp32 inputs, as QAT trains the head),
    the lookup dequantizes only the looked-up rows."""

    def __init__(self, qweight: Tensor, scales: Tensor):
        super().__init__()
        self.qweight, self.scales = qweight.contiguous(), scales.float().flatten().contiguous()
        self.out_features = qweight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return w8_linear(x, self.qweight, self.scales)

    def rows(self, tokens: Tensor) -> Tensor:
        return self.qweight[tokens].float() * self.scales[tokens, None]


class Int8Embedding(nn.Module):
    def __init__(self, head: Int8Head):
        super().__init__()
        self.head = head

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head.rows(tokens)


class Int4Attention(Attention):
    """`Attention` with q, k and v as one 8da4w product; decode attention reads only the filled cache."""

    def __init__(self, cfg: ModelConfig, qkv_proj: Int4Linear, o_proj: Int4Linear):
        with torch.device("meta"):
            super().__init__(cfg)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.qkv_sizes = [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        cache = self.kv_cache
        if cache is None or input_pos is None:
            return super().attend(q, k, v, mask, input_pos)
        k_all, v_all = cache.update(input_pos, k, v)
        if q.shape[0] == 1 and q.shape[2] == 1 and k_all.dtype in KV_TYPE_CODES:
            scales = (cache.k_scale, cache.v_scale) if isinstance(cache, Int8KVCache) else ()
            return attention_decode(q, k_all, v_all, input_pos[-1] + 1, *scales)
        end = int(input_pos[-1]) + 1  # prefill (eager): attend to the filled part only
        k_all, v_all = (t.to(q.dtype) for t in cache.filled(end))
        if end == q.shape[2] and int(input_pos[0]) == 0:
            # a prompt from position 0: its mask is the causal one, and is_causal lets torch's flash kernel skip
            # the blocks above the diagonal (given as a mask, every block is computed and then masked)
            return F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=None if mask is None else mask[..., :end],
                                              enable_gqa=True)


class Int4FeedForward(nn.Module):
    """SwiGLU in one call: gate and up one product, SwiGLU, the hidden quantized, down."""

    def __init__(self, gate_up: Q4Weight, down: Q4Weight):
        super().__init__()
        self.gate_up, self.down = gate_up, down

    def forward(self, x: Tensor) -> Tensor:
        return q4_ffn(x, self.gate_up, self.down)


class Int4MoE(nn.Module):
    """INT4 MoE layer: route (fp32), then routed experts and shared expert in one call."""

    def __init__(self, cfg: ModelConfig, router: Router, gate_up: Q4Weight, down: Q4Weight,
                 shared: Int4FeedForward | None):
        super().__init__()
        self.cfg = cfg
        self.router = router.float()
        self.gate_up, self.down = gate_up, down
        self.shared_expert = shared

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        r = self.router(x)
        shared = (self.shared_expert.gate_up, self.shared_expert.down) if self.shared_expert is not None else None
        y = q4_moe(x, r.experts, r.weights, self.gate_up, self.down, shared)
        return y.view(shape), torch.zeros(()), r.load


# --- the decode step in C: the structs of kernels/q8q4.c ---------------------------------------------------
class _Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("corr", ctypes.c_void_p), ("N", ctypes.c_int),
                ("K", ctypes.c_int)]


class _DecodeLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("qkv", _Mat), ("o", _Mat),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("k_scale", ctypes.c_void_p),
                ("v_scale", ctypes.c_void_p), ("gate_up", _Mat), ("down", _Mat),
                ("router", ctypes.c_void_p), ("expert_bias", ctypes.c_void_p), ("expert_gate_up", _Mat),
                ("expert_down", _Mat)]


class _DecodeModel(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("n_layers", "D", "H", "KVH", "hd", "max_len", "E", "top_k",
                                                  "qk_norm", "sigmoid", "norm_topk", "kv_type")]
    _fields_ += [("eps", ctypes.c_float), ("route_scale", ctypes.c_float), ("inv_freq", ctypes.c_void_p),
                 ("embed", _Mat), ("head", _Mat), ("final_norm", ctypes.c_void_p),
                 ("layers", ctypes.POINTER(_DecodeLayer))]


def _mat(w: Q4Weight | None) -> _Mat:
    if w is None:
        return _Mat()
    return _Mat(w.blocks.data_ptr(), w.scales.data_ptr(), w.corr.data_ptr(), w.padded_out, w.in_features)


class Int4Transformer(Transformer):
    """The engine's model: `Transformer` with INT4 modules, whose eager one-token decode step (batch 1, any of
    `KV_CACHE_DTYPES`) is the C `decode_step`; everything else (prefill, training-style forwards, a traced
    step) runs the torch modules. `c_decode = False` keeps decode on the torch modules too (for comparisons)."""

    c_decode = True
    kv_cache_dtype = KV_CACHE_DTYPE
    _program: tuple | None = None  # (layer 0's cached keys it points into, the C struct, the layer array)

    def forward(self, tokens: Tensor, targets: Tensor | None = None, input_pos: Tensor | None = None,
                logits_at: Tensor | None = None) -> ModelOutput:
        if (self.c_decode and targets is None and input_pos is not None and tokens.shape == (1, 1)
                and not torch.compiler.is_compiling()):
            program = self._decode_program()
            pos = int(input_pos[0])
            if program is not None and 0 <= pos < program.max_len:
                return ModelOutput(self._decode(program, int(tokens[0, 0]), pos))
        return super().forward(tokens, targets, input_pos, logits_at=logits_at)

    def new_kv_cache(self, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        if dtype == torch.int8:
            return Int8KVCache(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim)
        return super().new_kv_cache(batch, max_len, dtype)

    def _decode(self, program: _DecodeModel, token: int, pos: int) -> Tensor:
        hidden = torch.empty(self.cfg.d_model)
        if program.embed.N == 0:  # an embedding the C step does not read: looked up here
            hidden.copy_(self.embed(torch.tensor([token])).view(-1))
        logits = torch.empty(program.head.N) if program.head.N else None
        q8q4_library().decode_step(ctypes.byref(program), token, pos, hidden.data_ptr(),
                                   None if logits is None else logits.data_ptr())
        if logits is None:
            return self.lm_head(hidden.view(1, 1, -1)).float()
        return logits[:self.cfg.vocab_size].view(1, 1, -1)

    def _decode_program(self) -> _DecodeModel | None:
        """The C struct of pointers to this model's weights and KV cache; rebuilt when the cache's tensors are new
        (`setup_cache`, `keep_rows`). None where the C step does not apply (no cache, or one of another dtype or
        batch; shapes it does not take)."""
        cache = self.layers[0].attn.kv_cache
        # keyed by the keys tensor, not the cache: `setup_cache` makes new caches, `keep_rows` new tensors
        if self._program is not None and cache is not None and self._program[0] is cache.k:
            return self._program[1]
        cfg = self.cfg
        if (cache is None or cache.k.dtype not in KV_TYPE_CODES or cache.k.shape[0] != 1 or cfg.d_model % 16
                or cfg.n_routed_experts > 1024 or cfg.head_dim > 256):
            return None
        layers = (_DecodeLayer * cfg.n_layers)()
        for block, layer in zip(self.layers, layers, strict=True):
            attn, ffn = block.attn, block.ffn
            layer.attn_norm, layer.ffn_norm = block.attn_norm.weight.data_ptr(), block.ffn_norm.weight.data_ptr()
            layer.qkv, layer.o = _mat(attn.qkv_proj.weight), _mat(attn.o_proj.weight)
            layer.k_cache, layer.v_cache = attn.kv_cache.k.data_ptr(), attn.kv_cache.v.data_ptr()
            if isinstance(attn.kv_cache, Int8KVCache):
                layer.k_scale, layer.v_scale = attn.kv_cache.k_scale.data_ptr(), attn.kv_cache.v_scale.data_ptr()
            dense = ffn.shared_expert if isinstance(ffn, Int4MoE) else ffn
            if dense is not None:
                layer.gate_up, layer.down = _mat(dense.gate_up), _mat(dense.down)
            if isinstance(ffn, Int4MoE):
                layer.router, layer.expert_bias = ffn.router.weight.data_ptr(), ffn.router.expert_bias.data_ptr()
                layer.expert_gate_up, layer.expert_down = _mat(ffn.gate_up), _mat(ffn.down)
        program = _DecodeModel(
            cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cache.k.shape[2],
            cfg.n_routed_experts if cfg.is_moe else 0, cfg.top_k if cfg.is_moe else 0, int(cfg.qk_norm),
            int(cfg.router == "sigmoid"), int(cfg.norm_topk_prob), KV_TYPE_CODES[cache.k.dtype],
            cfg.norm_eps, cfg.routed_scaling_factor,
            self.inv_freq.data_ptr(),
            _mat(self.embed.weight if isinstance(self.embed, Int4Embedding) else None),
            _mat(self.lm_head.weight if isinstance(self.lm_head, Int4Linear) else None),
            self.norm.weight.data_ptr(), layers)
        self._program = (cache.k, program, layers)
        return program


def compile_decode(model: Transformer) -> Callable[..., ModelOutput]:
    """The one-token decode step captured by torch.compile (static shapes: one graph, compiled at the
    first call, ~10-60 s on two cores). Prefill stays eager: its length changes from prompt to prompt.
    An engine model whose decode is the C step is returned as it is: there is nothing left to compile.

    Every (model shape, cache length) pair is its own graph of the one `Transformer.forward`; dynamo's
    default limit of 8 graphs per function would silently run the rest eagerly (e.g. a bench of 4 presets
    at 3 contexts), so the limit is raised."""
    if isinstance(model, Int4Transformer) and model.c_decode:
        return model
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model, dynamic=False)


# --- INT4 checkpoint tensors -> the engine's products -------------------------------------------------------
def int4_products(cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Every INT4 product of the engine (by its module path) -> the INT4 checkpoint weights it is made of,
    with their row counts, in row order: q/k/v become one product, gate/up one, the tied embedding is the head."""
    from mobilemoe.model import build_on_meta

    model = build_on_meta(cfg)
    params = dict(model.named_parameters())

    def rows(*names: str) -> list[tuple[str, int]]:
        return [(n, params[n].shape[-2]) for n in names]

    products = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            products[f"{name}.gate_up"] = rows(f"{name}.gate_up_proj")
            products[f"{name}.down"] = rows(f"{name}.down_proj")
        elif isinstance(module, FeedForward):
            products[f"{name}.gate_up"] = rows(f"{name}.gate_proj.weight", f"{name}.up_proj.weight")
            products[f"{name}.down"] = rows(f"{name}.down_proj.weight")
        elif isinstance(module, Attention):
            products[f"{name}.qkv_proj"] = rows(*(f"{name}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")))
            products[f"{name}.o_proj"] = rows(f"{name}.o_proj.weight")
    products["lm_head"] = rows("embed.weight" if cfg.tie_embeddings else "lm_head.weight")
    if not cfg.tie_embeddings:
        products["embed"] = rows("embed.weight")
    return products


LAYOUT_PARTS = ("q4_blocks", "q4_scales", "q4_corr")  # a stored product: `<product>.<part>`


def stored_layout(cfg: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """INT4 checkpoint tensors with every product the engine runs stored in the kernels' layout (fused as the
    engine fuses), so that loading maps them with no repack. Tensors of no product pass through unchanged."""
    out = dict(tensors)
    for product, sources in int4_products(cfg).items():
        names = [n for n, _ in sources]
        if not all(f"{n}.qweight" in out and out[f"{n}.qweight"].dtype == torch.uint8 for n in names):
            continue  # absent, or an 8-bit embedding/head (int8 rows: not a kernel product)
        w = pack_q4(torch.cat([out[f"{n}.qweight"] for n in names], -2),
                    torch.cat([out[f"{n}.scales"] for n in names], -2))
        for n in names:
            del out[f"{n}.qweight"], out[f"{n}.scales"]
        out |= {f"{product}.{part}": t for part, t in zip(LAYOUT_PARTS, (w.blocks, w.scales, w.corr), strict=True)}
    return out


def int4_format(cfg: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `stored_layout`: every stored product back as `<name>.qweight` / `<name>.scales`."""
    out = dict(tensors)
    for product, sources in int4_products(cfg).items():
        if f"{product}.q4_blocks" not in out:
            continue
        w = _stored_q4(out, product, sum(r for _, r in sources), pop=True)
        packed, scales = unpack_q4(w)
        for (n, _), p, sc in zip(sources, packed.split([r for _, r in sources], -2),
                                 scales.split([r for _, r in sources], -2), strict=True):
            out[f"{n}.qweight"], out[f"{n}.scales"] = p.contiguous(), sc.contiguous()
    return out


def _stored_q4(tensors: dict[str, Tensor], product: str, rows: int, pop: bool = False) -> Q4Weight:
    get = tensors.pop if pop else tensors.__getitem__
    return Q4Weight(*(get(f"{product}.{part}") for part in LAYOUT_PARTS), rows)


HUGE_PAGE = 2 << 20


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (Linux `MemAvailable`); None elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def in_huge_pages(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors copied into one anonymous mapping advised as transparent huge pages (Linux `madvise`; where
    there is none, a plain copy). Decode streams every weight once per token: in 4 KB pages the TLB misses at
    every page and the CPU's prefetchers stop at every page boundary; in 2 MB pages decode ran 0-12% faster
    here (BENCHMARKS.md, "Huge pages"). The price is a copy at load instead of a mapping of the file."""
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors.values()]  # 64-byte aligned each
    available = available_memory()
    if available is not None and sum(sizes) > available:
        from mobilemoe.ui import human_bytes

        raise MobileMoEError(f"weights in huge pages need {human_bytes(sum(sizes))} of memory and "
                             f"{human_bytes(available)} is available: load without huge pages (drop --huge-pages; "
                             "the weights are then mapped from the file and paged in as they are read)")
    arena = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        arena.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(arena, dtype=torch.uint8)  # keeps `arena` alive as long as a tensor uses it
    offset = (-memory.data_ptr()) % HUGE_PAGE  # a huge page needs a 2 MB-aligned start
    out = {}
    for (name, t), size in zip(tensors.items(), sizes, strict=True):
        n_bytes = t.numel() * t.element_size()
        out[name] = memory[offset:offset + n_bytes].view(t.dtype).view(t.shape).copy_(t)
        offset += size
    return out


def build_int4_model(cfg: ModelConfig, tensors: dict[str, Tensor], huge_pages: bool = False) -> Int4Transformer:
    """A `Transformer` whose weights are INT4 modules, from INT4 checkpoint tensors: products in the stored
    layout (`stored_layout`) are used as they are (mapped, not copied); `name.qweight` / `name.scales` pairs
    are packed. Built on the meta device first, so no float copy of the weights is ever allocated.
    `huge_pages`: the weights are copied into transparent huge pages first (`in_huge_pages`)."""
    if huge_pages:
        tensors = in_huge_pages(stored_layout(cfg, tensors))

    def q4(product: str) -> Q4Weight:
        sources = products[product]
        if f"{product}.q4_blocks" in tensors:
            return _stored_q4(tensors, product, sum(r for _, r in sources))
        try:
            pairs = [(tensors[f"{n}.qweight"], tensors[f"{n}.scales"]) for n, _ in sources]
        except KeyError as err:
            name = str(err.args[0]).rsplit(".", 1)[0]
            raise MobileMoEError(f"INT4 weights for '{name}' are missing: the checkpoint is not an INT4 checkpoint "
                                 "of this config (quantize it with `--int4` from a float checkpoint, or pass "
                                 "the QAT stage's final/ directory)") from None
        return pack_q4(torch.cat([p for p, _ in pairs], -2), torch.cat([s for _, s in pairs], -2))

    def head(name: str, product: str) -> Int4Linear | Int8Head:
        """The output head (or untied embedding table): INT4, or int8 rows where the checkpoint keeps it at 8 bits."""
        if tensors.get(f"{name}.qweight", torch.empty(0)).dtype == torch.int8:
            return Int8Head(tensors[f"{name}.qweight"], tensors[f"{name}.scales"])
        return Int4Linear(q4(product))

    products = int4_products(cfg)
    with torch.device("meta"):
        model = Int4Transformer(cfg)
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, MoE):
            shared = (Int4FeedForward(q4(f"{name}.shared_expert.gate_up"), q4(f"{name}.shared_expert.down"))
                      if module.shared_expert is not None else None)
            router = module.router.to_empty(device="cpu")  # filled from the checkpoint, never initialised
            router.load_state_dict({key: tensors[f"{name}.router.{key}"] for key in router.state_dict()})
            setattr(parent, attr, Int4MoE(cfg, router, q4(f"{name}.gate_up"), q4(f"{name}.down"), shared))
        elif isinstance(module, FeedForward) and ".shared_expert" not in name:
            setattr(parent, attr, Int4FeedForward(q4(f"{name}.gate_up"), q4(f"{name}.down")))
        elif isinstance(module, Attention):
            qkv, o = Int4Linear(q4(f"{name}.qkv_proj")), Int4Linear(q4(f"{name}.o_proj"))
            setattr(parent, attr, Int4Attention(cfg, qkv, o))
        elif isinstance(module, nn.RMSNorm):
            norm = nn.RMSNorm(module.normalized_shape, eps=module.eps, device="cpu", dtype=COMPUTE_DTYPE)
            norm.weight.data.copy_(tensors[f"{name}.weight"])
            setattr(parent, attr, norm)
    model.lm_head = head(products["lm_head"][0][0], "lm_head")
    table = model.lm_head if cfg.tie_embeddings else head("embed.weight", "embed")
    model.embed = Int8Embedding(table) if isinstance(table, Int8Head) else Int4Embedding(table.weight)
    model.inv_freq = rope_frequencies(cfg)
    return model.eval()


def random_int4_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """INT4 checkpoint tensors with random values for a preset, made directly in the INT4 format (a
    billion-parameter model never exists in float), for speed and memory benchmarks."""
    from mobilemoe.model import build_on_meta
    from mobilemoe.quantize import is_quantized_weight

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    model = build_on_meta(cfg)
    params = dict(model.named_parameters())
    for name, t in model.state_dict().items():
        if name in params and is_quantized_weight(name, params[name]):
            *lead, k = t.shape
            tensors[f"{name}.qweight"] = torch.randint(0, 256, (*lead, k // 2), dtype=torch.uint8, generator=g)
            tensors[f"{name}.scales"] = torch.full((*lead, k // GROUP_SIZE), 0.02 / 4, dtype=torch.float16)
        elif name.endswith("expert_bias"):
            tensors[name] = torch.zeros(t.shape)
        elif t.dim() >= 2:
            tensors[name] = torch.randn(t.shape, generator=g) * 0.02
        else:
            tensors[name] = torch.ones(t.shape)
    return tensors


def load_int4_model(source: str | Path, huge_pages: bool = False) -> tuple[Transformer, object | None]:
    """An INT4 engine model from an INT4 checkpoint directory (tokenizer too, if present): its weights mapped
    from the file, or with `huge_pages` copied into transparent huge pages (see `in_huge_pages`)."""
    from mobilemoe.checkpoint import read_tokenizer

    cfg, tensors = read_int4_checkpoint(source)
    return build_int4_model(cfg, tensors, huge_pages), read_tokenizer(source)


def read_int4_checkpoint(source: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, tensors mapped from the file) of an INT4 checkpoint directory; float weights are refused."""
    from mobilemoe.checkpoint import INT4_FORMAT, load_config, read_tensors

    directory = Path(source)
    cfg = load_config(directory)
    tensors, meta = read_tensors(directory / "model.safetensors")
    if meta.get("quantization") != INT4_FORMAT:
        raise MobileMoEError(f"{directory} holds float weights, not INT4: use the QAT stage's final/ directory, "
                             "or drop --int4 to run it in float")
    return cfg, tensors
