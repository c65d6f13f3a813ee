"""One trainer for every stage of the recipe: pre-training, mid-training, SFT and INT4 QAT.

The stages differ only in their data mixture, schedule and, for QAT, fake-quantized weights; the loop
is the same. Run directory layout (`--out`):

    recipe.yaml                     the recipe as run
    <stage>/metrics.jsonl           one line per logged step / eval
    <stage>/checkpoints/step-N/     resumable: weights, optimizer, data position, RNG, step
    <stage>/best/                   best held-out loss (weights only)
    <stage>/final/                  the stage's output (QAT: INT4 weights), input of the next stage
    tensorboard/                    the same metrics for TensorBoard
    summary.json                    per-stage results; top-level keys describe the last stage
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.markup import escape
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mobilemoe.checkpoint import load_model, save_model, write_model_files
from mobilemoe.config import ModelConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_dir, atomic_write_text, claim_dir, mark_dir
from mobilemoe.model import Transformer, count_parameters
from mobilemoe.quantize import prepare_qat
from mobilemoe.train import parallel
from mobilemoe.train.flops import flops_per_token, peak_flop_s, peak_memory_mb
from mobilemoe.train.recipe import Recipe, StageConfig, as_recipe
from mobilemoe.train.runtime import Runtime, build_optimizer, prepare_model, resolve_device
from mobilemoe.ui import console, progress


def lr_at(step: int, s: StageConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the stage's schedule."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    floor = s.lr * s.min_lr_ratio
    progress_ = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps - 1)
    if s.schedule == "cosine":
        return floor + (s.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress_))
    if s.schedule == "linear":
        return s.lr + (floor - s.lr) * progress_
    if s.schedule == "wsd":  # warmup-stable-decay: flat, then a linear decay over the last decay_fraction
        decay_start = int(s.steps * (1 - s.decay_fraction))
        return s.lr if step < decay_start else s.lr + (floor - s.lr) * (step - decay_start) / max(
            1, s.steps - 1 - decay_start)
    return s.lr


@dataclass
class StageResult:
    stage: str
    kind: str
    steps: int
    tokens: int
    final_val_loss: float | None  # None: the data has no held-out split
    best_val_loss: float | None
    wall_time_s: float
    params_active: int
    params_total: int
    flops_per_token: int  # training FLOPs per token, 6 x active parameters (attention scores left out)
    final_dir: str


class StageTrainer:
    """Trains one stage; `run()` resumes from the stage's latest checkpoint when asked to."""

    def __init__(self, recipe: Recipe, stage: StageConfig, stage_index: int, out: Path, data: Any,
                 init_dir: Path | None, world: parallel.World, parallel_mode: str, runtime: Runtime):
        self.recipe, self.stage, self.out, self.data, self.world = recipe, stage, out, data, world
        self.runtime = runtime
        self.dir = out / stage.name
        self.cfg: ModelConfig = recipe.model_config()
        self.tokenizer = data.tokenizer
        data.check_vocab(self.cfg.vocab_size)
        torch.manual_seed(recipe.seed + stage_index)
        model = Transformer(self.cfg)
        if init_dir is not None:
            loaded = load_model(init_dir)
            check_same_architecture(loaded.model.cfg, self.cfg, f"stage '{stage.name}' starts from {init_dir}, a")
            model.load_state_dict(loaded.model.state_dict())
        # QAT's float weights (best/, step checkpoints) record the scheme they train against; its final/ is INT4.
        self.qat_scheme = stage.int4_scheme if stage.kind == "qat" else None
        if self.qat_scheme is not None:
            prepare_qat(model, self.qat_scheme)
        self.raw_model = model
        self.count = count_parameters(model)
        self.model = parallel.wrap_model(prepare_model(model, runtime), world, parallel_mode,
                                         bf16=runtime.precision == "bf16")
        self.optimizer = build_optimizer(self.model, stage.lr, (stage.beta1, stage.beta2), stage.weight_decay)
        data_seed = recipe.seed + 1000 * stage_index if stage.data_seed is None else stage.data_seed
        self.batches = data.train_batches(self._mixture(), seq_len=stage.seq_len, batch_size=stage.batch_size,
                                          seed=data_seed, rank=world.rank, world_size=world.size)
        self.tokens_per_step = stage.batch_size * stage.seq_len * stage.grad_accum * world.size
        # MFU against the device's peak in the run's precision (train/device_peaks.yaml; None: a GPU not listed)
        self.model_flops_per_token = flops_per_token(self.cfg, stage.seq_len)
        peak = peak_flop_s(runtime.device, runtime.precision)
        self.peak_flop_s = None if peak is None else peak * world.size
        self.step, self.best_val = 0, math.inf

    def _mixture(self) -> list[tuple[str, float]]:
        known = self.data.source_names()
        for name in self.stage.mixture:
            if name not in known:
                raise MobileMoEError(f"stage '{self.stage.name}' mixes data source '{name}', which the prepared "
                                     f"data does not have; known sources: {', '.join(known)}")
        return list(self.stage.mixture.items())

    # --- checkpoints ------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        return sorted((self.dir / "checkpoints").glob("step-*"))

    def save_checkpoint(self) -> Path:
        model_state = parallel.full_model_state(self.model)
        optim_state = parallel.full_optimizer_state(self.model, self.optimizer)
        path = self.dir / "checkpoints" / f"step-{self.step:07d}"
        if self.world.is_main:
            tensors = {_plain_key(k): v.float().contiguous() for k, v in model_state.items()}
            flat_optim = {f"{fqn}::{key}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
                          for fqn, state in optim_state["state"].items() for key, v in state.items()}
            with atomic_dir(path) as tmp:
                write_model_files(tmp, self.raw_model, self.tokenizer, tensors=tensors, scheme=self.qat_scheme)
                save_file(flat_optim, tmp / "optimizer.safetensors")
                save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
                (tmp / "trainer_state.json").write_text(json.dumps({
                    "step": self.step, "best_val": _finite(self.best_val), "stage": self.stage.name,
                    "param_groups": optim_state["param_groups"], "data": self.batches.state_dict(),
                    "world_size": self.world.size}, indent=1))
            for old in self.checkpoints()[: -self.stage.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        parallel.barrier(self.world)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, RNG and data position; everything is read (and checked) before any of
        it is applied, so a broken checkpoint (`BrokenCheckpoint`) leaves the trainer as it was."""
        state, plain, flat_optim, rng = self._read_checkpoint(path)
        if state["world_size"] != self.world.size:
            raise MobileMoEError(f"{path} was written by a {state['world_size']}-process run; resume it with the same "
                                 f"number of processes (this run has {self.world.size})")
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat_optim.items():
            fqn, name = key.split("::")
            optim.setdefault(fqn, {})[name] = value
        model_state = {k: plain[_plain_key(k)] for k in parallel.full_model_state(self.model)}
        parallel.load_full_state(self.model, self.optimizer, model_state,
                                 {"state": optim, "param_groups": state["param_groups"]})
        torch.set_rng_state(rng)
        self.batches.load_state_dict(state["data"])
        self.step, self.best_val = state["step"], math.inf if state["best_val"] is None else state["best_val"]

    def _read_checkpoint(self, path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], Tensor]:
        file = path / "trainer_state.json"
        try:
            state = json.loads(file.read_text())
            for key in ("step", "best_val", "param_groups", "data", "world_size"):
                state[key]  # noqa: B018 - a missing key is a broken file
            file = path / "model.safetensors"
            plain = load_file(file)
            missing = [k for k in map(_plain_key, parallel.full_model_state(self.model)) if k not in plain]
            if missing:
                raise BrokenCheckpoint(f"{file} lacks {missing[0]}")
            file = path / "optimizer.safetensors"
            flat_optim = load_file(file)
            file = path / "rng.safetensors"
            rng = load_file(file)["torch_rng"]
        except BrokenCheckpoint:
            raise
        except FileNotFoundError:
            raise BrokenCheckpoint(f"{file} is missing") from None
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise BrokenCheckpoint(f"{file} is truncated or corrupt ({type(err).__name__}: {err})") from None
        return state, plain, flat_optim, rng

    def resume(self) -> None:
        """Continue from the newest intact checkpoint, saying which broken ones were passed over."""
        checkpoints = self.checkpoints()
        for path in reversed(checkpoints):
            try:
                self.load_checkpoint(path)
            except BrokenCheckpoint as err:
                if self.world.is_main:
                    console.print(f"[yellow]{self.stage.name}: checkpoint {path.name} cannot be used "
                                  f"({escape(str(err))}); falling back to the one before it[/]")
                continue
            if self.world.is_main:
                console.print(f"[bold]{self.stage.name}[/]: resumed from {path} (step {self.step})")
            return
        raise MobileMoEError(f"none of the {len(checkpoints)} checkpoint(s) in {self.dir / 'checkpoints'} can be "
                             "read (see above). Move that directory away to train the stage from its start.")

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> float:
        self.model.eval()
        with self.runtime.autocast():
            loss = heldout_loss(self.model, self.data, self._mixture(), self.stage.seq_len, self.stage.batch_size,
                                self.stage.eval_batches)
        self.model.train()
        return loss

    # --- the loop ---------------------------------------------------------------------------------
    def run(self, resume: bool) -> StageResult:
        s, world = self.stage, self.world
        existing = self.checkpoints()
        if existing and not resume:
            raise MobileMoEError(f"{self.dir} already has checkpoints; pass --resume to continue that run, or "
                                 "choose another --out")
        if existing:
            self.resume()
        metrics_file = self.dir / "metrics.jsonl"
        self.dir.mkdir(parents=True, exist_ok=True)
        if world.is_main:
            _drop_records_after(metrics_file, self.step)
        writer = _tensorboard(self.out / "tensorboard", world)
        self.model.train()
        started, val_loss, warned = time.perf_counter(), math.nan, set()
        with progress(disable=not world.is_main) as bar, metrics_file.open("a") as metrics:
            task = bar.add_task(s.name, total=s.steps, completed=self.step, info="")
            while self.step < s.steps:
                lr = lr_at(self.step, s)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, load = 0.0, None
                step_started = time.perf_counter()
                for micro in range(s.grad_accum):
                    inputs, targets = (t.to(self.runtime.device, non_blocking=True) for t in next(self.batches))
                    with self.runtime.autocast():
                        out = self.model(inputs, targets)
                    (out.loss / s.grad_accum).backward()
                    loss_sum += out.lm_loss.item() / s.grad_accum
                    if out.expert_load is not None:
                        load = out.expert_load if micro == 0 else load + out.expert_load
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
                loss = all_mean(loss_sum, world)
                if not math.isfinite(loss) or not torch.isfinite(grad_norm):
                    good = self.checkpoints()
                    raise MobileMoEError(
                        f"stage '{s.name}': the loss became {loss} at step {self.step}; stopped without updating "
                        f"the weights. Last good checkpoint: {good[-1] if good else 'none'}. Lower lr (now {lr:.2e}) "
                        "or raise warmup_steps in the recipe, then rerun with --resume.")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for moe in parallel.unwrap(self.model).moe_layers():
                    parallel.all_reduce_sum(moe.load_since_update, world)
                parallel.unwrap(self.model).update_expert_bias()
                self.step += 1
                tok_s = self.tokens_per_step / (time.perf_counter() - step_started)
                record: dict[str, Any] = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": loss,
                                          "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                                          "peak_memory_mb": peak_memory_mb()}
                if self.peak_flop_s is not None:
                    record["mfu"] = tok_s * self.model_flops_per_token / self.peak_flop_s
                if load is not None:
                    load = parallel.all_reduce_sum(load.clone(), world)
                    record["expert_load"] = (load / load.sum(-1, keepdim=True)).tolist()
                    record["max_violation"] = float((load.max(-1).values / load.mean(-1) - 1).mean())
                if self.step % s.eval_every == 0 or self.step == s.steps:
                    val_loss = self.evaluate()
                    if math.isnan(val_loss) and world.is_main and "val_loss" not in warned:
                        warned.add("val_loss")
                        console.print(f"[yellow]{s.name}: the data has no held-out targets for this mixture (hub "
                                      "streams have none; prepared data: raise val_fraction in the data recipe): "
                                      "val_loss is not measured and best/ is not written[/]")
                    if math.isfinite(val_loss):
                        record["val_loss"] = val_loss
                    if val_loss < self.best_val:
                        self.best_val = val_loss
                        self._save_weights(self.dir / "best")
                if world.is_main and (self.step % s.log_every == 0 or "val_loss" in record or self.step == s.steps):
                    metrics.write(json.dumps(record, allow_nan=False) + "\n")
                    metrics.flush()
                    _log_tensorboard(writer, s.name, record)
                info = f"loss {loss:.3f}  lr {lr:.1e}  {tok_s:,.0f} tok/s" + (
                    f"  MFU {record['mfu']:.1%}" if "mfu" in record else "") + (
                    f"  val {val_loss:.3f}" if math.isfinite(val_loss) else "")
                bar.update(task, completed=self.step, info=info)
                if self.step % s.checkpoint_every == 0 and self.step < s.steps:
                    self.save_checkpoint()
        if writer is not None:
            writer.close()
        final = self.dir / "final"
        self._save_weights(final, int4=s.kind == "qat")
        parallel.barrier(world)
        return StageResult(s.name, s.kind, self.step, self.step * self.tokens_per_step, _finite(val_loss),
                           _finite(self.best_val),
                           time.perf_counter() - started, self.count.active, self.count.total,
                           6 * self.count.active, str(final))

    def _save_weights(self, path: Path, int4: bool = False) -> None:
        """Weights only, under the Transformer's own names (collective: call on every rank). `int4` writes
        the QAT stage's real INT4 output: `quantize_weight` uses the fake quantizers' exact maths (int4 g32; int8
        rows for an 8-bit embedding/head), so these are the integers QAT trained against."""
        weights = plain_state(self.model)
        if not self.world.is_main:
            return
        if int4:
            plain = Transformer(self.cfg)
            plain.load_state_dict(weights)
            save_model(path, plain, self.tokenizer, int4=True, force=True, scheme=self.qat_scheme)  # our run dir
        else:
            save_model(path, self.raw_model, self.tokenizer, tensors=weights, force=True, scheme=self.qat_scheme)


# The fields that fix the tensors' shapes and how they are wired: a checkpoint trains under a recipe's model
# only if these agree. The others (its name, RoPE base, norm epsilon, context length, balancing knobs) may
# differ; the recipe's values are used, and a change to how the weights compute is printed.
ARCHITECTURE_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "qk_norm",
                       "tie_embeddings", "ffn_size", "n_routed_experts", "expert_size", "top_k", "n_shared_experts",
                       "shared_expert_size", "moe_layer_step", "router")
NOT_COMPUTE_FIELDS = ("name", "max_seq_len", "bias_update_rate", "aux_loss_coef", "z_loss_coef")


def check_same_architecture(checkpoint: ModelConfig, recipe: ModelConfig, what: str) -> None:
    """Refuse a checkpoint whose architecture differs from the recipe's model; print other differences."""
    ours, theirs = checkpoint.to_dict(), recipe.to_dict()
    differ = [f"{k} {ours[k]} vs {theirs[k]}" for k in ARCHITECTURE_FIELDS if ours[k] != theirs[k]]
    if differ:
        raise MobileMoEError(f"{what} '{checkpoint.name}' model whose architecture differs from the recipe's model "
                             f"'{recipe.name}' ({'; '.join(differ)}); point init_from at a checkpoint of this "
                             "architecture, or make the recipe's model match it")
    changed = [f"{k} {ours[k]} -> {theirs[k]}" for k in ours
               if k not in ARCHITECTURE_FIELDS + NOT_COMPUTE_FIELDS and not _close(ours[k], theirs[k])]
    if changed:
        console.print(f"[yellow]note[/]: {what} '{checkpoint.name}' model, trained here with the recipe's values: "
                      + "; ".join(changed))


def _close(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-6 relative (an f32 1e-5 read back from a file is 9.9999997e-06)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, data: Any, mixture: list[tuple[str, float]], seq_len: int, batch_size: int,
                 max_batches: int) -> float:
    """Mean next-token loss over the val splits of `mixture`'s sources, weighted like the mixture."""
    from mobilemoe.data.loader import IGNORE_INDEX

    total, weights = 0.0, 0.0
    device = next(model.parameters()).device
    for name, weight in mixture:
        losses = [model(x.to(device), y.to(device)).lm_loss.item()
                  for x, y in data.eval_batches(name, seq_len, batch_size, max_batches)
                  if (y != IGNORE_INDEX).any()]  # a batch without targets has no loss (NaN)
        if losses:
            total, weights = total + weight * sum(losses) / len(losses), weights + weight
    return total / weights if weights else math.nan


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights with QAT parametrizations resolved to their latent float values, keyed as in Transformer."""
    return {_plain_key(k): v.float().contiguous() for k, v in parallel.full_model_state(model).items()}


class BrokenCheckpoint(MobileMoEError):
    """A checkpoint directory with a missing, truncated or corrupt file."""


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: a loss that was never measured is null."""
    return value if math.isfinite(value) else None


def _drop_records_after(metrics_file: Path, step: int) -> None:
    """Keep the metrics of steps up to `step`: a run resumed from a checkpoint replays the steps after it, which
    an interrupted run may already have logged (and a torn last line is dropped)."""
    if not metrics_file.is_file():
        return
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(metrics_file, "".join(f"{line}\n" for line in kept))


def _plain_key(key: str) -> str:
    return key.replace("parametrizations.", "").replace(".original", "")


def all_mean(value: float, world: parallel.World) -> float:
    t = parallel.all_reduce_sum(torch.tensor([value], dtype=torch.float64), world)
    return float(t.item() / world.size)


def _tensorboard(path: Path, world: parallel.World):
    if not world.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def _log_tensorboard(writer, stage: str, record: dict[str, Any]) -> None:
    if writer is None:
        return
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_mb", "max_violation"):
        if key in record:
            writer.add_scalar(f"{stage}/{key}", record[key], record["tokens"])


def run_recipe(recipe: Recipe | str | Path | dict, out_dir: str | Path, stage: str | None = None,
               resume: bool = False, parallel_mode: str = "ddp", force: bool = False) -> dict[str, Any]:
    """Run every stage in order (or only `stage`), each from the previous stage's final weights.

    A stage whose `final/` exists is done and skipped. Returns the summary also written to summary.json.
    `out_dir` must be new, empty or a run directory (`force`: write into it anyway; nothing is deleted).
    """
    recipe = as_recipe(recipe)
    out = Path(out_dir)
    device = resolve_device(recipe.device)
    world = parallel.init_world(device)
    runtime = Runtime(device, recipe.precision, recipe.compile, recipe.activation_checkpointing,
                      fsdp_mixed_precision=recipe.precision == "bf16" and parallel_mode == "fsdp" and world.distributed)
    if world.is_main:
        console.print(f"training on {runtime.describe()}")
    selected = [recipe.stage(stage)] if stage else recipe.stages  # an unknown --stage fails before any work
    data = None
    if world.is_main:  # prepare once; the other ranks then open the cached result
        claim_dir(out, "run", force)
        data = open_data(recipe)  # before the run directory exists: bad data leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
        mark_dir(out, "run")
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(_recipe_dict(recipe), sort_keys=False))
    parallel.barrier(world)
    if data is None:
        data = open_data(recipe)
    summary_file = out / "summary.json"
    try:
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"stages": {}}
        summary["stages"].items()
    except (ValueError, KeyError, AttributeError, TypeError):
        raise MobileMoEError(f"{summary_file} is truncated or corrupt; delete it (stages then count as not done and "
                             "train again) or restore it") from None
    for s in selected:
        index = recipe.stages.index(s)
        final = out / s.name / "final"
        if final.exists() and s.name in summary["stages"]:
            if world.is_main:
                console.print(f"[bold]{s.name}[/]: done already ({final}); skipping")
            continue
        init = _stage_input(recipe, index, out)
        result = StageTrainer(recipe, s, index, out, data, init, world, parallel_mode, runtime).run(resume)
        summary["stages"][s.name] = asdict(result)
        summary.update(asdict(result))
        if world.is_main:
            atomic_write_text(summary_file, json.dumps(summary, indent=2, allow_nan=False))
            val = (f"val loss {result.final_val_loss:.4f} (best {result.best_val_loss:.4f})"
                   if result.final_val_loss is not None else "no held-out data")
            console.print(f"[bold green]{s.name}[/] done: {result.steps} steps, {result.tokens:,} tokens, {val}, "
                          f"{result.wall_time_s:.0f}s -> {final}")
    return summary


def open_data(recipe: Recipe) -> Any:
    """The recipe's data: its prepared data recipe (built on first use), or its hub datasets, streamed."""
    if recipe.hub_data:
        from mobilemoe.data.streaming import HubData

        return HubData(recipe.hub_data, recipe.tokenizer, recipe.base_dir)
    from mobilemoe.data import prepare

    return prepare(recipe.data_path())


def _stage_input(recipe: Recipe, index: int, out: Path) -> Path | None:
    stage = recipe.stages[index]
    if stage.init_from in [s.name for s in recipe.stages[:index]]:  # an earlier stage of this run
        path = out / stage.init_from / "final"
        if not (path / "config.json").is_file():
            raise MobileMoEError(f"stage '{stage.name}' starts from stage '{stage.init_from}''s final weights at "
                                 f"{path}, which do not exist: run `mobilemoe train ... --stage {stage.init_from}` "
                                 "first")
        return path
    if stage.init_from:
        path = Path(stage.init_from)
        if not (path / "config.json").is_file():
            raise MobileMoEError(f"stage '{stage.name}': init_from {path} is not a checkpoint directory "
                                 "(no config.json)")
        return path
    if index == 0:
        return None
    previous = recipe.stages[index - 1]
    path = out / previous.name / "final"
    if not (path / "config.json").is_file():
        raise MobileMoEError(f"stage '{stage.name}' starts from stage '{previous.name}''s final weights at {path}, "
                             f"which do not exist: run `mobilemoe train ... --stage {previous.name}` first, or set "
                             f"init_from for stage '{stage.name}' in the recipe")
    return path


def _recipe_dict(recipe: Recipe) -> dict[str, Any]:
    d = asdict(recipe)
    d.pop("base_dir")
    if recipe.data is not None:
        d["data"] = str(recipe.data_path())
    return d
