"""Log-likelihoods, rolling perplexity and greedy generation from our Transformer, computed the way
lm-eval 0.4.13's `TemplateLM` + HF backend compute them, so that both give the same numbers:

- text is encoded as the HF backend's `tok_encode` does: with the tokenizer's own special tokens, so the
  model's BOS comes first when its tokenizer_config asks for one (`add_bos_token`), unless the text already
  starts with it; a (context, continuation) pair as `_encode_pair` does: trailing spaces of the context move
  to the continuation, the whole string is encoded and split after the context's tokens; an empty context,
  and the first window of a text, are conditioned on the prefix token (`prefix_token_id`: the model's named
  BOS token, else end of text);
- the model sees (context + continuation)[:-1], left-truncated to `max_length`, and the continuation's
  log-probability is the sum over its tokens; `is_greedy` says whether argmax decoding reproduces it.

Requests sharing a context share one pass over it, and short requests are packed into one sequence per
forward pass (`Scorer.loglikelihood_tokens`); only float rounding differs from one request per row.
Generation decodes left-padded batches of documents through the KV cache (`Scorer.greedy_until`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import Tokenizer

TokenPair = tuple[list[int], list[int]]


class Scorer:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 8, max_length: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.cfg.max_seq_len
        self.device = next(model.parameters()).device
        # lm-eval's prefix_token_id on the HF backend: the tokenizer's bos_token_id (named even where the
        # tokenizer adds none, e.g. SmolLM2's <|im_start|>), else its end-of-text token
        self.prefix_id = tokenizer.named_ids().get("bos_token", tokenizer.eos_id)
        self._prefix_text = tokenizer.decode([self.prefix_id])

    def encode(self, text: str) -> list[int]:
        """lm-eval's `tok_encode`: the BOS first when the tokenizer adds one, unless `text` already starts with it."""
        return self.tokenizer.encode(text, start=not text.startswith(self._prefix_text))

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        if context == "":
            tokens = self.tokenizer.encode(continuation)
            return ([self.prefix_id], tokens) if tokens[0] != self.prefix_id else (tokens[:1], tokens[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_len = len(self.encode(context))
        return whole[:context_len], whole[context_len:]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], advance: Callable[[int], None] | None = None
                      ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) for each (context, continuation)."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], advance)

    @torch.inference_mode()
    def loglikelihood_tokens(self, requests: Sequence[TokenPair], advance: Callable[[int], None] | None = None
                             ) -> list[tuple[float, bool]]:
        """The numbers of lm-eval's HF backend, computed with less work: requests whose (truncated) contexts are
        the same token list — the choices of one question — share one pass over that context, and short
        groups are packed into one sequence (positions restart per group, a mask keeps each continuation to
        its own context), the head computed only where a continuation token is predicted. Each continuation
        token still sees exactly its context and its own preceding tokens, so only float rounding differs."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, continuation) in enumerate(requests):
            if len(continuation) > self.max_length:
                raise MobileMoEError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                                     f"{self.max_length}-token context")
            whole = (context + continuation)[-(self.max_length + 1):]  # what the model sees, plus the last token
            groups.setdefault(tuple(whole[:len(whole) - len(continuation)]), []).append(i)
        packs: list[list[tuple[tuple[int, ...], list[int]]]] = []
        size = 0
        for context, members in sorted(groups.items(), key=lambda g: -self._group_tokens(requests, *g)):
            tokens = self._group_tokens(requests, context, members)
            if not packs or size + tokens > 128 * self.batch_size:  # a longer group runs alone
                packs.append([])
                size = 0
            packs[-1].append((context, members))
            size += tokens
        for pack in packs:
            for i, scored in self._score_pack(requests, pack):
                results[i] = scored
            if advance:
                advance(sum(len(members) for _, members in pack))
        return results

    @staticmethod
    def _group_tokens(requests: Sequence[TokenPair], context: tuple[int, ...], members: list[int]) -> int:
        return len(context) + sum(len(requests[i][1]) - 1 for i in members)

    def _score_pack(self, requests: Sequence[TokenPair], pack: list[tuple[tuple[int, ...], list[int]]]
                    ) -> list[tuple[int, tuple[float, bool]]]:
        tokens: list[int] = []
        positions: list[int] = []
        attends: list[tuple[slice, slice]] = []  # (rows, columns) that may attend, causally within the rows
        predicted_at: list[int] = []  # rows whose logits predict each continuation token, request by request
        for context, members in pack:
            own = slice(len(tokens), len(tokens) + len(context))
            tokens += context
            positions += range(len(context))
            attends.append((own, own))
            for i in members:
                continuation = requests[i][1]
                rows = slice(len(tokens), len(tokens) + len(continuation) - 1)
                tokens += continuation[:-1]
                positions += range(len(context), len(context) + len(continuation) - 1)
                attends += [(rows, own), (rows, rows)]
                predicted_at += [own.stop - 1, *range(rows.start, rows.stop)]
        mask = None  # one context and one continuation: the plain causal mask is exactly right
        if len(pack) > 1 or len(pack[0][1]) > 1:
            n = len(tokens)
            mask = torch.zeros(n, n, dtype=torch.bool)
            for rows, columns in attends:
                mask[rows, columns] = True
            mask &= torch.ones(n, n, dtype=torch.bool).tril()
        logits = self.model(torch.tensor([tokens], device=self.device),
                            positions=torch.tensor(positions, device=self.device),
                            mask=None if mask is None else mask.to(self.device),
                            logits_at=torch.tensor(predicted_at, device=self.device)).logits[0]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        out, offset = [], 0
        for i in (i for _, members in pack for i in members):
            continuation = torch.tensor(requests[i][1], device=self.device)
            part = logprobs[offset:offset + len(continuation)]
            offset += len(continuation)
            out.append((i, (float(part.gather(-1, continuation[:, None]).sum()),
                            bool((part.argmax(-1) == continuation).all()))))
        return out

    def rolling_windows(self, text: str) -> list[TokenPair]:
        """lm-eval's loglikelihood_rolling windows: disjoint chunks of max_length tokens, each conditioned on
        the token before it (the prefix token for the first)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            self.encode(text), self.prefix_id, self.max_length, context_len=1)]

    def generate_until(self, contexts: Sequence[str], until: Sequence[str], max_new_tokens: int = 32,
                       advance: Callable[[int], None] | None = None) -> list[str]:
        """Greedy continuation of each context, cut before the first stop string (lm-eval's generate_until)."""
        prompts = [(self.encode(context) or [self.prefix_id])[-(self.max_length - max_new_tokens):]
                   for context in contexts]
        texts = [self.tokenizer.decode(tokens) for tokens in self.greedy_until(prompts, until, max_new_tokens, advance)]
        for stop in until:
            texts = [text.split(stop)[0] for text in texts]
        return texts

    @torch.inference_mode()
    def greedy_until(self, prompts: Sequence[list[int]], until: Sequence[str], max_new_tokens: int,
                     advance: Callable[[int], None] | None = None) -> list[list[int]]:
        """Greedy tokens after each prompt, up to a stop token (left out), a stop string or `max_new_tokens`.
        Prompts are decoded 4 x `batch_size` at a time through the model's KV cache, longest first (as lm-eval's
        HF backend batches them): left-padded, each row at its own positions and blind to padding, so every row
        computes what it would alone (tests: the same tokens as one prompt at a time). 4 x: a batch lasts as long
        as its longest answer, so more rows share that tail; 32 rows (the default) of a TriviaQA batch keep at
        most ~120 MB of KV cache on SmolLM2-135M."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), 4 * self.batch_size):
            rows = order[start:start + 4 * self.batch_size]
            for i, tokens in zip(rows, self._greedy_batch([prompts[i] for i in rows], until, max_new_tokens),
                                 strict=True):
                outputs[i] = tokens
            if advance:
                advance(len(rows))
        for block in self.model.layers:  # back to the cache-free model the other requests are scored on
            block.attn.kv_cache = None
        self.model.causal_mask = None
        return outputs

    def _greedy_batch(self, prompts: list[list[int]], until: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """One batch of `greedy_until`; a row that has stopped leaves the batch (its rows of the cache are dropped)."""
        width = max(map(len, prompts))
        total = width + max_new_tokens
        columns = torch.arange(total, device=self.device)
        pads = torch.tensor([width - len(p) for p in prompts], device=self.device)
        positions = (columns - pads[:, None]).clamp(min=0)  # [B, total]: each row's own positions
        # [B, 1, total, total]: causal, never to a row's padding; a padding query sees itself (its output is
        # unused) so no softmax row is empty and no NaN reaches the cache
        mask = ((columns >= pads[:, None])[:, None, :] & (columns[:, None] >= columns)
                | torch.eye(total, dtype=torch.bool, device=self.device))[:, None]
        self.model.setup_cache(len(prompts), total)
        tokens = torch.tensor([[self.prefix_id] * (width - len(p)) + p for p in prompts], device=self.device)
        logits = self.model(tokens, input_pos=columns[:width], positions=positions[:, :width],
                            mask=mask[:, :, :width], logits_at=columns[width - 1:width]).logits[:, -1]
        stops = self.tokenizer.stop_ids()
        generated: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))  # the rows still decoding, in the order the batch holds them
        for column in range(width, total):
            kept = []
            for at, token in enumerate(logits.argmax(-1).tolist()):
                row = live[at]
                if token in stops:
                    continue
                generated[row].append(token)
                if not any(stop in self.tokenizer.decode(generated[row]) for stop in until):
                    kept.append(at)
            if not kept or column + 1 == total:
                return generated
            if len(kept) < len(live):
                keep = torch.tensor(kept, device=self.device)
                for block in self.model.layers:
                    block.attn.kv_cache.keep_rows(keep)
                positions, mask = positions[keep], mask[keep]
                live = [live[at] for at in kept]
            logits = self.model(torch.tensor([[generated[row][-1]] for row in live], device=self.device),
                                input_pos=columns[column:column + 1], positions=positions[:, column:column + 1],
                                mask=mask[:, :, column:column + 1]).logits[:, -1]
        return generated
