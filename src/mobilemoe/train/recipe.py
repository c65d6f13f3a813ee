"""Training recipes: one YAML file names the model, the data and the stages to run in order.

    name: quickstart
    seed: 1234
    model: tiny-moe                      # preset, config path, or {preset: ..., <field>: <override>}
    data: recipes/data/embedded.yaml     # a data recipe; prepared (and cached) on first use
    # or, instead of `data`, Hugging Face `datasets` per mixture source, streamed (the paper's recipes), and
    # the tokenizer they are tokenized with (a tokenizer.json, a directory with one, or a hub model name):
    # hub_data: {fineweb_edu: HuggingFaceFW/fineweb-edu, finemath: HuggingFaceTB/finemath:finemath-3plus,
    #            code: {name: codeparrot/codeparrot-clean, text_field: content}, mine: ./my_jsonl_dir}
    # tokenizer: meta-llama/Llama-3.2-1B
    device: auto                         # auto | cpu | cuda; and how to compute there (train/runtime.py):
    precision: fp32                      # fp32 | bf16 (fp32 master weights and optimizer state)
    compile: false                       # torch.compile each block
    activation_checkpointing: false      # recompute each block's activations in backward
    stages:
      - {name: pretrain, kind: pretrain, mixture: {prose: 1.0}, steps: 300, lr: 3e-3, ...}
      - {name: sft, kind: sft, mixture: {chat: 1.0}, steps: 100, lr: 3e-4, schedule: cosine}

Each stage starts from the previous stage's final weights (or `init_from`, a checkpoint directory).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mobilemoe.config import ModelConfig, from_dict, resolve_model_config
from mobilemoe.data.streaming import HubSource
from mobilemoe.errors import ConfigError
from mobilemoe.io import read_mapping
from mobilemoe.quantize import PAPER_SCHEME, Int4Scheme
from mobilemoe.train.runtime import Device, Precision

STAGE_KINDS = ("pretrain", "midtrain", "sft", "qat")
SCHEDULES = ("cosine", "wsd", "linear", "constant")


@dataclass
class StageConfig:
    name: str
    kind: Literal["pretrain", "midtrain", "sft", "qat"] = "pretrain"
    mixture: dict[str, float] = field(default_factory=dict)  # data source name -> sampling weight
    steps: int = 100
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step on each process, before accumulation
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final LR of cosine/linear/wsd as a fraction of lr
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    init_from: str | None = None  # checkpoint dir or an earlier stage's name; default: the previous stage's final
    data_seed: int | None = None  # batch order; default from the recipe seed and stage position. Two stages with
    # the same data_seed and mixture see the same batches (a controlled comparison, e.g. QAT vs more SFT)
    # qat: the INT4 scheme trained against (`quantize.Int4Scheme`); the tied embedding/head at 4 bits (the paper's)
    # or 8 (int8 per row). Rounding is round to nearest: HQQ is a post-training choice, refused with that reason.
    embedding_bits: Literal[4, 8] = 4
    rounding: Literal["rtn", "hqq"] = "rtn"

    @property
    def int4_scheme(self) -> Int4Scheme:
        return Int4Scheme(self.embedding_bits, self.rounding)

    def validate(self, where: str) -> StageConfig:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: field '{name}' {why}")

        need(self.kind in STAGE_KINDS, "kind", f"must be one of {', '.join(STAGE_KINDS)}, got {self.kind!r}")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "keep_last",
                     "log_every"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        need(0 <= self.warmup_steps < self.steps, "warmup_steps", f"must be in [0, steps={self.steps})")
        need(bool(self.mixture), "mixture", "must name at least one data source with a weight")
        for source, weight in self.mixture.items():
            need(weight > 0, f"mixture.{source}", f"weight must be > 0, got {weight}")
        if self.kind == "qat":
            self.int4_scheme.check_trainable(f"{where} (qat)")
        else:
            need(self.int4_scheme == PAPER_SCHEME, "embedding_bits" if self.embedding_bits != 4 else "rounding",
                 "sets the INT4 scheme a qat stage trains against; this stage is not one (drop it, or set kind: qat)")
        return self


@dataclass
class Recipe:
    name: str
    model: str | dict[str, Any]  # preset name, config path or mapping; resolved by `model_config()`
    stages: list[StageConfig]
    data: str | None = None  # a data recipe (local files, prepared by `mobilemoe data`)
    # mixture source -> hub dataset (owner/name[:config], a mapping, or a local dataset directory), streamed
    hub_data: dict[str, HubSource | str] = field(default_factory=dict)
    tokenizer: str | None = None  # hub_data: tokenizer.json, a directory with one, or a hub model name
    seed: int = 1234
    device: Device = "auto"
    precision: Precision = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    # Where the recipe file lives (relative data paths resolve against it); set by `load_recipe`, not a key.
    base_dir: Path = field(default=Path("."), metadata={"internal": True})

    def model_config(self) -> ModelConfig:
        return resolve_model_config(self.model, f"recipe '{self.name}' model")

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"recipe '{self.name}' has no stage '{name}'; its stages: "
                          f"{', '.join(s.name for s in self.stages)}")

    def data_path(self) -> Path:
        if self.data is None:
            raise ConfigError(f"recipe '{self.name}' streams its data from hub datasets (hub_data), which have no "
                              "prepared data nor held-out split; give the recipe a local data recipe as `data:`")
        path = Path(self.data)
        if path.exists() or path.is_absolute():
            return path
        return self.base_dir / path if (self.base_dir / path).exists() else path


def parse_recipe(data: dict[str, Any], where: str = "recipe", base_dir: Path = Path(".")) -> Recipe:
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{where}: 'stages' must be a non-empty list of stages")
    recipe = from_dict(Recipe, data, where)
    recipe.base_dir = base_dir
    for i, stage in enumerate(recipe.stages):
        stage.validate(f"{where}.stages[{i}]")
    if (recipe.data is None) == (not recipe.hub_data):
        raise ConfigError(f"{where}: give exactly one of 'data' (a data recipe file) and 'hub_data' (mixture source "
                          "-> Hugging Face dataset name)")
    recipe.hub_data = {source: HubSource.parse(value, f"{where}: hub_data.{source}", base_dir)
                       for source, value in recipe.hub_data.items()}
    if recipe.hub_data and not recipe.tokenizer:
        raise ConfigError(f"{where}: hub_data needs 'tokenizer' (a tokenizer.json, a directory with one, or a hub "
                          "model name owner/name) to tokenize the streamed documents")
    if recipe.hub_data:
        for i, stage in enumerate(recipe.stages):
            for source in stage.mixture:
                if source not in recipe.hub_data:
                    raise ConfigError(f"{where}.stages[{i}]: mixture source '{source}' is not in hub_data; "
                                      f"known sources: {', '.join(recipe.hub_data)}")
    names = [s.name for s in recipe.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: stage names must be unique, got {names}")
    model = recipe.model_config()  # fail early on a bad model spec
    for i, stage in enumerate(recipe.stages):
        if stage.seq_len > model.max_seq_len:
            raise ConfigError(f"{where}.stages[{i}]: field 'seq_len' ({stage.seq_len}) is above the model's "
                              f"max_seq_len ({model.max_seq_len}); lower seq_len or raise the model's max_seq_len")
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return parse_recipe(read_mapping(path), where=str(path), base_dir=path.parent)


def start_from(recipe: Recipe, checkpoint: str | Path) -> Recipe:
    """`recipe` with `checkpoint`'s architecture as its model and its first stage starting from `checkpoint`'s
    weights: one recipe for several models (e.g. a dense model and the MoEs upcycled from it, same batches)."""
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        raise ConfigError(f"--init-from {checkpoint} is not a checkpoint directory (no config.json)")
    stages = [replace(recipe.stages[0], init_from=str(checkpoint)), *recipe.stages[1:]]
    return replace(recipe, model=str(config), stages=stages)


def with_qat_scheme(recipe: Recipe, embedding_bits: int | None, rounding: str | None) -> Recipe:
    """`recipe` with its qat stages training against another INT4 scheme (`mobilemoe train --embedding-bits`)."""
    if not any(s.kind == "qat" for s in recipe.stages):
        raise ConfigError(f"--embedding-bits/--rounding set the INT4 scheme a qat stage trains against; recipe "
                          f"'{recipe.name}' has no qat stage")
    def qat(s: StageConfig) -> StageConfig:
        scheme = s.int4_scheme.with_overrides(embedding_bits, rounding)
        return replace(s, embedding_bits=scheme.embedding_bits, rounding=scheme.rounding).validate(
            f"--embedding-bits/--rounding on stage '{s.name}'")

    stages = [qat(s) if s.kind == "qat" else s for s in recipe.stages]
    return replace(recipe, stages=stages)


def as_recipe(recipe: Recipe | str | Path | dict[str, Any]) -> Recipe:
    """A recipe, a recipe file or a recipe mapping, as a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    return parse_recipe(recipe) if isinstance(recipe, dict) else load_recipe(recipe)
