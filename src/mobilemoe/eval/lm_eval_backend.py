"""MobileMoE as an lm-eval 0.4.13 model backend, registered as `mobilemoe`.

Importing this module registers it; then
    lm_eval --model mobilemoe --model_args checkpoint=DIR[,tokenizer=PATH,max_length=N] --tasks ...
works through `python -m mobilemoe.eval.lm_eval_cli` (lm-eval has no plugin discovery for models), and
`lm_eval.simple_evaluate(model="mobilemoe", model_args="checkpoint=DIR", ...)` works after the import.
The backend scores with `mobilemoe.eval.scoring.Scorer`, the same code `mobilemoe eval` uses, so both give
the same log-likelihoods (up to float32 rounding: lm-eval forms its own batches) and the same acc / acc_norm.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (registers lm-eval's own backends first: get_model skips that if ours is alone)
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from mobilemoe.eval.runner import load_for_eval
from mobilemoe.eval.scoring import Scorer


@register_model("mobilemoe")
class MobileMoELM(TemplateLM):
    def __init__(self, checkpoint: str, tokenizer: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, device: str | None = None, **_ignored):
        super().__init__()
        import torch

        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm_eval's CLI asks for cuda by default
        loaded = load_for_eval(checkpoint, tokenizer)
        self.scorer = Scorer(loaded.model.to(device), loaded.tokenizer,
                             int(batch_size) if str(batch_size).isdigit() else 8,
                             int(max_length) if max_length else None)

    @property
    def eot_token_id(self) -> int:
        return self.scorer.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.scorer.tokenizer.encode(string) if add_special_tokens is False else self.scorer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood_tokens([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in (r.args for r in requests):
            out.append(sum(ll for ll, _ in self.scorer.loglikelihood_tokens(self.scorer.rolling_windows(text))))
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        out = [""] * len(requests)
        batches: dict[tuple[tuple[str, ...], int], list[int]] = {}  # requests with the same stops decode together
        for i, (_, gen_kwargs) in enumerate(r.args for r in requests):
            until = gen_kwargs.get("until", [])
            key = ((until,) if isinstance(until, str) else tuple(until), int(gen_kwargs.get("max_gen_toks", 256)))
            batches.setdefault(key, []).append(i)
        for (until, max_new_tokens), members in batches.items():
            texts = self.scorer.generate_until([requests[i].args[0] for i in members], list(until), max_new_tokens)
            for i, text in zip(members, texts, strict=True):
                out[i] = text
        return out
