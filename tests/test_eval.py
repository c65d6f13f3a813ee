"""Evaluation: scorer vs hand-computed log-likelihoods, metrics, lm-eval agreement, messages. Tiny random models."""

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mobilemoe.checkpoint import save_model
from mobilemoe.config import get_preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.eval import data
from mobilemoe.eval.runner import evaluate, load_for_eval, read_results, results_table_markdown, run_task
from mobilemoe.eval.scoring import Scorer
from mobilemoe.eval.tasks import Task, get_task, multiple_choice_example, text_task
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import IM_START, Tokenizer, train_bpe

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Question: where do birds live? Answer: in trees.",
             "Paris is the capital of France, and the Seine runs through it."]
QUESTIONS = [  # (question, choices, gold); choices of different lengths so acc and acc_norm can differ
    ("Where do birds live?", ["in trees", "under the sea floor", "on Mars"], 0),
    ("What is the capital of France?", ["Paris", "a very large brown fox", "Rome"], 0),
    ("Which animal is quick?", ["the dog", "the fox"], 1),
    ("What runs through Paris?", ["the Seine", "a lazy dog", "nothing at all", "birds"], 0),
    ("Is the dog lazy? ", ["yes", "no"], 0),  # trailing space: lm-eval moves it into the continuation
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("eval") / "ckpt"
    save_model(directory, Transformer(get_preset("micro-moe")), train_bpe(SENTENCES * 5, vocab_size=300))
    return directory


def local_task() -> Task:
    examples = [multiple_choice_example(f"Question: {q}\nAnswer:", c, g) for q, c, g in QUESTIONS]
    return Task("local_mc", "multiple_choice", lambda: examples, ("acc", "acc_norm"), "acc", "test")


def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log P(continuation token | prefix) from one unbatched forward pass, split as lm-eval splits."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    logprobs = F.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    return sum(float(logprobs[pos - 1, whole[pos]]) for pos in range(n_context, len(whole)))


def test_batched_scores_equal_hand_computed_loglikelihoods(checkpoint):
    loaded = load_for_eval(checkpoint)
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=3)  # padded batches of mixed lengths
    pairs = [p for ex in local_task().examples() for p in ex.pairs]
    with torch.no_grad():
        want = [hand_loglikelihood(loaded.model, loaded.tokenizer, c, x) for c, x in pairs]
    got = [ll for ll, _ in scorer.loglikelihood(pairs)]
    assert got == pytest.approx(want, abs=1e-4)

    metrics = run_task(scorer, local_task(), local_task().examples(), lambda n: None)
    lls = iter(want)
    acc = acc_norm = 0
    for _, choices, gold in QUESTIONS:
        scores = [next(lls) for _ in choices]
        acc += scores.index(max(scores)) == gold
        normed = [s / len(c) for s, c in zip(scores, choices, strict=True)]
        acc_norm += normed.index(max(normed)) == gold
    assert metrics == {"acc": acc / len(QUESTIONS), "acc_norm": acc_norm / len(QUESTIONS)}


def test_greedy_flag_and_perplexity_on_text(checkpoint, tmp_path):
    loaded = load_for_eval(checkpoint)
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=2)
    text = " ".join(SENTENCES)
    ids = loaded.tokenizer.encode(text)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[loaded.tokenizer.eos_id, *ids[:-1]]])).logits[0]
    greedy = [loaded.tokenizer.eos_id]
    with torch.no_grad():
        for _ in range(4):  # a continuation the model itself produces by argmax decoding
            greedy.append(int(loaded.model(torch.tensor([greedy])).logits[0, -1].argmax()))
    (_, is_greedy), (_, not_greedy) = scorer.loglikelihood_tokens(
        [(greedy[:1], greedy[1:]), (greedy[:1], [*greedy[1:4], (greedy[4] + 1) % 300])])
    assert not not_greedy
    assert is_greedy

    file = tmp_path / "heldout.txt"
    file.write_text(text)
    metrics = run_task(scorer, text_task(file), text_task(file).examples(), lambda n: None)
    total = float(F.log_softmax(logits.double(), -1).gather(-1, torch.tensor(ids)[:, None]).sum())
    assert metrics["tokens"] == len(ids) and metrics["bytes"] == len(text.encode())
    assert metrics["bits_per_byte"] == pytest.approx(-total / len(text.encode()) / math.log(2), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(-total / len(ids)), rel=1e-5)
    packed = tmp_path / "heldout.jsonl.gz"  # the shipped corpus's format: one {"text": ...} document per line
    with gzip.open(packed, "wt") as f:
        f.write(json.dumps({"text": text}) + "\n")
    assert run_task(scorer, text_task(packed), text_task(packed).examples(), lambda n: None) == metrics


def test_evaluate_float_and_int4_tables_and_compare(checkpoint, tmp_path, monkeypatch):
    from mobilemoe.checkpoint import load_model
    from mobilemoe.cli import main

    loaded = load_model(checkpoint)
    save_model(tmp_path / "int4", loaded.model, loaded.tokenizer, int4=True)
    results = [evaluate(path, [local_task()], show_progress=False) for path in (checkpoint, tmp_path / "int4")]
    assert results[1]["int4"] and not results[0]["int4"]
    # --int4 on the float checkpoint (PTQ in memory) computes exactly what the saved INT4 checkpoint computes
    ptq = load_for_eval(checkpoint, int4=True)
    assert ptq.int4 and torch.equal(ptq.model(torch.tensor([[1, 2, 3]])).logits,
                                    load_for_eval(tmp_path / "int4").model(torch.tensor([[1, 2, 3]])).logits)
    assert evaluate(checkpoint, [local_task()], show_progress=False, int4=True)["tasks"] == results[1]["tasks"]
    for r in results:
        assert set(r["tasks"]) == {"local_mc"} and r["average"] == r["tasks"]["local_mc"]["score"]
        assert "| local_mc | test | 5 | acc |" in r["table"]
    for name, r in zip(("a", "b"), results, strict=True):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r | {"model": name}))
    assert read_results(tmp_path / "a")["model"] == "a"
    assert results_table_markdown([read_results(tmp_path / "a"), read_results(tmp_path / "b")]).startswith(
        "| task | metric | a | b |")
    monkeypatch.chdir(tmp_path)
    main(["eval", "--compare", "a", "b/results.json", "--out", "cmp"])
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0 and (tmp_path / "cmp" / "compare.md").exists()


def test_python_int4_eval_follows_the_scheme_the_checkpoint_records(checkpoint, tmp_path):
    """A QAT stage's float checkpoint records the scheme it trained against; `evaluate(..., int4=True)` from
    Python quantizes as it says (as the CLI does), and an explicit scheme still wins."""
    from mobilemoe.checkpoint import load_model
    from mobilemoe.quantize import PAPER_SCHEME, Int4Scheme

    loaded = load_model(checkpoint)
    eight_bit = Int4Scheme(embedding_bits=8)
    save_model(tmp_path / "qat", loaded.model, loaded.tokenizer, scheme=eight_bit)
    follows = load_for_eval(tmp_path / "qat", int4=True)
    explicit = load_for_eval(checkpoint, int4=True, scheme=eight_bit)
    assert follows.scheme == eight_bit and torch.equal(follows.model.embed.weight, explicit.model.embed.weight)
    assert not torch.equal(follows.model.embed.weight, load_for_eval(checkpoint, int4=True).model.embed.weight)
    result = evaluate(tmp_path / "qat", [local_task()], show_progress=False, int4=True)
    assert result["int4_scheme"]["embedding_bits"] == 8 and result["model"].endswith(eight_bit.suffix)
    assert load_for_eval(tmp_path / "qat", int4=True, scheme=PAPER_SCHEME).scheme == PAPER_SCHEME


def test_evaluate_resumes_finished_tasks(checkpoint, tmp_path, monkeypatch):
    import mobilemoe.eval.runner as runner

    first = evaluate(checkpoint, [local_task()], show_progress=False, resume_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "tasks" / "local_mc.json").read_text())
    assert saved["result"] == first["tasks"]["local_mc"]
    monkeypatch.setattr(runner, "run_task", lambda *a: pytest.fail("a finished task was run again"))
    assert evaluate(checkpoint, [local_task()], show_progress=False, resume_dir=tmp_path / "out")["tasks"] == \
        first["tasks"]
    with pytest.raises(pytest.fail.Exception):  # other settings (here INT4) are not taken from the saved file
        evaluate(checkpoint, [local_task()], show_progress=False, resume_dir=tmp_path / "out", int4=True)


def write_lm_eval_task(directory, name: str) -> None:
    docs = directory / f"{name}.jsonl"
    docs.write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}) + "\n" for q, c, g in QUESTIONS))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def test_lm_eval_agrees_exactly_through_our_backend_and_the_hf_export(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import mobilemoe.eval.lm_eval_backend  # noqa: F401  (registers "mobilemoe")
    from mobilemoe.export.hf import export_hf

    write_lm_eval_task(tmp_path, "local_mc")
    export_hf(checkpoint, tmp_path / "hf")
    ours = evaluate(checkpoint, [local_task()], show_progress=False)["tasks"]["local_mc"]["metrics"]
    loaded = load_for_eval(checkpoint)
    our_lls = [ll for ll, _ in Scorer(loaded.model, loaded.tokenizer).loglikelihood(
        [p for ex in local_task().examples() for p in ex.pairs])]
    assert 0 < ours["acc"] < 1 and ours["acc"] != ours["acc_norm"]  # a test that can tell the metrics apart
    for model, args in (("mobilemoe", f"checkpoint={checkpoint}"), ("hf", f"pretrained={tmp_path / 'hf'},device=cpu")):
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["local_mc"], batch_size=2,
                                      task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
        theirs = out["results"]["local_mc"]
        assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm"]), model
        samples = sorted(out["samples"]["local_mc"], key=lambda s: s["doc_id"])
        their_lls = [float(r[0][0]) for s in samples for r in s["resps"]]
        # our backend runs our Scorer, but in lm-eval's batches: float32 rounding of other padded shapes only
        assert their_lls == pytest.approx(our_lls, abs=1e-5 if model == "mobilemoe" else 1e-4), model


def test_error_messages(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(MobileMoEError, match="unknown task 'hellaswg'. Did you mean 'hellaswag'.*Known tasks: arc_"):
        get_task("hellaswg")
    no_tokenizer = tmp_path / "no_tok"
    save_model(no_tokenizer, Transformer(get_preset("micro-moe")))
    with pytest.raises(MobileMoEError, match="has no tokenizer.*--tokenizer PATH"):
        evaluate(no_tokenizer, [local_task()], show_progress=False)
    with pytest.raises(MobileMoEError, match="not a directory and not a preset"):
        evaluate(tmp_path / "nowhere", [local_task()], show_progress=False)
    monkeypatch.setenv("MOBILEMOE_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(data.BenchmarkDataMissing, match="task 'piqa' needs the benchmark data.*mobilemoe eval --fetch"):
        evaluate(checkpoint, "piqa", limit=2, show_progress=False)


def test_batched_generation_equals_one_prompt_at_a_time_and_exact_match(checkpoint):
    """Generation runs left-padded batches through the KV cache, rows leaving as they stop: token for token what
    greedy decoding of one prompt at a time by full forward passes gives."""
    from mobilemoe.eval.runner import exact_match

    tokenizer = load_for_eval(checkpoint).tokenizer
    torch.manual_seed(0)
    model = Transformer(get_preset("micro-moe")).eval()
    model.init_weights(0.2)  # larger than at init, so that what is generated depends on the whole prompt
    contexts = ["Question: where do birds live?\nAnswer:", "The quick", "Paris is the capital of France, and",
                "Is the dog lazy?", "", "The quick brown fox jumps over the lazy dog. The quick brown fox jumps",
                "birds"]
    until = ["q", "$"]
    scorer = Scorer(model, tokenizer, batch_size=1)  # 4 rows: two batches
    prompts = [scorer.encode(context) or [scorer.prefix_id] for context in contexts]
    one_by_one = []
    with torch.no_grad():
        for prompt in prompts:
            new: list[int] = []
            while len(new) < 8 and not any(stop in tokenizer.decode(new) for stop in until):
                token = int(model(torch.tensor([prompt + new])).logits[0, -1].argmax())
                if token in tokenizer.stop_ids():
                    break
                new.append(token)
            one_by_one.append(new)
    assert 1 <= min(map(len, one_by_one)) < max(map(len, one_by_one)) == 8  # rows stop early and late
    assert scorer.greedy_until(prompts, until, 8) == one_by_one
    texts = [tokenizer.decode(tokens).split("q")[0].split("$")[0] for tokens in one_by_one]
    assert Scorer(model, tokenizer, batch_size=8).generate_until(contexts, until, 8) == texts
    assert all(block.attn.kv_cache is None for block in model.layers)  # scoring continues without it
    assert exact_match("The Seine!", ["seine"], ["\\b(?:The |the )"]) and not exact_match("Rhine", ["Seine"])


@pytest.mark.parametrize("config", [{"bos_token": IM_START, "add_bos_token": True}, {"bos_token": IM_START}],
                         ids=["adds-bos", "names-bos-only"])
def test_bos_and_prefix_token_as_lm_eval_hf_backend(checkpoint, config, tmp_path):
    """A tokenizer that asks for a BOS (add_bos_token, as Llama's do) gets it in front of every context, text and
    prompt, except one already starting with it; an empty context and a text's first window are conditioned on
    the named BOS even where none is added (SmolLM2's case). Request by request equal to lm-eval's HF backend,
    and our lm-eval backend does the same."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from mobilemoe.eval.lm_eval_backend import MobileMoELM
    from mobilemoe.export.hf import to_hf

    loaded = load_for_eval(checkpoint, Tokenizer(load_for_eval(checkpoint).tokenizer.hf, "bos", config))
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=2)
    hf_model, hf_tokenizer = to_hf(loaded)
    lm = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=2)
    bos = loaded.tokenizer.named_ids()["bos_token"]
    pairs = [("Question: where do birds live?\nAnswer:", " in trees"), ("", "The quick brown fox"),
             (IM_START + "Paris is the capital of", " France")]
    for context, continuation in pairs[::2]:
        assert scorer.encode_pair(context, continuation) == lm._encode_pair(context, continuation)
    assert (scorer.encode_pair(*pairs[0])[0][0] == bos) == bool(config.get("add_bos_token"))
    assert scorer.encode_pair(*pairs[1])[0] == [bos] and scorer.encode(pairs[2][0]).count(bos) == 1
    their_lls = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    assert [ll for ll, _ in scorer.loglikelihood(pairs)] == pytest.approx(their_lls, abs=1e-4)
    loaded.tokenizer.save(tmp_path / "tokenizer.json")
    backend = MobileMoELM(str(checkpoint), tokenizer=str(tmp_path / "tokenizer.json"))
    assert [ll for ll, _ in backend.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
            ] == pytest.approx(their_lls, abs=1e-4)

    text = " ".join(SENTENCES)
    ours = sum(ll for ll, _ in scorer.loglikelihood_tokens(scorer.rolling_windows(text)))
    assert ours == pytest.approx(lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0],
                                 abs=1e-4)
    context = "Paris is the capital of France, and"
    assert scorer.encode(context) == lm.tok_batch_encode([context])[0][0].tolist()
    request = Instance("generate_until", {}, (context, {"until": ["."], "max_gen_toks": 6, "do_sample": False}), 0)
    assert scorer.generate_until([context], ["."], 6) == lm.generate_until([request])
    stops = [(context, ["."]), ("The quick", ","), ("Paris is", ["."])]  # two batches; lm-eval's until: list or str
    requests = [Instance("generate_until", {}, (c, {"until": u, "max_gen_toks": 6}), i)
                for i, (c, u) in enumerate(stops)]
    assert backend.generate_until(requests) == [scorer.generate_until([c], list(u), 6)[0] for c, u in stops]
