"""`mobilemoe heldout`: held-out loss of any checkpoints on a recipe stage's validation data.

The same number the trainer logs as `val_loss` for that stage (same data, rows and batches), so a parent
model, a stage's output and an INT4 checkpoint (loaded dequantized) are compared on equal terms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobilemoe.checkpoint import load_model
from mobilemoe.train.recipe import Recipe, as_recipe
from mobilemoe.train.trainer import heldout_loss


def heldout_losses(recipe: Recipe | str | Path | dict[str, Any], checkpoints: list[str | Path],
                   stage: str | None = None, int4: bool = False, embedding_bits: int | None = None,
                   rounding: str | None = None) -> list[dict[str, Any]]:
    """[{checkpoint, model, int4, loss}] on the val split of `stage`'s mixture (default: the recipe's first
    sft stage, else its first stage). `int4`: float checkpoints are first rounded to INT4 g32 (PTQ) in the scheme
    each records (a QAT stage's), with `embedding_bits`/`rounding` overriding it."""
    from mobilemoe.data import prepare

    recipe = as_recipe(recipe)
    s = recipe.stage(stage) if stage else next((s for s in recipe.stages if s.kind == "sft"), recipe.stages[0])
    data = prepare(recipe.data_path(), quiet=True)
    rows = []
    for path in checkpoints:
        loaded = load_model(path)
        if int4 and not loaded.int4:
            from mobilemoe.eval.runner import quantize_weights_int4

            loaded.scheme = loaded.scheme.with_overrides(embedding_bits, rounding)
            quantize_weights_int4(loaded.model, loaded.scheme)
            loaded.int4 = True
        data.check_vocab(loaded.model.cfg.vocab_size)
        loss = heldout_loss(loaded.model, data, list(s.mixture.items()), s.seq_len, s.batch_size, s.eval_batches)
        rows.append({"checkpoint": str(path), "model": loaded.model.cfg.name, "int4": loaded.int4,
                     "int4_scheme": loaded.scheme.suffix if loaded.int4 else None, "stage": s.name, "loss": loss})
    return rows


def heldout_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `heldout_losses` rows."""
    lines = ["| checkpoint | weights | held-out loss |", "|---|---|---|"]  # INT4: a QAT output or PTQ
    lines += [f"| {r['checkpoint']} | {'INT4 g32' + r['int4_scheme'] if r['int4'] else 'float'} | {r['loss']:.4f} |"
              for r in rows]
    return "\n".join(lines)
