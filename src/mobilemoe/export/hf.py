"""Hugging Face transformers export/import onto stock architectures (no trust_remote_code).

MoE models map onto `Dots1ForCausalLM`, whose router is ours exactly (transformers 5.24,
models/dots1/modeling_dots1.py): fp32 sigmoid scores, experts selected by score + `e_score_correction_bias`
but weighted by the plain scores, top-k renormalised (`norm_topk_prob`) and scaled by
`routed_scaling_factor`, shared experts added unweighted, stacked experts `gate_up_proj [E, 2I, D]` (gate
rows first) / `down_proj [E, D, I]`. With `n_group = topk_group = 1` the group-limited selection keeps
every expert. Attention: per-head RMSNorm on q/k before rotate-half RoPE (we set the norm weights to
ones; our QK-norm has no scale), GQA, no bias; llama3 RoPE scaling via `rope_parameters`.

MoE models without QK-norm (an upcycled SmolLM2) map onto `Glm4MoeForCausalLM` (models/glm4_moe): the same
router, experts and shared expert as Dots1, with `use_qk_norm: false`, `partial_rotary_factor: 1.0` (it ropes
all of head_dim, rotate-half) and no attention bias. Dense models map onto `Qwen3ForCausalLM` (QK-norm) or
`LlamaForCausalLM` (no QK-norm).

Refused, with the reason: softmax routing (Dots1 and GLM-4 MoE are sigmoid-only), interleaved dense layers
(`moe_layer_step > 1`; both only have leading dense layers), a shared expert whose width is not a multiple of the
routed expert size, untied output heads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mobilemoe.checkpoint import LoadedModel
from mobilemoe.config import ModelConfig, RopeScaling
from mobilemoe.errors import MobileMoEError
from mobilemoe.export import as_loaded
from mobilemoe.io import atomic_dir, claim_dir
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import Tokenizer


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer | None = None):
    """The transformers config that computes exactly what `cfg` does, or MobileMoEError saying why none does."""
    from transformers import Dots1Config, Glm4MoeConfig, LlamaConfig, Qwen3Config

    problems = []
    if not cfg.tie_embeddings:
        problems.append("untied output head (not exported yet)")
    if cfg.is_moe:
        if cfg.router != "sigmoid":
            problems.append("softmax routing (Dots1's and GLM-4 MoE's routers are sigmoid only)")
        if cfg.moe_layer_step != 1:
            problems.append("interleaved dense layers, moe_layer_step > 1 (Dots1 and GLM-4 MoE have only leading "
                            "dense layers)")
        if (cfg.n_shared_experts * cfg.shared_expert_size) % cfg.expert_size:
            problems.append("a shared expert width that is not a multiple of the expert size")
    if problems:
        raise MobileMoEError(f"cannot export model '{cfg.name}' to a stock transformers architecture exactly: "
                             + "; ".join(problems))

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
                  rope_parameters=_rope_parameters(cfg), attention_bias=False, hidden_act="silu",
                  **(_special_token_ids(tokenizer) if tokenizer else {}))
    if not cfg.is_moe:
        config_class = Qwen3Config if cfg.qk_norm else LlamaConfig
        return config_class(intermediate_size=cfg.ffn_size, **common)
    shared = cfg.n_shared_experts * cfg.shared_expert_size
    moe = dict(
        intermediate_size=cfg.ffn_size or cfg.expert_size, moe_intermediate_size=cfg.expert_size,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.top_k,
        # No shared expert is written as one all-zero shared expert: it adds exactly nothing.
        n_shared_experts=max(1, shared // cfg.expert_size), n_group=1, topk_group=1, first_k_dense_replace=0,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor, **common)
    if not cfg.qk_norm:
        moe["rope_parameters"] = {**moe["rope_parameters"], "partial_rotary_factor": 1.0}
        return Glm4MoeConfig(use_qk_norm=False, partial_rotary_factor=1.0, num_nextn_predict_layers=0, **moe)
    return Dots1Config(sliding_window=None, layer_types=["full_attention"] * cfg.n_layers, **moe)


def _special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """bos/eos/pad ids for config.json: the model's own (an imported SmolLM2 ends with <|im_end|>, id 2), else our
    end-of-text for all three (a tokenizer we trained has no BOS)."""
    named = tokenizer.named_ids()
    return {f"{k}_id": named.get(k, tokenizer.eos_id) for k in ("bos_token", "eos_token", "pad_token")}


def _rope_parameters(cfg: ModelConfig) -> dict:
    s = cfg.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position}


def hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """transformers (in-memory) name -> our tensor itself, for every tensor both models have."""
    cfg = model.cfg
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{proj}.weight"] = getattr(block.attn, proj).weight
        ffn = block.ffn
        if not cfg.is_moe_layer(i):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{proj}.weight"] = getattr(ffn, proj).weight
            continue
        out[p + "mlp.gate.weight"] = ffn.router.weight
        out[p + "mlp.gate.e_score_correction_bias"] = ffn.router.expert_bias
        out[p + "mlp.experts.gate_up_proj"] = ffn.gate_up_proj
        out[p + "mlp.experts.down_proj"] = ffn.down_proj
        if ffn.shared_expert is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.shared_experts.{proj}.weight"] = getattr(ffn.shared_expert, proj).weight
    return out


def _qk_norm_names(hf_model) -> list[str]:
    return [k for k in hf_model.state_dict() if k.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight"))]


def to_hf(source: str | Path | LoadedModel):
    """A transformers model (fp32, eval) computing what our model computes, and our tokenizer as a fast one."""
    from transformers import AutoModelForCausalLM

    loaded = as_loaded(source)
    config = hf_config(loaded.model.cfg, loaded.tokenizer)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = {k: v.detach().float() for k, v in hf_tensors(loaded.model).items()}
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    unfilled = []
    with torch.no_grad():
        for name in missing:
            if name.endswith(("q_norm.weight", "k_norm.weight")):  # our QK-norm has no learned scale
                hf_model.get_parameter(name).fill_(1.0)
            elif ".shared_experts." in name:  # no shared expert: an all-zero one adds exactly nothing
                hf_model.get_parameter(name).zero_()
            elif name != "lm_head.weight":  # tied to the embedding
                unfilled.append(name)
    if unfilled or unexpected:
        raise MobileMoEError(f"internal weight-name mapping is out of date with transformers: missing {unfilled[:3]}, "
                             f"unexpected {unexpected[:3]}")
    hf_model.tie_weights()
    if loaded.tokenizer:  # generate() stops where our chat/generate stop: end of text, end of turn, model's eos/eot
        eos = config.eos_token_id
        hf_model.generation_config.eos_token_id = [eos, *sorted(loaded.tokenizer.stop_ids() - {eos})]
    return hf_model.eval(), (hf_tokenizer(loaded.tokenizer) if loaded.tokenizer else None)


def hf_tokenizer(tokenizer: Tokenizer):
    """Our tokenizer.json as a PreTrainedTokenizerFast with the model's special tokens and chat template; its
    tokenizer(text) prepends BOS exactly when ours does (`encode(text, start=True)`, add_bos_token)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    special = {k: tokenizer.hf.id_to_token(i) for k, i in _special_token_ids(tokenizer).items()}
    hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    if tokenizer.bos_id is not None:
        bos = special["bos_token_id"]
        hf.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                               special_tokens=[(bos, tokenizer.bos_id)])
    else:  # prepend nothing (an imported tokenizer.json may carry a template that does)
        hf.post_processor = TemplateProcessing(single="$A", pair="$A $B")
    named_bos = {"bos_token": special["bos_token_id"]} if "bos_token" in tokenizer.named_ids() else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=hf, eos_token=special["eos_token_id"],
                                   pad_token=special["pad_token_id"], **named_bos)
    if tokenizer.im_start_id is not None or "chat_template" in tokenizer.config:
        fast.chat_template = tokenizer.chat_template
    return fast


def export_hf(source: str | Path | LoadedModel, directory: str | Path, force: bool = False) -> Path:
    """Write a directory `AutoModelForCausalLM.from_pretrained` loads without trust_remote_code (replacing an
    existing one only if it is our own HF export, or `force`)."""
    claim_dir(directory, "hf-export", force)
    hf_model, tokenizer = to_hf(source)
    with atomic_dir(directory, "hf-export", force) as tmp:
        hf_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def import_hf(directory: str | Path) -> LoadedModel:
    """Load a directory written by `export_hf` (a Dots1, GLM-4 MoE, Qwen3 or Llama model in our shape) into our
    model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise MobileMoEError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    hf_cfg = _hf_read(directory, AutoConfig.from_pretrained, directory)
    cfg = _our_config(hf_cfg, directory)
    hf_model = _hf_read(directory, AutoModelForCausalLM.from_pretrained, directory, dtype=torch.float32)
    hf_weights = hf_model.state_dict()
    for name in _qk_norm_names(hf_model):
        if not torch.all(hf_weights[name] == 1):
            raise MobileMoEError(f"{directory}: {name} is a learned scale; our QK-norm has none, so this model "
                                 "cannot be imported exactly")
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, tensor in hf_tensors(model).items():
            tensor.copy_(hf_weights[name])
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None
    return LoadedModel(model, tokenizer, False, directory)


def _hf_read(directory: Path, read, *args, **kwargs):
    """transformers' reader, with its errors for a truncated or foreign file turned into one message."""
    from safetensors import SafetensorError

    try:
        return read(*args, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MobileMoEError(f"{directory}: transformers cannot read it ({detail}); re-create it with "
                             "`mobilemoe export hf`, or pass the right directory") from None


def _our_config(hf_cfg, directory: Path) -> ModelConfig:
    kind = hf_cfg.model_type
    if kind not in ("dots1", "glm4_moe", "qwen3", "llama"):
        raise MobileMoEError(f"{directory}: model_type '{kind}' is not one MobileMoE exports (dots1, glm4_moe, qwen3, "
                             "llama); for a released facebook/MobileMoE-* directory use `mobilemoe import released`")
    rope = hf_cfg.rope_parameters
    scaling = None if rope.get("rope_type", "default") == "default" else RopeScaling(
        factor=rope["factor"], low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"],
        original_max_position=rope["original_max_position_embeddings"])
    fields = dict(name=directory.name, vocab_size=hf_cfg.vocab_size, n_layers=hf_cfg.num_hidden_layers,
                  d_model=hf_cfg.hidden_size, n_heads=hf_cfg.num_attention_heads,
                  n_kv_heads=hf_cfg.num_key_value_heads,
                  head_dim=getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads,
                  max_seq_len=hf_cfg.max_position_embeddings, norm_eps=hf_cfg.rms_norm_eps,
                  qk_norm=hf_cfg.use_qk_norm if kind == "glm4_moe" else kind != "llama",
                  rope_theta=rope["rope_theta"], rope_scaling=scaling)
    if kind not in ("dots1", "glm4_moe"):
        return ModelConfig(ffn_size=hf_cfg.intermediate_size, **fields).validate()
    if hf_cfg.first_k_dense_replace or hf_cfg.n_group != 1 or hf_cfg.topk_group != 1 or kind == "glm4_moe" and (
            hf_cfg.attention_bias or rope.get("partial_rotary_factor", 1.0) != 1.0):
        raise MobileMoEError(f"{directory}: a {kind} model with dense layers, group-limited routing, attention biases "
                             "or partial RoPE is not in our model family")
    return ModelConfig(n_routed_experts=hf_cfg.n_routed_experts, expert_size=hf_cfg.moe_intermediate_size,
                       top_k=hf_cfg.num_experts_per_tok, n_shared_experts=1,
                       shared_expert_size=hf_cfg.n_shared_experts * hf_cfg.moe_intermediate_size,
                       routed_scaling_factor=hf_cfg.routed_scaling_factor, norm_topk_prob=hf_cfg.norm_topk_prob,
                       **fields).validate()
