"""Interop and deployment: Hugging Face transformers, released checkpoints, GGUF (llama.cpp), ExecuTorch.

Each target maps our weights onto an existing architecture of that runtime by name only; the numbers
are never changed, so an export either matches our model exactly or is refused with a reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this package at startup; torch is imported only when needed
    from mobilemoe.checkpoint import LoadedModel


def as_loaded(source: str | Path | LoadedModel) -> LoadedModel:
    """A checkpoint directory or an already loaded model."""
    from mobilemoe.checkpoint import LoadedModel, load_model

    return source if isinstance(source, LoadedModel) else load_model(source)
