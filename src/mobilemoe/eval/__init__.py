"""Zero-shot evaluation: lm-eval's tasks and metrics on the real benchmark data, and an lm-eval backend.

    from mobilemoe.eval import evaluate, results_table_markdown
    result = evaluate("runs/quickstart/moe/qat/final", tasks="arc_easy,hellaswag", limit=200)
    print(results_table_markdown(result))

The package imports nothing heavy until one of these names is used (the CLI imports it at startup).
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "results_table_markdown", "plot_comparison", "fetch", "DEFAULT_SUITE", "TASKS"]
_WHERE = {"evaluate": "runner", "results_table_markdown": "runner", "plot_comparison": "runner", "fetch": "data",
          "DEFAULT_SUITE": "tasks", "TASKS": "tasks"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mobilemoe.eval' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f"mobilemoe.eval.{_WHERE[name]}"), name)
