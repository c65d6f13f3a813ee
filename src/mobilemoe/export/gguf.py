"""GGUF export for llama.cpp: each of our models onto the llama.cpp architecture that computes it exactly.

| our model | llama.cpp architecture | why that one |
|---|---|---|
| dense, no QK-norm (MobileLLM, SmolLM2) | `llama` | reads `rope_freqs` (llama3 scaling), GQA |
| dense, QK-norm, no RoPE scaling | `qwen3` | per-head RMS q/k norm before NeoX RoPE, GQA |
| dense, QK-norm, llama3 scaling (MobileLLM-Pro) | `exaone-moe`, all layers leading dense | qwen3 + rope_freqs |
| MoE, QK-norm | `exaone-moe` | sigmoid routing + selection bias, shared expert, q/k norm, GQA, rope_freqs |
| MoE, no QK-norm, no RoPE scaling (upcycled SmolLM2) | `glm4moe` | the same MoE block; q/k norms optional |

Checked in the llama.cpp vendored by llama-cpp-python 0.3.36 (`src/models/*.cpp`). `dots1`, which we wrote
before, has the same MoE block but sizes K/V as n_head x head_dim (GQA only as repeated heads, 3x the KV
cache for MobileMoE-S) and passes no frequency factors to RoPE, so the paper's presets (llama3 scaling,
factor 16) could not be exported to it.

Details each mapping relies on:
- llama3 RoPE scaling is the `rope_freqs` tensor llama.cpp's own converter writes for Llama 3.1 (per
  frequency, the factor its wavelength is divided by); `ggml_rope_ext` divides each theta by it, which is our
  `rope_frequencies` exactly.
- `llama` rotates adjacent pairs (RoPE "norm" mode); we rotate halves (NeoX), so q/k rows are permuted per
  head the way `convert_hf_to_gguf.py`'s `LlamaModel.permute` does for HF checkpoints (same scores).
- `exaone-moe` applies RoPE only on sliding-window layers (its global layers have none), so every layer is
  written as sliding-window with a window of the full context: full attention with RoPE everywhere.
- q/k norms: ours has no learned scale, so the GGUF norm weights are ones.
- A model without shared experts gets one all-zero shared expert (exaone-moe requires the tensors, glm4moe's
  graph adds a shared expert whether or not it loaded one; an all-zero one adds 0).
- `glm4moe` (GLM-4.5) loads its q/k norms and q/k/v biases only when present, ropes NeoX style
  (our rotate-half, no permutation), and names the pre-FFN norm `post_attention_norm`; its shared expert is
  `expert_shared_count` experts wide. It passes no frequency factors to RoPE.

Refused (not computed exactly by any of these): interleaved dense/MoE layers (`moe_layer_step > 1`), MoE
without QK-norm but with llama3 RoPE scaling, a shared expert without QK-norm whose width is not a multiple of
the expert size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from mobilemoe.checkpoint import LoadedModel
from mobilemoe.config import ModelConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.export import as_loaded
from mobilemoe.io import atomic_file
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import Tokenizer

QUANTS = ("q4_0", "q8_0", "f16", "f32")


def architecture(cfg: ModelConfig) -> str:
    """The llama.cpp architecture a model is written as; MobileMoEError naming what none can compute."""
    problems = []
    if cfg.is_moe and cfg.moe_layer_step != 1:
        problems.append("interleaved dense and MoE layers (moe_layer_step > 1; llama.cpp's MoE graphs with a "
                        "shared expert and selection bias only have leading dense blocks)")
    if cfg.is_moe and not cfg.qk_norm:  # exaone-moe always normalises q/k; glm4moe reads no rope_freqs
        if cfg.rope_scaling is not None:
            problems.append("MoE without QK-norm but with llama3 RoPE scaling (exaone-moe always normalises q/k; "
                            "glm4moe applies no RoPE frequency factors)")
        if (cfg.n_shared_experts * cfg.shared_expert_size) % cfg.expert_size:
            problems.append("MoE without QK-norm whose shared expert width is not a multiple of the expert size "
                            "(glm4moe's shared expert is a whole number of experts wide)")
    if problems:
        raise MobileMoEError(f"cannot export model '{cfg.name}' to GGUF/llama.cpp exactly: " + "; ".join(problems))
    if cfg.is_moe and not cfg.qk_norm:
        return "glm4moe"
    if cfg.is_moe or cfg.qk_norm and cfg.rope_scaling is not None:  # qwen3 reads no rope_freqs
        return "exaone-moe"
    return "qwen3" if cfg.qk_norm else "llama"


def export_gguf(source: str | Path | LoadedModel, path: str | Path, quant: str = "q8_0",
                tokenizer: Tokenizer | None = None, embedding_bits: int | None = None) -> Path:
    """Write a llama.cpp GGUF of a checkpoint directory or loaded model; `quant` in q4_0|q8_0|f16|f32.

    With q4_0, `embedding_bits` 8 writes the embedding/output matrix as q8_0 (as llama.cpp's own quantizer
    keeps it high); None follows the checkpoint's INT4 scheme (`checkpoint.checkpoint_scheme`).

    Written to a temporary file and renamed, so a failure leaves no partial file.
    """
    import gguf

    if quant not in QUANTS:
        raise MobileMoEError(f"GGUF quant '{quant}' is not one the gguf writer can produce here; choose one of "
                             f"{', '.join(QUANTS)} (K-quants need llama.cpp's own llama-quantize)")
    loaded = as_loaded(source)
    cfg, tokenizer = loaded.model.cfg, tokenizer or loaded.tokenizer
    arch = architecture(cfg)
    if tokenizer is None:
        raise MobileMoEError(f"{loaded.path} has no tokenizer.json; llama.cpp needs the vocabulary in the GGUF")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MobileMoEError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_hparams(writer, cfg, arch, quant)
        _write_tokenizer(writer, tokenizer, cfg.vocab_size)
        if embedding_bits is None:
            embedding_bits = loaded.scheme.embedding_bits
        for name, tensor in _gguf_tensors(loaded.model, arch):
            head = name in ("token_embd.weight", "output.weight") and quant == "q4_0" and embedding_bits == 8
            _add_tensor(writer, name, tensor, "q8_0" if head else quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _write_hparams(writer, cfg: ModelConfig, arch: str, quant: str) -> None:
    import gguf

    writer.add_name(cfg.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_size or cfg.expert_size)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if arch not in ("exaone-moe", "glm4moe"):
        return
    shared = cfg.n_shared_experts * cfg.shared_expert_size
    if arch == "glm4moe":
        writer.add_leading_dense_block_count(0)
        writer.add_expert_shared_count(max(1, shared // cfg.expert_size))
    else:
        # Every layer sliding-window (the only layers exaone-moe ropes) with a window of the whole context.
        writer.add_sliding_window(cfg.max_seq_len)
        writer.add_sliding_window_pattern(0)  # 0: every layer is a sliding-window layer
        writer.add_leading_dense_block_count(0 if cfg.is_moe else cfg.n_layers)
        writer.add_expert_shared_count(1)
        writer.add_expert_shared_feed_forward_length(shared or cfg.expert_size)
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.top_k)
    writer.add_expert_feed_forward_length(cfg.expert_size)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(cfg.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.router == "sigmoid"
                                  else gguf.ExpertGatingFuncType.SOFTMAX)


def _write_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Our byte-level BPE as llama.cpp's gpt2 tokenizer (same byte-to-unicode map; pre-split regex by name)."""
    import gguf

    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    special = {t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size  # rows of the embedding the tokenizer never produces
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    # A model's own special tokens (tokenizer_config.json of an imported checkpoint) are kept; a tokenizer we
    # trained has no BOS (llama.cpp wants some id: eos) and ends turns with <|im_end|>.
    named = tokenizer.named_ids()
    writer.add_bos_token_id(named.get("bos_token", tokenizer.eos_id))
    writer.add_add_bos_token(bool(tokenizer.config.get("add_bos_token", False)))
    writer.add_eos_token_id(named.get("eos_token", tokenizer.eos_id))
    if "pad_token" in named:
        writer.add_pad_token_id(named["pad_token"])
    if named.get("eot_token", tokenizer.im_end_id) is not None:
        writer.add_eot_token_id(named.get("eot_token", tokenizer.im_end_id))
    if "chat_template" in tokenizer.config or tokenizer.im_end_id is not None:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-split: `gpt-2` (plain byte-level) or `smollm` (digits split
    one by one first, as SmolLM2's); other pre-tokenizers are refused rather than silently re-split."""
    pre = json.loads(tokenizer.hf.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    digits = {"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated", "invert": False}
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") or steps[:1] == [digits] and \
            kinds == ["Split", "ByteLevel"]:
        return "smollm"
    raise MobileMoEError(f"tokenizer {tokenizer.source}: pre-tokenizer {kinds} has no llama.cpp equivalent this "
                         "exporter knows (gpt-2 byte-level, or digits split then byte-level as smollm)")


def _merges(tokenizer: Tokenizer) -> list[str]:
    merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _gguf_tensors(model: Transformer, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in PyTorch [out, in] order) for every tensor the architecture loads."""
    cfg = model.cfg
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    out = [("token_embd.weight", model.embed.weight), ("output_norm.weight", model.norm.weight)]
    # llama and qwen3 tie a missing output to token_embd; exaone-moe requires the tensor.
    if model.lm_head is not None or arch == "exaone-moe":
        out.append(("output.weight", head))
    if cfg.rope_scaling is not None:
        out.append(("rope_freqs.weight", _rope_factors(cfg)))
    for i, block in enumerate(model.layers):
        a, ffn = block.attn, block.ffn
        p = f"blk.{i}."
        q, k = a.q_proj.weight, a.k_proj.weight
        if arch == "llama":
            q, k = _rotate_half_to_pairs(q, cfg.n_heads), _rotate_half_to_pairs(k, cfg.n_kv_heads)
        ffn_norm = "post_attention_norm" if arch == "glm4moe" else "ffn_norm"
        out += [(p + "attn_norm.weight", block.attn_norm.weight), (p + f"{ffn_norm}.weight", block.ffn_norm.weight),
                (p + "attn_q.weight", q), (p + "attn_k.weight", k), (p + "attn_v.weight", a.v_proj.weight),
                (p + "attn_output.weight", a.o_proj.weight)]
        if cfg.qk_norm:  # QK-norm without learned scale == RMSNorm with a weight of ones
            out += [(p + "attn_q_norm.weight", torch.ones(cfg.head_dim)),
                    (p + "attn_k_norm.weight", torch.ones(cfg.head_dim))]
        if not cfg.is_moe:
            out += [(p + "ffn_gate.weight", ffn.gate_proj.weight), (p + "ffn_up.weight", ffn.up_proj.weight),
                    (p + "ffn_down.weight", ffn.down_proj.weight)]
            continue
        out += [(p + "ffn_gate_inp.weight", ffn.router.weight),
                (p + "exp_probs_b.bias", ffn.router.expert_bias if cfg.router == "sigmoid" else torch.zeros_like(
                    ffn.router.expert_bias)),
                (p + "ffn_gate_exps.weight", ffn.gate_up_proj[:, : cfg.expert_size]),
                (p + "ffn_up_exps.weight", ffn.gate_up_proj[:, cfg.expert_size:]),
                (p + "ffn_down_exps.weight", ffn.down_proj)]
        if ffn.shared_expert is not None:
            s = ffn.shared_expert
            out += [(p + "ffn_gate_shexp.weight", s.gate_proj.weight), (p + "ffn_up_shexp.weight", s.up_proj.weight),
                    (p + "ffn_down_shexp.weight", s.down_proj.weight)]
        else:
            zeros = torch.zeros(cfg.expert_size, cfg.d_model)
            out += [(p + "ffn_gate_shexp.weight", zeros), (p + "ffn_up_shexp.weight", zeros),
                    (p + "ffn_down_shexp.weight", zeros.T)]
    return out


def _rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """llama3 scaling as llama.cpp's `rope_freqs`: per frequency, the divisor of its theta (as written by
    convert_hf_to_gguf.py for Llama 3.1; equals base_inv_freq / our scaled inv_freq)."""
    s, dim = cfg.rope_scaling, cfg.head_dim
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _rotate_half_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, rows (i, i + hd/2) -> (2i, 2i + 1): our rotate-half RoPE as llama's adjacent-pair RoPE
    (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _add_tensor(writer, name: str, tensor: torch.Tensor, quant: str) -> None:
    import gguf

    data = tensor.detach().float().contiguous().numpy()
    # Norms, the selection bias, rope factors and the router stay f32 (llama.cpp's converter does the same).
    keep_f32 = data.ndim < 2 or "ffn_gate_inp" in name
    if quant == "f32" or keep_f32:
        writer.add_tensor(name, data)
    elif quant == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.Q4_0 if quant == "q4_0" else gguf.GGMLQuantizationType.Q8_0
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            raise MobileMoEError(f"{name}: input dimension {data.shape[-1]} is not a multiple of the {quant} block "
                                 f"size {gguf.GGML_QUANT_SIZES[qtype][0]}; export with --quant f16 or f32")
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
