"""Verbs of the training room: train, plot."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> None:
    from mobilemoe.train import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    run_recipe(recipe, args.out or f"runs/{recipe.name}", stage=args.stage, resume=args.resume,
               parallel_mode=args.parallel)


def _plot(args: argparse.Namespace) -> None:
    from mobilemoe.train.plots import plot_run
    from mobilemoe.ui import console

    for path in plot_run(args.run, args.out):
        console.print(f"wrote {path}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a recipe's stages (pretrain, midtrain, sft, qat) in order, or one stage")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--stage", help="run only this stage (it starts from the previous stage's final weights)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="data parallelism under torchrun (default ddp)")
    p.set_defaults(handler=_train)

    p = sub.add_parser("plot", help="loss curves and expert-load heat maps of a run, as PNG")
    p.add_argument("run", help="run directory written by `mobilemoe train`")
    p.add_argument("--out", help="output directory (default <run>/plots)")
    p.set_defaults(handler=_plot)
