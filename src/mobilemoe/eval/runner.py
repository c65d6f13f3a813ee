"""`evaluate()`: load a model, run tasks, aggregate lm-eval's metrics; results tables, JSON and plots.

A result is a plain dict (what `results.json` holds):
    {"model": label, "source": str, "int4": bool, "limit": N|None, "tasks": {name: {"metrics": {...},
     "primary": metric, "score": float, "n": int, "split": str}}, "average": float|None, "table": markdown}
Accuracy-type scores are fractions in [0, 1]; tables show them as percentages.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import string
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mobilemoe.checkpoint import LoadedModel
from mobilemoe.errors import MobileMoEError
from mobilemoe.eval.tasks import MultipleChoice, Task, Text, resolve_tasks
from mobilemoe.io import atomic_write_text, claim_dir, mark_dir
from mobilemoe.model import Transformer
from mobilemoe.quantize import PAPER_SCHEME, Int4Scheme
from mobilemoe.tokenizer import Tokenizer

PERCENT_METRICS = ("acc", "acc_norm", "exact_match")


def load_for_eval(source: str | Path | LoadedModel | Transformer, tokenizer: str | Path | Tokenizer | None = None,
                  int4: bool = False, scheme: Int4Scheme | None = None) -> LoadedModel:
    """A model to evaluate: a checkpoint directory (float or INT4), a directory written by `mobilemoe export hf`,
    a released facebook/MobileMoE-* directory, a preset name (random weights: a chance-level baseline), a
    LoadedModel or a Transformer. `tokenizer` (a tokenizer.json or a directory) overrides the model's own.
    `int4`: quantize a float model's weights to our INT4 format (PTQ, group 32) first, as `scheme` says; None:
    the scheme the checkpoint records (a QAT stage's float weights record what they were trained against), else
    the paper's. The returned `scheme` is the one the INT4 weights follow."""
    from mobilemoe.checkpoint import load_model
    from mobilemoe.config import PRESETS, get_preset

    if isinstance(source, LoadedModel):
        loaded = source
    elif isinstance(source, Transformer):
        loaded = LoadedModel(source.eval(), None, False, Path(source.cfg.name))
    elif Path(source).is_dir():
        directory = Path(source)
        config_file = directory / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type == "mobilemoe":
            from mobilemoe.export.released import load_released
            loaded = load_released(directory)
        elif model_type is not None:
            from mobilemoe.export.hf import import_hf
            loaded = import_hf(directory)
        else:
            loaded = load_model(directory)
    elif str(source) in PRESETS:
        import torch

        torch.manual_seed(0)
        loaded = LoadedModel(Transformer(get_preset(str(source))).eval(), None, False, Path(str(source)))
    else:
        raise MobileMoEError(f"cannot evaluate '{source}': not a directory and not a preset. Pass a checkpoint "
                             f"directory (config.json + model.safetensors), an HF export directory or one of the "
                             f"presets: {', '.join(PRESETS)}")
    if tokenizer is not None:
        loaded.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if loaded.tokenizer is None:
        raise MobileMoEError(f"{loaded.path} has no tokenizer (tokenizer.json is missing); pass one with "
                             "--tokenizer PATH (Python: tokenizer=...): the tokenizer.json the model was trained with")
    if loaded.tokenizer.vocab_size > loaded.model.cfg.vocab_size:
        raise MobileMoEError(f"tokenizer {loaded.tokenizer.source} has {loaded.tokenizer.vocab_size} tokens but the "
                             f"model's vocabulary has {loaded.model.cfg.vocab_size}: they do not belong together")
    if int4 and not loaded.int4:
        if isinstance(source, LoadedModel | Transformer):  # the caller's model stays float
            loaded = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, False, loaded.path, loaded.scheme)
        loaded.scheme = scheme or loaded.scheme
        quantize_weights_int4(loaded.model, loaded.scheme)
        loaded.int4 = True
    return loaded


def quantize_weights_int4(model: Transformer, scheme: Int4Scheme = PAPER_SCHEME) -> None:
    """Post-training INT4 in place: every weight the INT4 format stores is replaced by its round trip through
    `quantize_weight` / `dequantize` (group 32, fp16 scales; `scheme`), so the model computes exactly what an
    INT4 checkpoint of it computes (`save_model(..., int4=True, scheme=scheme)` then `load_model`)."""
    import torch

    from mobilemoe.quantize import dequantize, is_quantized_weight, quantize_weight

    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_quantized_weight(name, param):
                param.copy_(dequantize(*quantize_weight(name, param, scheme)))


def evaluate(model: str | Path | LoadedModel | Transformer, tasks: str | Sequence[str | Task] | None = None,
             limit: int | None = None, batch_size: int = 8, tokenizer: str | Path | Tokenizer | None = None,
             label: str | None = None, show_progress: bool = True, int4: bool = False,
             scheme: Int4Scheme | None = None, resume_dir: str | Path | None = None) -> dict[str, Any]:
    """Zero-shot scores of `model` on `tasks` (names, a comma-separated string, Task objects; None: the
    14-task default suite). `limit` caps the documents per task; `int4` evaluates the INT4 PTQ (g32) of a
    float model, quantized as `scheme` says (None: as the checkpoint records, see `load_for_eval`).
    `resume_dir`: each finished task's result is written there (tasks/<name>.json, atomically) and a task
    already there for the same model, settings and limit is not run again, so a long evaluation can be stopped
    and continued. Returns the result dict described above."""
    from mobilemoe.eval.scoring import Scorer
    from mobilemoe.ui import progress

    task_list = resolve_tasks(tasks)  # unknown names fail before the model loads
    examples = {task.name: task.examples(limit) for task in task_list}  # and missing data too
    loaded = load_for_eval(model, tokenizer, int4, scheme)
    scheme = loaded.scheme
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size)
    settings = {"source": str(Path(loaded.path).resolve()), "int4": loaded.int4, "limit": limit,
                "int4_scheme": dataclasses.asdict(scheme) if int4 else None,
                "tokenizer": str(loaded.tokenizer.source)}
    done_dir = Path(resume_dir) / "tasks" if resume_dir is not None else None
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with progress(disable=not show_progress) as bar:
        for task in task_list:
            done = _read_json(done_dir / f"{task.name}.json") if done_dir else None
            if done and done.get("settings") == settings:
                results[task.name] = done["result"]
                continue
            todo = examples[task.name]
            bar_id = bar.add_task(task.name, total=_request_count(scorer, todo), info=f"{len(todo)} docs")
            metrics = run_task(scorer, task, todo, lambda n, bar_id=bar_id: bar.advance(bar_id, n))
            results[task.name] = {"metrics": metrics, "primary": task.primary, "score": metrics[task.primary],
                                  "n": len(todo), "split": task.split}
            if done_dir:
                (_results_dir(done_dir.parent) / "tasks").mkdir(exist_ok=True)
                atomic_write_text(done_dir / f"{task.name}.json",
                                  json.dumps({"settings": settings, "result": results[task.name]}, indent=2))
    suite = [r["score"] for r in results.values() if r["primary"] in PERCENT_METRICS]
    name = label or result_label(loaded.path, int4, scheme)
    result = {"model": name, "source": str(loaded.path), "int4": loaded.int4, "int4_scheme": settings["int4_scheme"],
              "limit": limit, "tasks": results, "average": sum(suite) / len(suite) if suite else None,
              "seconds": round(time.perf_counter() - started, 1)}
    result["table"] = results_table_markdown(result)
    return result


def result_label(path: str | Path, int4: bool = False, scheme: Int4Scheme = PAPER_SCHEME) -> str:
    """The name results are shown and (lower-cased) stored under: the model's label, + INT4 and its scheme."""
    return model_label(path) + (f" INT4{scheme.suffix}" if int4 else "")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _request_count(scorer, examples: list) -> int:
    return sum(len(e.pairs) if isinstance(e, MultipleChoice) else
               len(scorer.rolling_windows(e.text)) if isinstance(e, Text) else 1 for e in examples)


def run_task(scorer, task: Task, examples: list, advance: Callable[[int], None]) -> dict[str, float]:
    """lm-eval's metrics for one task, aggregated over `examples`."""
    if not examples:
        raise MobileMoEError(f"task {task.name} has no documents to score")
    if task.kind == "multiple_choice":
        metrics = multiple_choice_metrics(examples, scorer.loglikelihood([p for e in examples for p in e.pairs],
                                                                         advance))
        return {m: metrics[m] for m in task.metrics}
    if task.kind == "loglikelihood":
        scored = scorer.loglikelihood([(e.context, e.continuation) for e in examples], advance)
        return {"acc": sum(g for _, g in scored) / len(scored),
                "perplexity": math.exp(-sum(ll for ll, _ in scored) / len(scored))}
    if task.kind == "generate":
        answers = scorer.generate_until([e.context for e in examples], examples[0].until, advance=advance)
        hits = sum(exact_match(a.lstrip(), e.targets, e.ignore_regexes) for a, e in zip(answers, examples, strict=True))
        return {"exact_match": hits / len(examples)}
    windows = [scorer.rolling_windows(e.text) for e in examples]
    total = sum(ll for ll, _ in scorer.loglikelihood_tokens([w for ws in windows for w in ws], advance))
    tokens = sum(len(cont) for ws in windows for _, cont in ws)
    n_bytes = sum(len(e.text.encode("utf-8")) for e in examples)
    return {"perplexity": math.exp(-total / tokens), "bits_per_byte": -total / n_bytes / math.log(2),
            "tokens": tokens, "bytes": n_bytes}


def multiple_choice_metrics(examples: Sequence[MultipleChoice], loglikelihoods: Sequence[tuple[float, bool]]
                            ) -> dict[str, float]:
    """lm-eval's acc and acc_norm from the (log-likelihood, is_greedy) of every choice of every question, in order."""
    lls = iter(loglikelihoods)
    acc = acc_norm = 0.0
    for e in examples:
        scores = [next(lls)[0] for _ in e.pairs]
        acc += argmax(scores) == e.gold
        acc_norm += argmax([s / len(c) for s, c in zip(scores, e.choices, strict=True)]) == e.gold
    return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}


def argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's argmax, which lm-eval uses, breaks ties the same way)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def exact_match(prediction: str, targets: Sequence[str], ignore_regexes: Sequence[str] = ()) -> bool:
    """lm-eval's exact_match with ignore_case and ignore_punctuation, true if any target matches."""
    def normalize(text: str) -> str:
        for regex in ignore_regexes:
            text = re.sub(regex, "", text)
        return text.lower().translate(str.maketrans("", "", string.punctuation))

    return any(normalize(prediction) == normalize(t) for t in targets)


def _cell(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if metric in PERCENT_METRICS else f"{value:.3f}"


def results_table_markdown(results: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """One result: a row per task with every metric. Several: a row per task, a column per model."""
    if isinstance(results, dict):
        lines = ["| task | split | n | metric | score | acc | acc_norm | other |", "|---|---|---|---|---|---|---|---|"]
        for name, r in results["tasks"].items():
            m = r["metrics"]
            other = ", ".join(f"{k} {v:.4g}" for k, v in m.items()
                              if k not in ("acc", "acc_norm", r["primary"]))
            lines.append(f"| {name} | {r['split']} | {r['n']} | {r['primary']} | **{_cell(r['primary'], r['score'])}**"
                         f" | {_cell('acc', m.get('acc'))} | {_cell('acc_norm', m.get('acc_norm'))} | {other} |")
        if results.get("average") is not None:
            lines.append(f"| **average** | | | | **{_cell('acc', results['average'])}** | | | |")
        return "\n".join(lines)
    names = list(dict.fromkeys(name for r in results for name in r["tasks"]))
    lines = ["| task | metric | " + " | ".join(r["model"] for r in results) + " |",
             "|---|---|" + "---|" * len(results)]
    for name in names:
        metric = next(r["tasks"][name]["primary"] for r in results if name in r["tasks"])
        cells = [_cell(metric, r["tasks"][name]["score"]) if name in r["tasks"] else "-" for r in results]
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    lines.append("| **average** | | " + " | ".join(_cell("acc", r.get("average")) for r in results) + " |")
    return "\n".join(lines)


def model_label(path: str | Path) -> str:
    """A name that tells checkpoints of different runs apart: a directory named final, best or step-N gets up to
    three parents (stopping at `runs`), e.g. runs/qs/qat/final -> qs-qat-final."""
    parts = Path(path).resolve().parts
    label = [parts[-1]]
    generic = label[0] in ("final", "best") or label[0].startswith("step-")
    for part in reversed(parts[:-1]) if generic else ():
        if part in ("runs", "/") or len(label) == 4:
            break
        if part != "checkpoints":
            label.insert(0, part)
    return "-".join(label)


def claim_results_dir(out_dir: str | Path, source: str | Path, force: bool = False) -> Path:
    """Check, before evaluating, that results of `source` may go into `out_dir` (see `write_results`); nothing is
    created yet (a failed evaluation leaves nothing behind)."""
    out = claim_dir(out_dir, "eval-results", force)
    saved = _read_json(out / "results.json")
    previous = saved.get("source") if isinstance(saved, dict) else None
    if previous is not None and Path(previous).resolve() != Path(source).resolve() and not force:
        raise MobileMoEError(f"{out} holds the results of another model ({previous}); nothing was written. Pass "
                             "--out DIR for these results, or --force to replace those.")
    return out


def _results_dir(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    mark_dir(out, "eval-results")
    return out


def write_results(result: dict[str, Any], out_dir: str | Path, force: bool = False) -> list[Path]:
    """results.json and results.md into `out_dir`; results of another model there are replaced only with `force`."""
    out = _results_dir(claim_results_dir(out_dir, result.get("source", ""), force))
    written = []
    for name, text in (("results.json", json.dumps(result, indent=2)), ("results.md", result["table"] + "\n")):
        atomic_write_text(out / name, text)
        written.append(out / name)
    return written


def read_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    try:
        result = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MobileMoEError(f"cannot read eval results {file}: {err}") from None
    if "tasks" not in result:
        raise MobileMoEError(f"{file} is not a results.json written by `mobilemoe eval`")
    return result


def plot_comparison(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars: per task (primary metric) and the average, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in dict.fromkeys(n for r in results for n in r["tasks"])
             if all(r["tasks"].get(n, {}).get("primary", "acc") in PERCENT_METRICS for r in results)]
    rows = [*names, "average"]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows) * max(1, len(results) / 2)), 4.5))
    for i, r in enumerate(results):
        values = [100 * (r["tasks"][n]["score"] if n in r["tasks"] else math.nan) for n in names]
        values.append(100 * r["average"] if r.get("average") is not None else math.nan)
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=r["model"])
    ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(rows))], rows, rotation=45, ha="right")
    ax.set_ylabel("score (%) — primary metric")
    ax.set_title("Zero-shot benchmarks")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
