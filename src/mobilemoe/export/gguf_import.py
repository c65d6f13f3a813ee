"""`mobilemoe import gguf`: a llama.cpp GGUF file as our checkpoint (config, float weights, tokenizer).

Read with gguf-py's `GGUFReader`, every tensor dequantized to float32 by `gguf.quants.dequantize` (a type it
cannot dequantize is refused by name). Architectures:

- `llama`: llama.cpp's converter permutes the q/k rows of every head into the interleaved-pair RoPE
  layout; they are permuted back to our rotate-half layout (the scores q.k are the same function).
  Llama-3 RoPE scaling (a `rope_freqs` tensor) is fitted to our `RopeScaling` and checked exactly.
- `qwen2`, `qwen3`: NeoX RoPE (rotate-half), weights as they are. qwen2's q/k/v biases and qwen3's
  learned q/k-norm scales are not part of our model: refused unless they are zeros / ones.
- `exaone-moe` (what `mobilemoe export gguf` writes for our MoE models) and `dots1` (what it wrote before,
  GQA as MHA with every K/V head repeated; exactly repeated heads are collapsed back to GQA). exaone-moe
  ropes only its sliding-window layers: a file with global (RoPE-less) layers or a window shorter than the
  context is refused.

Every tensor of the file must find its place in our model (or be an exact no-op as above): anything left
over is refused by name, never dropped. The tokenizer is transformers' own GGUF conversion
(`transformers.integrations.gguf`); its chat template and special tokens go into tokenizer_config.json.
Registry models (`mobilemoe import gguf smollm2 OUT`) are fetched once into the cache (data/registry.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from mobilemoe.checkpoint import LoadedModel, write_model_files
from mobilemoe.config import ModelConfig, RopeScaling
from mobilemoe.errors import MobileMoEError
from mobilemoe.export.released import half_from_interleaved
from mobilemoe.io import atomic_dir, claim_dir
from mobilemoe.model import Transformer, rope_frequencies
from mobilemoe.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3", "exaone-moe", "dots1")
MOE_ARCHITECTURES = ("exaone-moe", "dots1")
# What a checkpoint directory written here holds; only a directory holding nothing else may be replaced.
CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "source.json"}


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` of `path`; a missing, truncated or corrupt file is one clear error."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise MobileMoEError(f"{path} does not exist; pass a .gguf file or a registry model name "
                             "(see `mobilemoe import gguf --help`)")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # gguf-py raises ValueError/KeyError/struct errors on a short or foreign file
        raise MobileMoEError(f"{path} is not a complete GGUF file ({type(err).__name__}: {err}); it is truncated "
                             "or corrupt: download or export it again") from None


def _value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_tensors(reader, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32, in PyTorch order ([out, in] for a linear weight)."""
    import gguf

    tensors = {}
    for t in reader.tensors:
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise MobileMoEError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which gguf-py cannot "
                                 "dequantize; convert the file to F16, Q8_0 or Q4_K with llama.cpp's llama-quantize "
                                 "first") from None
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        # np.array copies: F32 data is a read-only view of the mapped file
        tensors[t.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return tensors


def gguf_config(reader, tensors: dict[str, torch.Tensor], path: Path, name: str) -> ModelConfig:
    """Our config from the file's metadata (and the tensors, where the metadata does not say)."""
    arch = _value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise MobileMoEError(f"{path}: architecture {arch!r} is not one we import; supported: "
                             f"{', '.join(ARCHITECTURES)}")

    def meta(key: str, default=None):
        value = _value(reader, f"{arch}.{key}", default)
        if value is None:
            raise MobileMoEError(f"{path}: metadata {arch}.{key} is missing; the file is not a complete {arch} GGUF")
        return value

    d_model, n_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", d_model // n_heads))
    if int(meta("attention.value_length", head_dim)) != head_dim or n_heads * head_dim != d_model:
        raise MobileMoEError(f"{path}: {n_heads} heads of key/value size {head_dim}/"
                             f"{meta('attention.value_length', head_dim)} do not make d_model {d_model}; our "
                             "attention needs n_heads x head_dim == d_model")
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise MobileMoEError(f"{path}: partial RoPE ({meta('rope.dimension_count')} of {head_dim} dims) is not "
                             "part of our model")
    if _value(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise MobileMoEError(f"{path}: RoPE scaling {_value(reader, f'{arch}.rope.scaling.type')!r} is not part of "
                             "our model (only llama3 frequency factors are)")
    head_count_kv = meta("attention.head_count_kv", n_heads)
    if not isinstance(head_count_kv, int):
        raise MobileMoEError(f"{path}: per-layer KV head counts are not part of our model")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise MobileMoEError(f"{path}: tensor token_embd.weight is missing")
    output = tensors.get("output.weight")
    cfg = ModelConfig(
        name=name, vocab_size=embed.shape[0], n_layers=int(meta("block_count")), d_model=d_model, n_heads=n_heads,
        n_kv_heads=head_count_kv, head_dim=head_dim, max_seq_len=int(meta("context_length")),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon")), qk_norm="blk.0.attn_q_norm.weight" in tensors,
        tie_embeddings=output is None or torch.equal(output, embed),
        rope_theta=float(meta("rope.freq_base", 10_000.0)), rope_scaling=None,
        ffn_size=int(meta("feed_forward_length", 0)))
    if arch == "exaone-moe":
        pattern, window = meta("attention.sliding_window_pattern", 1), int(meta("attention.sliding_window", 0))
        if not (pattern == 0 or isinstance(pattern, list) and all(pattern)) or window < cfg.max_seq_len:
            raise MobileMoEError(f"{path}: exaone-moe with global (RoPE-less) layers or a sliding window ({window}) "
                                 f"shorter than the context ({cfg.max_seq_len}) is not part of our model")
    if arch in MOE_ARCHITECTURES:
        if int(meta("leading_dense_block_count", 0)):
            raise MobileMoEError(f"{path}: leading dense blocks are not part of our model (our dense layers "
                                 "interleave with MoE layers)")
        shared = tensors.get("blk.0.ffn_gate_shexp.weight")
        shared_size = 0 if shared is None or not any(
            tensors[f"blk.{i}.ffn_{p}_shexp.weight"].any() for i in range(cfg.n_layers) for p in ("gate", "up", "down")
        ) else shared.shape[0]  # an all-zero shared expert (what we write for "none") adds exactly nothing
        gating = int(meta("expert_gating_func", 1))
        if gating not in (1, 2):
            raise MobileMoEError(f"{path}: expert gating function {gating} is not softmax (1) or sigmoid (2)")
        cfg.n_routed_experts, cfg.top_k = int(meta("expert_count")), int(meta("expert_used_count"))
        cfg.expert_size = int(meta("expert_feed_forward_length"))
        cfg.n_shared_experts, cfg.shared_expert_size = (1, shared_size) if shared_size else (0, 0)
        cfg.router = "sigmoid" if gating == 2 else "softmax"
        cfg.routed_scaling_factor = float(meta("expert_weights_scale", 1.0))
        cfg.norm_topk_prob = bool(meta("expert_weights_norm", False))
        cfg.ffn_size = 0  # every layer is MoE (no leading dense blocks); we write feed_forward_length = expert size
        if arch == "dots1":
            cfg.n_kv_heads = _collapsed_kv_heads(tensors, cfg)
    if "rope_freqs.weight" in tensors:
        cfg.rope_scaling = _fit_rope_scaling(tensors.pop("rope_freqs.weight"), cfg, path,
                                             _value(reader, f"{arch}.rope.scaling.original_context_length"))
    return cfg.validate()


def _collapsed_kv_heads(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> int:
    """The fewest K/V heads that reproduce every layer's K and V exactly (MHA written for GQA collapses back)."""
    for n_kv in sorted(d for d in range(1, cfg.n_kv_heads + 1) if cfg.n_kv_heads % d == 0):
        group = cfg.n_kv_heads // n_kv
        if all(_heads_repeat(tensors[f"blk.{i}.attn_{kv}.weight"], n_kv, group)
               for i in range(cfg.n_layers) for kv in ("k", "v")):
            for i in range(cfg.n_layers):
                for kv in ("k", "v"):
                    w = tensors[f"blk.{i}.attn_{kv}.weight"]
                    tensors[f"blk.{i}.attn_{kv}.weight"] = w.reshape(n_kv, group, -1, w.shape[-1])[:, 0].reshape(
                        -1, w.shape[-1])
            return n_kv
    return cfg.n_kv_heads


def _heads_repeat(weight: torch.Tensor, n_kv: int, group: int) -> bool:
    heads = weight.reshape(n_kv, group, -1, weight.shape[-1])
    return bool((heads == heads[:, :1]).all())


def _fit_rope_scaling(factors: torch.Tensor, cfg: ModelConfig, path: Path, original: int | None) -> RopeScaling:
    """llama3 RoPE scaling from llama.cpp's per-frequency divisors (`rope_freqs`), checked exactly.

    The divisors are 1 (short wavelengths), `factor` (long ones) and between them a ramp linear in 1/wavelength,
    which fixes (original context, low_freq_factor, high_freq_factor) up to a common scale: the original context
    when the file states it, else low_freq_factor = 1 as in Llama 3.1 (the frequencies are the same either way).
    """
    factors = factors.double()
    factor = float(factors.max())
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    ramp = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    scaling = RopeScaling(factor=factor, original_max_position=int(original or 8192))
    if factor > 1 and int(ramp.sum()) >= 2:
        smooth = (1 / factors[ramp] - 1 / factor) / (1 - 1 / factor)  # = original / (wavelen * span) - low / span
        slope, intercept = np.polyfit((inv_freq[ramp] / (2 * np.pi)).numpy(), smooth.numpy(), 1)
        span = original / slope if original else -1.0 / intercept  # span = high_freq_factor - low_freq_factor
        scaling.low_freq_factor = round(float(-intercept * span), 6) if original else 1.0  # rounded: a least-squares
        scaling.high_freq_factor = round(scaling.low_freq_factor + float(span), 6)  # fit of the float32 tensor
        scaling.original_max_position = int(original or round(slope * span))
    ours = rope_frequencies(ModelConfig(rope_theta=cfg.rope_theta, head_dim=cfg.head_dim, rope_scaling=scaling))
    if not torch.allclose(ours.double(), (inv_freq / factors).float().double(), rtol=1e-5, atol=0):
        raise MobileMoEError(f"{path}: rope_freqs does not follow llama3 RoPE scaling; our model cannot reproduce it")
    return scaling


def _layer_map(cfg: ModelConfig, arch: str) -> dict[str, str]:
    """GGUF tensor name -> our state-dict name."""
    out = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        out["output.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        b, o = f"blk.{i}.", f"layers.{i}."
        out |= {b + "attn_norm.weight": o + "attn_norm.weight", b + "ffn_norm.weight": o + "ffn_norm.weight",
                b + "attn_q.weight": o + "attn.q_proj.weight", b + "attn_k.weight": o + "attn.k_proj.weight",
                b + "attn_v.weight": o + "attn.v_proj.weight", b + "attn_output.weight": o + "attn.o_proj.weight"}
        if cfg.is_moe_layer(i):
            out |= {b + "ffn_gate_inp.weight": o + "ffn.router.weight", b + "ffn_down_exps.weight": o + "ffn.down_proj",
                    b + "exp_probs_b.bias": o + "ffn.router.expert_bias"}
            if cfg.n_shared_experts:
                out |= {b + f"ffn_{p}_shexp.weight": o + f"ffn.shared_expert.{p}_proj.weight"
                        for p in ("gate", "up", "down")}
        else:
            out |= {b + f"ffn_{p}.weight": o + f"ffn.{p}_proj.weight" for p in ("gate", "up", "down")}
    return out


# Tensors our model has no place for, accepted only when they change nothing: value they must all hold.
NO_OP_TENSORS = {r"blk\.\d+\.attn_[qkv]\.bias": 0.0, r"blk\.\d+\.attn_[qk]_norm\.weight": 1.0,
                 r"output\.weight": None, r"blk\.\d+\.ffn_(gate|up|down)_shexp\.weight": 0.0}


def gguf_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig, arch: str, path: Path
                    ) -> dict[str, torch.Tensor]:
    """Our state dict from the GGUF tensors (q/k un-permuted for llama, MoE gate/up stacked)."""
    names = _layer_map(cfg, arch)
    state = {ours: tensors.pop(theirs) for theirs, ours in names.items() if theirs in tensors}
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            gate, up = tensors.pop(f"blk.{i}.ffn_gate_exps.weight", None), tensors.pop(f"blk.{i}.ffn_up_exps.weight",
                                                                                     None)
            if gate is not None and up is not None:
                state[f"layers.{i}.ffn.gate_up_proj"] = torch.cat((gate, up), dim=1)
        if arch == "llama":  # undo llama.cpp's permute() of q (n_heads) and k (n_kv_heads) rows
            for proj in ("q_proj", "k_proj"):
                key = f"layers.{i}.attn.{proj}.weight"
                if key in state:
                    state[key] = half_from_interleaved(state[key], cfg.head_dim)
    for name in list(tensors):
        rule = next((v for pattern, v in NO_OP_TENSORS.items() if re.fullmatch(pattern, name)), "none")
        if rule is None or (rule != "none" and bool((tensors[name] == rule).all())):
            tensors.pop(name)  # tied output, all-zero biases / shared expert, unit QK-norm scales
    if tensors:
        bad = sorted(tensors)
        raise MobileMoEError(f"{path}: {arch} tensors our model has no place for: {', '.join(bad[:4])}"
                             f"{' ...' if len(bad) > 4 else ''} (attention biases and learned q/k-norm scales are "
                             "not part of our model; they are imported only when all zero / all one)")
    return state


def gguf_tokenizer(path: Path, reader) -> Tokenizer:
    """transformers' GGUF tokenizer conversion, plus the chat template and special tokens of the file."""
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        arch, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
        hf, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    except (KeyError, ValueError) as err:
        raise MobileMoEError(f"{path}: its tokenizer cannot be converted ({err})") from None
    if tokenizer_dict.get("pre_tokenizer_type") == "smollm":
        # transformers 5.24 has no split for llama.cpp's "smollm" pre-tokenizer (digits one by one, then GPT-2's
        # regex); without it numbers tokenize differently from llama.cpp and from SmolLM's own tokenizer.json.
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokens = tokenizer_dict["tokens"]
    eot = _value(reader, "tokenizer.ggml.eot_token_id")
    special = {k: v for k, v in tokenizer_config.items() if v is not None and k != "unk_token"}
    if eot is not None:
        special["eot_token"] = tokens[int(eot)]
    return Tokenizer(hf, source=str(path), config=special)


def load_gguf(path: str | Path) -> LoadedModel:
    """A GGUF file as our float model and tokenizer; nothing is written."""
    path = Path(path)
    reader = open_gguf(path)
    tensors = read_tensors(reader, path)
    arch = _value(reader, "general.architecture")
    cfg = gguf_config(reader, tensors, path, model_name(path))
    state = gguf_state_dict(tensors, cfg, arch, path)
    model = Transformer(cfg).eval()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or wrong:
        raise MobileMoEError(f"{path}: the {arch} tensors do not match its metadata (missing: "
                             f"{', '.join(missing[:3]) or '-'}; wrong shape: {', '.join(wrong[:3]) or '-'})")
    model.load_state_dict(state)
    return LoadedModel(model, gguf_tokenizer(path, reader), False, path)


def model_name(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct` (the weight type is not part of the name)."""
    stem = re.sub(r"[.-](q\d\w*|i?q\d\w*|f16|f32|bf16)$", "", path.stem, flags=re.I)
    return re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-") or "gguf"


def resolve_source(source: str | Path) -> tuple[Path, dict]:
    """(GGUF file, provenance): an existing file, or a registry model name fetched into the cache."""
    from mobilemoe.data.registry import MODELS, fetch_info, fetch_model

    path = Path(source)
    if path.is_file() or str(source) not in MODELS:
        if not path.is_file():
            raise MobileMoEError(f"{source} is neither a GGUF file nor a registry model ({', '.join(MODELS)})")
        return path, {"file": str(path.resolve())}
    file = fetch_model(str(source))
    return file, {"registry": fetch_info(str(source), kind="models")}


def import_gguf(source: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write our checkpoint of a GGUF file (or registry model) to `out`, atomically. `out` must be new, empty or a
    checkpoint we wrote (anything else only with `force`), checked before the download and conversion."""
    from mobilemoe.data.shards import file_sha256

    claim_dir(out, "checkpoint", force)
    file, provenance = resolve_source(source)
    loaded = load_gguf(file)
    provenance["gguf_sha256"] = file_sha256(file)
    with atomic_dir(out, "checkpoint", force) as tmp:
        write_model_files(tmp, loaded.model, loaded.tokenizer)
        (tmp / "source.json").write_text(json.dumps(provenance, indent=1))
    return Path(out)
