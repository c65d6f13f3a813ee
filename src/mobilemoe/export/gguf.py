"""GGUF export for llama.cpp, onto its `dots1` architecture.

llama.cpp's dots1 graph is our MoE block op for op: RMSNorm'd per-head q/k (we write all-ones norm
weights, since our QK-norm has no learned scale) before NeoX (rotate-half) RoPE, GQA, then
`build_moe_ffn` with sigmoid (or softmax) gating, a selection-only bias (`exp_probs_b`), optional top-k
renormalisation and a scale (`expert_weights_scale`), plus one unweighted shared SwiGLU. dots1 requires
an `output` tensor, so the tied embedding is written twice (token_embd and output). llama.cpp 0.3.36's dots1
loader also sizes K/V as n_head x head_dim (multi-head only), so GQA is written as the equivalent MHA:
every K/V head repeated for the query heads that share it. Exact, but K/V weights and the KV cache grow
by n_heads / n_kv_heads.

Not representable (refused): dense or interleaved-dense layers (`moe_layer_step > 1`, dots1 only has
leading dense blocks), llama3 RoPE scaling (dots1 passes no frequency factors to RoPE), a shared expert
whose width is not a multiple of the routed expert size. A model without shared experts gets one
all-zero shared expert, which adds exactly nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mobilemoe.checkpoint import LoadedModel
from mobilemoe.config import ModelConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.export import as_loaded
from mobilemoe.io import atomic_file
from mobilemoe.tokenizer import Tokenizer

QUANTS = ("q4_0", "q8_0", "f16", "f32")
ARCH = "dots1"


def check_representable(cfg: ModelConfig) -> None:
    """Raise MobileMoEError naming the first option llama.cpp's dots1 graph cannot compute exactly."""
    problems = []
    if not cfg.is_moe or cfg.moe_layer_step != 1:
        problems.append("dense layers (llama.cpp dots1 computes every layer as MoE; export MoE models with "
                        "moe_layer_step 1)")
    if cfg.rope_scaling is not None:
        problems.append("llama3 RoPE scaling (dots1 has no RoPE frequency factors; the exported model would "
                        "compute different attention)")
    if not cfg.tie_embeddings:
        problems.append("untied output head (not exported yet)")
    shared = cfg.n_shared_experts * cfg.shared_expert_size
    if cfg.is_moe and shared % cfg.expert_size:
        problems.append(f"shared expert width {shared} is not a multiple of the expert size {cfg.expert_size}")
    if problems:
        raise MobileMoEError(f"cannot export model '{cfg.name}' to GGUF/llama.cpp exactly: " + "; ".join(problems))


def export_gguf(source: str | Path | LoadedModel, path: str | Path, quant: str = "q8_0",
                tokenizer: Tokenizer | None = None) -> Path:
    """Write a llama.cpp GGUF of a checkpoint directory or loaded model; `quant` in q4_0|q8_0|f16|f32.

    Written to a temporary file and renamed, so a failure leaves no partial file.
    """
    import gguf

    if quant not in QUANTS:
        raise MobileMoEError(f"GGUF quant '{quant}' is not one the gguf writer can produce here; choose one of "
                             f"{', '.join(QUANTS)} (K-quants need llama.cpp's own llama-quantize)")
    loaded = as_loaded(source)
    cfg, tokenizer = loaded.model.cfg, tokenizer or loaded.tokenizer
    check_representable(cfg)
    if tokenizer is None:
        raise MobileMoEError(f"{loaded.path} has no tokenizer.json; llama.cpp needs the vocabulary in the GGUF")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MobileMoEError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _write_hparams(writer, cfg, quant)
        _write_tokenizer(writer, tokenizer, cfg.vocab_size)
        for name, tensor in _gguf_tensors(loaded.model):
            _add_tensor(writer, name, tensor, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _write_hparams(writer, cfg: ModelConfig, quant: str) -> None:
    import gguf

    shared = cfg.n_shared_experts * cfg.shared_expert_size
    writer.add_name(cfg.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_size or cfg.expert_size)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_heads)  # GQA written as MHA, see module docstring
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_leading_dense_block_count(0)
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.top_k)
    writer.add_expert_feed_forward_length(cfg.expert_size)
    # At least one shared expert: dots1 requires the tensors; a missing one is written as zeros.
    writer.add_expert_shared_count(max(1, shared // cfg.expert_size))
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(cfg.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.router == "sigmoid"
                                  else gguf.ExpertGatingFuncType.SOFTMAX)


def _write_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Our byte-level BPE as llama.cpp's gpt2 tokenizer (same byte-to-unicode map and pre-split regex)."""
    import gguf

    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    special = {t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size  # rows of the embedding the tokenizer never produces
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.eos_id)  # we train without BOS; llama.cpp wants some id here
    writer.add_add_bos_token(False)
    writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.im_end_id is not None:
        writer.add_eot_token_id(tokenizer.im_end_id)
        writer.add_chat_template(CHAT_TEMPLATE)


# Our chat format (mobilemoe.tokenizer) as a Jinja template, shared with the HF export.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def _merges(tokenizer: Tokenizer) -> list[str]:
    import json

    merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in PyTorch [out, in] order) for every tensor llama.cpp's dots1 loads."""
    cfg = model.cfg
    ones = torch.ones(cfg.head_dim)
    out = [("token_embd.weight", model.embed.weight), ("output.weight", model.embed.weight),
           ("output_norm.weight", model.norm.weight)]
    for i, block in enumerate(model.layers):
        a, moe = block.attn, block.ffn
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", block.attn_norm.weight), (p + "ffn_norm.weight", block.ffn_norm.weight),
                (p + "attn_q.weight", a.q_proj.weight), (p + "attn_output.weight", a.o_proj.weight),
                (p + "attn_k.weight", _repeat_kv_heads(a.k_proj.weight, cfg)),
                (p + "attn_v.weight", _repeat_kv_heads(a.v_proj.weight, cfg)),
                # QK-norm without learned scale == RMSNorm with a weight of ones.
                (p + "attn_q_norm.weight", ones), (p + "attn_k_norm.weight", ones),
                (p + "ffn_gate_inp.weight", moe.router.weight),
                (p + "exp_probs_b.bias", moe.router.expert_bias if cfg.router == "sigmoid" else torch.zeros_like(
                    moe.router.expert_bias)),
                (p + "ffn_gate_exps.weight", moe.gate_up_proj[:, : cfg.expert_size]),
                (p + "ffn_up_exps.weight", moe.gate_up_proj[:, cfg.expert_size:]),
                (p + "ffn_down_exps.weight", moe.down_proj)]
        if moe.shared_expert is not None:
            s = moe.shared_expert
            out += [(p + "ffn_gate_shexp.weight", s.gate_proj.weight), (p + "ffn_up_shexp.weight", s.up_proj.weight),
                    (p + "ffn_down_shexp.weight", s.down_proj.weight)]
        else:
            zeros = torch.zeros(cfg.expert_size, cfg.d_model)
            out += [(p + "ffn_gate_shexp.weight", zeros), (p + "ffn_up_shexp.weight", zeros),
                    (p + "ffn_down_shexp.weight", zeros.T)]
    return out


def _repeat_kv_heads(weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[n_kv_heads*hd, D] -> [n_heads*hd, D]: query head h reads kv head h // group, as in our attention."""
    heads = weight.reshape(cfg.n_kv_heads, cfg.head_dim, -1)
    return heads.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=0).reshape(cfg.n_heads * cfg.head_dim, -1)


def _add_tensor(writer, name: str, tensor: torch.Tensor, quant: str) -> None:
    import gguf

    data = tensor.detach().float().contiguous().numpy()
    # Norms, the selection bias and the router stay f32 (llama.cpp's converter does the same).
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
