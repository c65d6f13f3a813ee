"""`python -m mobilemoe.eval.lm_eval_cli ...`: lm-eval's own command line with the `mobilemoe` backend registered.

Takes exactly `lm_eval`'s arguments, e.g.
    python -m mobilemoe.eval.lm_eval_cli run --model mobilemoe --model_args checkpoint=DIR --tasks arc_easy
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import mobilemoe.eval.lm_eval_backend  # noqa: F401  (registers the backend)

if __name__ == "__main__":
    cli_evaluate()
