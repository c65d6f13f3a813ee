"""Log-likelihoods, rolling perplexity and greedy generation from our Transformer, computed the way
lm-eval 0.4.13's `TemplateLM` + HF backend compute them, so that both give the same numbers:

- a (context, continuation) pair is encoded as lm-eval's `_encode_pair` does: trailing spaces of the context
  move to the continuation, the whole string is encoded and split after the context's tokens; an empty
  context is replaced by the end-of-text token;
- the model sees (context + continuation)[:-1], left-truncated to `max_length`, and the continuation's
  log-probability is the sum over its tokens; `is_greedy` says whether argmax decoding reproduces it.

Requests are scored longest first in batches (right padding is harmless under causal attention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mobilemoe.model import Transformer
from mobilemoe.tokenizer import Tokenizer

TokenPair = tuple[list[int], list[int]]


class Scorer:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 8, max_length: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.cfg.max_seq_len
        self.device = next(model.parameters()).device

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        if context == "":
            tokens = self.tokenizer.encode(continuation)
            eos = self.tokenizer.eos_id
            return ([eos], tokens) if tokens[0] != eos else (tokens[:1], tokens[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_len = len(self.tokenizer.encode(context))
        return whole[:context_len], whole[context_len:]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], advance: Callable[[int], None] | None = None
                      ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) for each (context, continuation)."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], advance)

    @torch.inference_mode()
    def loglikelihood_tokens(self, requests: Sequence[TokenPair], advance: Callable[[int], None] | None = None
                             ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            inputs = [(requests[i][0] + requests[i][1])[-(self.max_length + 1):][:-1] for i in batch]
            tokens = torch.zeros(len(batch), max(map(len, inputs)), dtype=torch.long)
            for row, ids in enumerate(inputs):
                tokens[row, :len(ids)] = torch.tensor(ids)
            logits = self.model(tokens.to(self.device)).logits
            for row, i in enumerate(batch):
                continuation = torch.tensor(requests[i][1], device=self.device)
                end = len(inputs[row])
                logprobs = F.log_softmax(logits[row, end - len(continuation):end].float(), dim=-1)
                results[i] = (float(logprobs.gather(-1, continuation[:, None]).sum()),
                              bool((logprobs.argmax(-1) == continuation).all()))
            if advance:
                advance(len(batch))
        return results

    def rolling_windows(self, text: str) -> list[TokenPair]:
        """lm-eval's loglikelihood_rolling windows: disjoint chunks of max_length tokens, each conditioned on
        the token before it (the end-of-text token for the first)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            self.tokenizer.encode(text), self.tokenizer.eos_id, self.max_length, context_len=1)]

    @torch.inference_mode()
    def generate_until(self, contexts: Sequence[str], until: Sequence[str], max_new_tokens: int = 32,
                       advance: Callable[[int], None] | None = None) -> list[str]:
        """Greedy continuation of each context, cut before the first stop string (lm-eval's generate_until).
        Rows are decoded together, right-padded: each takes its next token from its own last position."""
        outputs = [""] * len(contexts)
        for start in range(0, len(contexts), self.batch_size):
            rows = list(range(start, min(start + self.batch_size, len(contexts))))
            prompts = {i: (self.tokenizer.encode(contexts[i]) or [self.tokenizer.eos_id])
                       [-(self.max_length - max_new_tokens):] for i in rows}
            generated: dict[int, list[int]] = {i: [] for i in rows}
            active = list(rows)
            for _ in range(max_new_tokens):
                sequences = [prompts[i] + generated[i] for i in active]
                tokens = torch.zeros(len(active), max(map(len, sequences)), dtype=torch.long)
                for row, ids in enumerate(sequences):
                    tokens[row, :len(ids)] = torch.tensor(ids)
                logits = self.model(tokens.to(self.device)).logits
                still = []
                for row, i in enumerate(active):
                    token = int(logits[row, len(sequences[row]) - 1].argmax())
                    if token in self.tokenizer.stop_ids():
                        continue
                    generated[i].append(token)
                    if not any(stop in self.tokenizer.decode(generated[i]) for stop in until):
                        still.append(i)
                active = still
                if not active:
                    break
            for i in rows:
                text = self.tokenizer.decode(generated[i])
                for stop in until:
                    text = text.split(stop)[0]
                outputs[i] = text
            if advance:
                advance(len(rows))
        return outputs
