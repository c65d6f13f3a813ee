"""Verbs of the training room: train, heldout, plot."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mobilemoe.argtypes import add_int4_scheme_arguments


def _train(args: argparse.Namespace) -> None:
    from mobilemoe.train import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    overrides = {key: getattr(args, key) for key in ("device", "precision", "compile", "activation_checkpointing")
                 if getattr(args, key) is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    if args.embedding_bits is not None or args.rounding is not None:
        from mobilemoe.train.recipe import with_qat_scheme

        recipe = with_qat_scheme(recipe, args.embedding_bits, args.rounding)
    if args.dry_run:
        return _dry_run(recipe, args)
    if args.init_from:
        from mobilemoe.train.recipe import start_from

        recipe = start_from(recipe, args.init_from)
    run_recipe(recipe, args.out or f"runs/{recipe.name}", stage=args.stage, resume=args.resume,
               parallel_mode=args.parallel, force=args.force)


def _dry_run(recipe, args: argparse.Namespace) -> None:
    from rich.table import Table

    from mobilemoe.train.flops import device_peak, flops_per_token, matmul_parameters, recipe_cost
    from mobilemoe.ui import console

    peak = device_peak(args.device_profile)
    rows = recipe_cost(recipe, peak, args.mfu, world_size=args.world_size)
    cfg = recipe.model_config()
    console.print(f"recipe '{recipe.name}' is valid: model {cfg.name}, {matmul_parameters(cfg) / 1e9:.3f}B active "
                  f"matmul parameters, {flops_per_token(cfg, recipe.stages[0].seq_len) / 1e9:.2f} GFLOP per "
                  f"training token at seq {recipe.stages[0].seq_len}")
    table = Table(title=f"cost on {peak.name} (bf16 peak {peak.bf16_tflops:g} TFLOP/s) at {args.mfu:.0%} MFU, "
                  f"{args.world_size} process(es)")
    for column in ("stage", "steps", "tokens", "FLOPs", "GPU-hours"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for r in rows:
        table.add_row(r.stage, f"{r.steps:,}", f"{r.tokens:.3g}", f"{r.flops:.3g}", f"{r.gpu_hours:,.0f}")
    table.add_row("total", f"{sum(r.steps for r in rows):,}", f"{sum(r.tokens for r in rows):.3g}",
                  f"{sum(r.flops for r in rows):.3g}", f"{sum(r.gpu_hours for r in rows):,.0f}")
    console.print(table)


def _heldout(args: argparse.Namespace) -> None:
    from mobilemoe.train.heldout import heldout_losses, heldout_table
    from mobilemoe.ui import console

    rows = heldout_losses(args.recipe, args.checkpoints, stage=args.stage, int4=args.int4,
                          embedding_bits=args.embedding_bits, rounding=args.rounding)
    console.print(f"held-out loss on the val data of stage '{rows[0]['stage']}' of {args.recipe}")
    console.print(heldout_table(rows), markup=False)


def _plot(args: argparse.Namespace) -> None:
    from mobilemoe.train.plots import plot_compare, plot_run
    from mobilemoe.ui import console

    for run in args.run:
        for path in plot_run(run, args.out and Path(args.out) / Path(run).name if len(args.run) > 1 else args.out):
            console.print(f"wrote {path}")
    if len(args.run) > 1:
        out = Path(args.out or ".")
        out.mkdir(parents=True, exist_ok=True)
        console.print(f"wrote {plot_compare(args.run, out / 'compare_loss.png')}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a recipe's stages (pretrain, midtrain, sft, qat) in order, or one stage")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--stage", help="run only this stage (it starts from the previous stage's final weights)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--force", action="store_true", help="write into --out even if it is a non-empty directory "
                   "that is not a run (nothing in it is deleted; files named like ours are replaced)")
    p.add_argument("--init-from", help="checkpoint directory: train its architecture from its weights (sets the "
                   "recipe's model and its first stage's init_from)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="data parallelism under torchrun (default ddp)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: the recipe's "
                   "`device`, else auto: cuda when torch sees a GPU)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="fp32, or bf16 compute with fp32 master weights "
                   "and optimizer state (default: the recipe's `precision`, else fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile each transformer block "
                   "(default: the recipe's `compile`, else off)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, help="recompute each "
                   "block's activations in backward: less memory, ~1/3 more compute (default: the recipe's, else off)")
    p.add_argument("--embedding-bits", type=int, choices=(4, 8), help="qat stages: train the tied embedding/head "
                   "against 4 bits (the paper's) or 8 (int8 per row, as `--int4 --embedding-bits 8` quantizes; "
                   "default: the recipe's `embedding_bits`, else 4); the QAT checkpoint records it")
    p.add_argument("--rounding", choices=("rtn", "hqq"), help="qat stages: round to nearest, what QAT trains against "
                   "(hqq is a post-training choice and is refused here, with the reason)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, build the model on meta and print "
                   "each stage's steps, tokens, FLOPs and GPU-hours; opens no data, trains nothing")
    p.add_argument("--mfu", type=float, default=0.35, help="--dry-run: model FLOPs utilization assumed (default 0.35)")
    p.add_argument("--device-profile", default="h100", help="--dry-run: device peak from train/device_peaks.yaml "
                   "(h100, h200, this-cpu; default h100)")
    p.add_argument("--world-size", type=int, default=1, help="--dry-run: processes the batch is replicated over "
                   "(tokens per step = batch_size x grad_accum x seq_len x world size; default 1)")
    p.set_defaults(handler=_train)

    p = sub.add_parser("heldout", help="held-out loss of checkpoints (float or INT4) on a recipe stage's val data, "
                       "the number the trainer logs as val_loss")
    p.add_argument("recipe", help="recipe YAML whose data and stage define the held-out set")
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories")
    p.add_argument("--stage", help="stage whose mixture, seq_len and eval_batches to use (default: the first sft "
                   "stage)")
    p.add_argument("--int4", action="store_true", help="round float checkpoints to INT4 g32 first (post-training "
                   "quantization); INT4 checkpoints are scored as they are")
    add_int4_scheme_arguments(p)
    p.set_defaults(handler=_heldout)

    p = sub.add_parser("plot", help="loss curves and expert-load heat maps of a run, as PNG")
    p.add_argument("run", nargs="+", help="run directories written by `mobilemoe train`; with several, also "
                   "compare_loss.png with all their loss curves")
    p.add_argument("--out", help="output directory (default <run>/plots; with several runs, <out>/<run name>/ "
                   "each and compare_loss.png in <out>, default .)")
    p.set_defaults(handler=_plot)
