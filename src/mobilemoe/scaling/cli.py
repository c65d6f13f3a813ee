"""`mobilemoe scaling sweep|fit|plan`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mobilemoe.argtypes import byte_size, non_negative_int, number, positive_float, positive_int


def _sweep(args: argparse.Namespace) -> None:
    from mobilemoe.scaling.sweep import run_sweep
    from mobilemoe.ui import console

    console.print(f"results: {run_sweep(args.spec, args.out)}")


def _fit(args: argparse.Namespace) -> None:
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.scaling.fit import fit_table, load_table, write_fit
    from mobilemoe.ui import console

    rename = {}
    for item in args.rename:
        if "=" not in item:
            raise MobileMoEError(f"--rename takes 'Their Column=ours', got {item!r}")
        theirs, ours = item.split("=", 1)
        rename[theirs] = ours
    table = load_table(args.table, rename)
    result = fit_table(table, args.law, source=str(args.table), bootstrap=args.bootstrap,
                       drop_highest=args.drop_highest)
    out = Path(args.out or Path(args.table).parent)
    for key, group in result.groups.items():
        coefs = ", ".join(f"{k}={v:.4g} [{group.ci95[k][0]:.3g}, {group.ci95[k][1]:.3g}]" if k in group.ci95
                          else f"{k}={v:.4g}" for k, v in group.coefficients.items())
        console.print(f"[bold]{key}[/] ({group.n_points} points, R2 {group.quality['r2']:.3f}): {coefs}")
    for key, why in result.skipped.items():
        console.print(f"[yellow]skipped {key}[/]: {why}")
    for path in write_fit(result, table, out):
        console.print(f"wrote {path}")


def _plan(args: argparse.Namespace) -> None:
    from rich.table import Table

    from mobilemoe.scaling.laws import load_law, paper_scale_law
    from mobilemoe.scaling.plan import decode_tok_s, load_profile, pareto_plot, plan
    from mobilemoe.ui import console

    law = load_law(args.law) if args.law else paper_scale_law()
    profile = load_profile(args.device) if args.device else None
    memory = args.memory * 4 / args.bits  # the budget holds INT4 weights; other widths scale
    feasible, scored = plan(law, memory, args.max_active, args.tokens, args.decode_tok_s, profile)
    table = Table(title=f"best architectures under {args.memory / 1e9:g} GB of INT{args.bits} weights, "
                        f"<= {args.max_active:.3g} active, {args.tokens:.3g} tokens (law: {law.source})")
    for col in ("rank", "architecture", "active", "total", "INT4 memory", "predicted loss", "decode tok/s"):
        table.add_column(col)
    for rank, c in enumerate(feasible[: args.top], 1):
        table.add_row(str(rank), c.label(), f"{c.active / 1e6:.0f}M", f"{c.total / 1e9:.2f}B",
                      f"{c.int4_bytes / 1e9:.2f} GB", f"{c.predicted_loss:.4f}",
                      f"{decode_tok_s(c, profile):.0f} ({profile.name})" if profile else "-")
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pareto_plot(scored, feasible[0], out / "pareto.png", memory, args.max_active)
    console.print(f"wrote {out / 'pareto.png'}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scaling", help="scaling-law sweeps, fits and the memory/compute-constrained planner")
    verbs = p.add_subparsers(dest="scaling_verb", required=True, metavar="<sweep|fit|plan>")

    s = verbs.add_parser("sweep", help="train a grid of architectures resumably; results.csv")
    s.add_argument("spec", help="sweep spec YAML, e.g. recipes/scaling/cpu_sweep.yaml")
    s.add_argument("--out", help="output directory (default from the spec)")
    s.set_defaults(handler=_sweep)

    f = verbs.add_parser("fit", help="fit a law (Huber on log loss, L-BFGS, bootstrap CIs); JSON + plots")
    f.add_argument("table", help="csv/parquet with params, tokens (or flops), loss [, experts, top_k, granularity,"
                                 " shared]")
    f.add_argument("--law", choices=["chinchilla", "joint-moe"], default="chinchilla")
    f.add_argument("--rename", nargs="*", default=[], help="'Their Column=ours', e.g. 'Model Size=params'")
    f.add_argument("--bootstrap", type=non_negative_int, default=100)
    f.add_argument("--drop-highest", type=non_negative_int, default=0, help="leave out the N highest-loss points")
    f.add_argument("--out", help="output directory (default: next to the table)")
    f.set_defaults(handler=_fit)

    q = verbs.add_parser("plan", help="lowest predicted loss under memory / active-parameter / latency budgets")
    q.add_argument("--memory", type=byte_size, default="3GB", help="weight memory budget, e.g. 3GB")
    q.add_argument("--bits", type=number(int, 1, 32), default=4, help="weight bits the budget holds (1-32)")
    q.add_argument("--max-active", type=positive_float, default=1e9)
    q.add_argument("--tokens", type=positive_float, default=6e12)
    q.add_argument("--decode-tok-s", type=positive_float, help="minimum decode speed (needs --device)")
    q.add_argument("--device", help="device profile name (snapdragon-8-elite, apple-a18-pro, dimensity-9400, "
                                    "this-cpu) or yaml path")
    q.add_argument("--law", help="law JSON from `scaling fit` (default: the shipped paper-scale set)")
    q.add_argument("--top", type=positive_int, default=10)
    q.add_argument("--out", default="plan_results")
    q.set_defaults(handler=_plan)
