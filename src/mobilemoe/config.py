"""Model configs: one plain dataclass for every family member, named presets, YAML/JSON round trip.

A dense model is a `ModelConfig` with `n_routed_experts == 0`. MoE shapes are usually written through
`granular_moe`, which speaks the scaling-law language (coarse experts E, granularity g, top-k,
shared slots) and resolves it to the stored fields (number and size of fine-grained experts).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mobilemoe.errors import ConfigError
from mobilemoe.io import atomic_write_text, read_mapping

LLAMA3_VOCAB = 128_256


@dataclass
class RopeScaling:
    """llama3-style frequency scaling (Llama 3.1): long wavelengths stretched by `factor`."""

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = LLAMA3_VOCAB
    n_layers: int = 20
    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int = 4
    head_dim: int = 64
    max_seq_len: int = 8192
    norm_eps: float = 1e-5
    qk_norm: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    # Dense FFN (used by layers that are not MoE).
    ffn_size: int = 0
    # MoE FFN. n_routed_experts == 0 makes every layer dense.
    n_routed_experts: int = 0
    expert_size: int = 0
    top_k: int = 0
    n_shared_experts: int = 0
    shared_expert_size: int = 0
    moe_layer_step: int = 1  # every `moe_layer_step`-th layer is MoE (1 = all), as Llama-4's interleave step
    router: Literal["sigmoid", "softmax"] = "sigmoid"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    bias_update_rate: float = 1e-3  # aux-loss-free balancing; 0 disables
    aux_loss_coef: float = 0.0  # switch-style load-balancing loss
    z_loss_coef: float = 0.0  # router z-loss

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and (layer + 1) % self.moe_layer_step == 0

    def validate(self) -> ModelConfig:
        def need(ok: bool, fieldname: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"model config '{self.name}': field '{fieldname}' {why}")

        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"({self.n_kv_heads}) must divide n_heads ({self.n_heads}) for grouped-query attention")
        need(self.n_heads * self.head_dim == self.d_model, "n_heads",
             f"x head_dim ({self.n_heads} x {self.head_dim}) must equal d_model ({self.d_model})")
        need(self.router in ("sigmoid", "softmax"), "router", f"must be 'sigmoid' or 'softmax', got {self.router!r}")
        need(self.moe_layer_step >= 1, "moe_layer_step", f"must be >= 1, got {self.moe_layer_step}")
        if self.is_moe:
            need(self.expert_size > 0, "expert_size", "must be positive when n_routed_experts > 0")
            need(1 <= self.top_k <= self.n_routed_experts, "top_k",
                 f"({self.top_k}) must be between 1 and n_routed_experts ({self.n_routed_experts})")
            need(self.n_shared_experts == 0 or self.shared_expert_size > 0, "shared_expert_size",
                 "must be positive when n_shared_experts > 0")
        need(not (self.is_moe and self.moe_layer_step > 1) or self.ffn_size > 0, "ffn_size",
             "must be positive when some layers are dense (moe_layer_step > 1)")
        need(self.is_moe or self.ffn_size > 0, "ffn_size", "must be positive for a dense model")
        return self

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model config") -> ModelConfig:
        return from_dict(cls, data, where).validate()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(
            self.to_dict(), sort_keys=False)
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_mapping(path), where=str(path))


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build a (possibly nested) dataclass from a dict, each value checked against the field's annotation.

    Unknown keys are an error naming the key; fields marked `metadata={"internal": True}` are not keys a
    user writes. Values are coerced where YAML's number forms demand it (see `coerce`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"{where}: unknown key '{key}'{hint}")
    missing = [name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key '{missing[0]}'")
    return cls(**{key: coerce(value, hints[key], where, key) for key, value in data.items()})


def coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    """`value` of field `key` as the type `hint` names, or a ConfigError naming the field, the expected
    type and the value.

    PyYAML reads YAML 1.1, where `3e-3` and `1e6` (no dot) are strings: numeric strings are accepted for
    int and float fields. Nothing else is converted: `model: 5` or `rope_scaling: 4` are errors.
    """
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where}: field '{key}' must be {expected}, got {_shown(value)}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return coerce(value, option, where, key)
            except ConfigError:
                continue
        raise wrong(" or ".join(_type_name(o) for o in options) + (" (or null)" if type(None) in args else ""))
    if origin is Literal:
        if value not in args:
            raise wrong(f"one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise wrong(_type_name(hint))
        return from_dict(hint, value, f"{where}.{key}")
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong("a mapping")
        key_type, value_type = args or (Any, Any)
        return {coerce(k, key_type, where, f"{key}"): coerce(v, value_type, where, f"{key}.{k}")
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise wrong("a list")
        return [coerce(v, args[0] if args else Any, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint in (int, float):
        number = _number(value)
        if number is None or (hint is int and number != int(number)):
            raise wrong(_type_name(hint))
        return hint(number)
    if hint is str and not isinstance(value, str):
        raise wrong("a string")
    if hint is Path:
        if not isinstance(value, str | Path):
            raise wrong("a path")
        return Path(value)
    return value


def _number(value: Any) -> float | int | None:
    """An int or float from a number or a numeric string (not a bool, not NaN or infinite); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}
    if hint in names:
        return names[hint]
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    origin = typing.get_origin(hint)
    return {dict: "a mapping", list: "a list"}.get(origin, getattr(hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


# --- MoE shapes in scaling-law terms ------------------------------------------------------------------
def granular_moe(d_model: int, experts: int, granularity: int, top_k: int = 1, shared_slots: int = 0,
                 expansion: int = 4, coarse_size: int | None = None) -> dict[str, int]:
    """Resolve an MoE written as (E coarse experts, granularity g, top-k coarse, shared slots) to fields.

    A coarse expert is a SwiGLU of hidden size `expansion * d_model` (or `coarse_size`, e.g. an upcycled
    parent's FFN width); granularity g splits each into g fine experts of size coarse/g, giving E*g fine
    slots of which top_k*g are active per token. `shared_slots` of the active slots become one always-on
    shared expert (MobileMoE-S in arXiv 2605.27358: E=8, g=8, shared 4 slots -> 60 routed experts of d/2,
    top-4, shared 2d).
    """
    coarse = coarse_size or expansion * d_model
    size, rem = divmod(coarse, granularity)
    if rem:
        raise ConfigError(f"granularity {granularity} must divide the coarse expert size {coarse}")
    active = top_k * granularity
    if not 0 <= shared_slots < active:
        raise ConfigError(f"shared_slots ({shared_slots}) must be below the active slots top_k*g ({active})")
    return dict(n_routed_experts=experts * granularity - shared_slots, expert_size=size,
                top_k=active - shared_slots, n_shared_experts=1 if shared_slots else 0,
                shared_expert_size=shared_slots * size)


# --- presets ----------------------------------------------------------------------------------------
def _mobilemoe(name: str, n_layers: int, d_model: int, n_heads: int) -> ModelConfig:
    return ModelConfig(name=name, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=4,
                       head_dim=64, **granular_moe(d_model, experts=8, granularity=8, shared_slots=4))


def _mobilellm(name: str, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, ffn: int,
               vocab: int = 32_000) -> ModelConfig:
    # MobileLLM (2024): deep-and-thin, SwiGLU, GQA, tied embeddings, Llama-2 vocab, no QK-norm.
    return ModelConfig(name=name, vocab_size=vocab, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=d_model // n_heads, ffn_size=ffn, qk_norm=False,
                       max_seq_len=2048, rope_theta=10_000.0, rope_scaling=None)


def _tiny(name: str, moe: bool, d_model: int = 128, n_layers: int = 4) -> ModelConfig:
    # Trains on two CPU cores in minutes; small BPE vocab. The dense twin has the same active FFN width
    # (one coarse expert = expansion*d) as the MoE, so both have about the same active parameters.
    shape = granular_moe(d_model, experts=8, granularity=4, shared_slots=2) if moe else {"ffn_size": 4 * d_model}
    return ModelConfig(name=name, vocab_size=4096, n_layers=n_layers, d_model=d_model, n_heads=4, n_kv_heads=2,
                       head_dim=d_model // 4, max_seq_len=512, rope_theta=10_000.0, rope_scaling=None,
                       **shape)


PRESETS: dict[str, ModelConfig] = {c.name: c for c in [
    _mobilemoe("mobilemoe-s", 20, 768, 12),
    _mobilemoe("mobilemoe-m", 26, 1024, 16),
    _mobilemoe("mobilemoe-l", 32, 1280, 20),
    ModelConfig(name="mobilellm-pro", vocab_size=202_048, n_layers=30, d_model=1280, n_heads=20, n_kv_heads=4,
                head_dim=64, ffn_size=6144),
    _mobilellm("mobilellm-125m", 30, 576, 9, 3, 1536),
    _mobilellm("mobilellm-350m", 32, 960, 15, 5, 2560),
    _mobilellm("mobilellm-600m", 40, 1152, 18, 6, 3072),
    _mobilellm("mobilellm-1b", 54, 1280, 20, 5, 3584),
    _tiny("tiny-moe", moe=True),
    _tiny("tiny-dense", moe=False),
    _tiny("micro-moe", moe=True, d_model=64, n_layers=2),
    _tiny("micro-dense", moe=False, d_model=64, n_layers=2),
]}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model preset '{name}'.{hint} Known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def resolve_model_config(spec: str | dict[str, Any] | ModelConfig, where: str = "model config") -> ModelConfig:
    """A preset name, a path to a YAML/JSON config, a dict (optionally `preset:` + overrides), or a config."""
    if isinstance(spec, ModelConfig):
        return spec.validate()
    if isinstance(spec, str):
        path = Path(spec)
        return ModelConfig.load(path) if path.suffix in (".yaml", ".yml", ".json") else get_preset(spec).validate()
    spec = dict(spec)
    base = get_preset(coerce(spec.pop("preset"), str, where, "preset")).to_dict() if "preset" in spec else {}
    base.update(spec)
    return ModelConfig.from_dict(base, where)
