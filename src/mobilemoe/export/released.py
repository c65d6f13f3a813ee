"""Load released `facebook/MobileMoE-*` checkpoints (a local directory) into our model.

The hub is not reachable from here, so this mapping is built from public descriptions, not from a
downloaded checkpoint (docs/interop.md lists what was and was not verified). The layout assumed:

- config.json: `model_type: mobilemoe` with Llama-4-text field names (as MobileMoE, arXiv 2605.27358,
  describes the release): hidden_size,
  num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, vocab_size, rms_norm_eps,
  rope_theta + rope_scaling (llama3), num_local_experts, num_experts_per_tok, intermediate_size (routed
  expert), intermediate_size_mlp (shared expert, and dense layers), interleave_moe_layer_step,
  routed_scaling_factor, norm_topk_prob, use_qk_norm, tie_word_embeddings.
- Weights with transformers' Llama-4 text names (models/llama4/modeling_llama4.py):
  `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `input_layernorm`, `post_attention_layernorm`,
  `feed_forward.router.weight`, `feed_forward.experts.gate_up_proj` [E, D, 2I] and `.down_proj` [E, I, D]
  (transposed relative to ours), `feed_forward.shared_expert.{gate,up,down}_proj.weight`, dense layers
  `feed_forward.{gate,up,down}_proj.weight`; the selection bias under one of `EXPERT_BIAS_NAMES`.
- RoPE: Llama 4 rotates interleaved pairs (2i, 2i+1) (complex multiply); we rotate halves (i, i + hd/2).
  With `rope_layout="interleaved"` (default) q/k rows are permuted per head to our layout; the scores
  q.k are unchanged, and the weightless per-head QK-norm is unaffected by the order.
  `rope_layout="half"` loads q/k as they are (for checkpoints already in the rotate-half layout).

Any tensor the mapping does not consume is an error (a name we guessed wrong must not be dropped
silently); a missing selection bias is loaded as zeros and reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from mobilemoe.checkpoint import LoadedModel, read_tensors
from mobilemoe.config import ModelConfig, RopeScaling
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import Tokenizer
from mobilemoe.ui import console

EXPERT_BIAS_NAMES = ("feed_forward.router.expert_bias", "feed_forward.expert_bias",
                     "feed_forward.router.e_score_correction_bias", "feed_forward.e_score_correction_bias")
RopeLayout = Literal["interleaved", "half"]


def released_config(raw: dict, where: str) -> ModelConfig:
    """Our config from a released config.json (Llama-4-text field names)."""
    if raw.get("model_type") != "mobilemoe":
        raise MobileMoEError(f"{where}: model_type is {raw.get('model_type')!r}, not 'mobilemoe'; for a directory "
                             "written by `mobilemoe export hf` use `mobilemoe import hf`")
    text = raw.get("text_config", raw)
    if any(flag == 0 for flag in text.get("no_rope_layers") or []):
        raise MobileMoEError(f"{where}: NoPE layers (no_rope_layers) are not part of our model")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    scaling = None
    if rope.get("rope_type", rope.get("type", "default")) == "llama3":
        scaling = RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                              high_freq_factor=rope["high_freq_factor"],
                              original_max_position=rope["original_max_position_embeddings"])
    n_experts = text.get("num_local_experts", 0)
    shared = text.get("intermediate_size_mlp", 0) if n_experts else 0
    try:
        return ModelConfig(
            name=Path(where).parent.name, vocab_size=text["vocab_size"], n_layers=text["num_hidden_layers"],
            d_model=text["hidden_size"], n_heads=text["num_attention_heads"],
            n_kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
            max_seq_len=text.get("max_position_embeddings", 8192), norm_eps=text.get("rms_norm_eps", 1e-5),
            qk_norm=text.get("use_qk_norm", True), tie_embeddings=text.get("tie_word_embeddings", True),
            rope_theta=text.get("rope_theta", rope.get("rope_theta", 500_000.0)), rope_scaling=scaling,
            ffn_size=text.get("intermediate_size_mlp", 0) if text.get("interleave_moe_layer_step", 1) > 1 else 0,
            n_routed_experts=n_experts, expert_size=text.get("intermediate_size", 0),
            top_k=text.get("num_experts_per_tok", 0), n_shared_experts=1 if shared else 0, shared_expert_size=shared,
            moe_layer_step=text.get("interleave_moe_layer_step", 1),
            router=text.get("scoring_func", "sigmoid"), routed_scaling_factor=text.get("routed_scaling_factor", 1.0),
            norm_topk_prob=text.get("norm_topk_prob", True)).validate()
    except KeyError as err:
        raise MobileMoEError(f"{where}: required field {err} is missing") from None


def half_from_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per head, rows (0, 2, 4, ..., 1, 3, 5, ...): interleaved-pair RoPE layout -> rotate-half layout."""
    heads = weight.reshape(-1, head_dim // 2, 2, weight.shape[-1])
    return heads.transpose(1, 2).reshape(weight.shape)


def interleaved_from_half(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    heads = weight.reshape(-1, 2, head_dim // 2, weight.shape[-1])
    return heads.transpose(1, 2).reshape(weight.shape)


def _layout(model: Transformer, rope_layout: RopeLayout, to_ours: bool
            ) -> dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """released name -> (our tensor, conversion in the requested direction)."""
    cfg = model.cfg

    def same(t: torch.Tensor) -> torch.Tensor:
        return t

    def transpose(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(-2, -1)

    def rope(t: torch.Tensor) -> torch.Tensor:
        if rope_layout == "half":
            return t
        return (half_from_interleaved if to_ours else interleaved_from_half)(t, cfg.head_dim)

    out = {"model.embed_tokens.weight": (model.embed.weight, same), "model.norm.weight": (model.norm.weight, same)}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        a, ffn = block.attn, block.ffn
        out |= {p + "input_layernorm.weight": (block.attn_norm.weight, same),
                p + "post_attention_layernorm.weight": (block.ffn_norm.weight, same),
                p + "self_attn.q_proj.weight": (a.q_proj.weight, rope),
                p + "self_attn.k_proj.weight": (a.k_proj.weight, rope),
                p + "self_attn.v_proj.weight": (a.v_proj.weight, same),
                p + "self_attn.o_proj.weight": (a.o_proj.weight, same)}
        mlp = ffn if not cfg.is_moe_layer(i) else ffn.shared_expert
        prefix = p + ("feed_forward." if not cfg.is_moe_layer(i) else "feed_forward.shared_expert.")
        if mlp is not None:
            out |= {prefix + f"{proj}.weight": (getattr(mlp, proj).weight, same)
                    for proj in ("gate_proj", "up_proj", "down_proj")}
        if cfg.is_moe_layer(i):
            # Llama 4 stores experts for x @ W: gate_up [E, D, 2I], down [E, I, D]; ours are [E, 2I, D], [E, D, I].
            out |= {p + "feed_forward.router.weight": (ffn.router.weight, same),
                    p + "feed_forward.experts.gate_up_proj": (ffn.gate_up_proj, transpose),
                    p + "feed_forward.experts.down_proj": (ffn.down_proj, transpose),
                    p + EXPERT_BIAS_NAMES[0]: (ffn.router.expert_bias, same)}
    return out


def released_tensors(model: Transformer, rope_layout: RopeLayout = "interleaved") -> dict[str, torch.Tensor]:
    """Our weights in the released layout (what the tests write to check the loader)."""
    return {name: convert(t.detach().float()).contiguous()
            for name, (t, convert) in _layout(model, rope_layout, to_ours=False).items()}


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a released directory; missing shards are an error naming them."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise MobileMoEError(f"{index} is not a valid safetensors index ({err})") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise MobileMoEError(f"{directory} is incomplete: {len(missing)} of {len(names)} shards are missing "
                                 f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); download them again")
        return [directory / n for n in names]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise MobileMoEError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def load_released(directory: str | Path, rope_layout: RopeLayout = "interleaved") -> LoadedModel:
    """A released MobileMoE directory (config.json, safetensors shards, tokenizer.json) as our model."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise MobileMoEError(f"{directory} is not a released MobileMoE directory: config.json is missing")
    cfg = released_config(json.loads(config_file.read_text()), str(config_file))
    tensors: dict[str, torch.Tensor] = {}
    for file in shard_files(directory):
        tensors |= read_tensors(file)[0]
    for i in range(cfg.n_layers):  # the bias name is a guess among several: use whichever is there
        for name in EXPERT_BIAS_NAMES[1:]:
            if f"model.layers.{i}.{name}" in tensors:
                tensors[f"model.layers.{i}.{EXPERT_BIAS_NAMES[0]}"] = tensors.pop(f"model.layers.{i}.{name}")
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, tensors.get("model.embed_tokens.weight")):
        raise MobileMoEError(f"{directory}: lm_head.weight differs from the embedding; our model ties them")

    model = Transformer(cfg).eval()
    layout = _layout(model, rope_layout, to_ours=True)
    unknown = sorted(set(tensors) - set(layout))
    if unknown:
        raise MobileMoEError(f"{directory}: tensors with no place in our model: {', '.join(unknown[:5])}; the "
                             "released layout differs from the one documented in docs/interop.md")
    no_bias = 0
    with torch.no_grad():
        for name, (ours, convert) in layout.items():
            if name not in tensors and name.endswith(EXPERT_BIAS_NAMES[0]):
                ours.zero_()
                no_bias += 1
                continue
            if name not in tensors:
                raise MobileMoEError(f"{directory}: tensor {name} is missing")
            value = convert(tensors[name].float())
            if value.shape != ours.shape:
                raise MobileMoEError(f"{directory}: {name} has shape {tuple(tensors[name].shape)}, config.json "
                                     f"implies {tuple(convert(ours).shape)}")
            ours.copy_(value)
    if no_bias:
        console.print(f"[yellow]note:[/] {no_bias} MoE layers have no expert selection bias; loaded as zeros")
    tok_file = directory / "tokenizer.json"
    return LoadedModel(model, Tokenizer.load(tok_file) if tok_file.is_file() else None, False, directory)
