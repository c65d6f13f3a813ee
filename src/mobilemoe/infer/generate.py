"""Prefill + decode with a static KV cache; greedy, temperature, top-k and top-p sampling; stop tokens; chat."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mobilemoe.errors import MobileMoEError
from mobilemoe.infer.engine import compile_decode
from mobilemoe.model import Transformer


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0


def sample(logits: Tensor, s: Sampling, generator: torch.Generator) -> int:
    """Next token from the last position's logits [V]."""
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) > s.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.inference_mode()
def generate_tokens(model: Transformer, prompt: list[int], max_new_tokens: int, sampling: Sampling | None = None,
                    stop_ids: set[int] | frozenset = frozenset(), max_context: int | None = None,
                    cache_dtype: torch.dtype | None = None, compile: bool = False,
                    cached: int | None = None) -> Iterator[int]:
    """Yield generated token ids one by one (streaming); stops at a stop token or `max_new_tokens`.
    `compile` captures the decode step with torch.compile (see `engine.compile_decode`). `cached`: the caller
    has set up the model's KV cache (`max_context` long) and its first `cached` positions already hold the
    prompt's first tokens, which are not computed again; None sets up a fresh cache for this call.
    `cache_dtype` None: the model's own KV cache default (fp32; the INT4 engine's fp16)."""
    sampling = sampling or Sampling()
    max_context = max_context or model.cfg.max_seq_len
    if not prompt:
        raise MobileMoEError("the prompt is empty")
    if len(prompt) >= max_context:
        raise MobileMoEError(f"the prompt has {len(prompt)} tokens but the context holds {max_context} (the model's "
                             f"max_seq_len is {model.cfg.max_seq_len}); shorten the prompt")
    total = min(max_context, len(prompt) + max_new_tokens)
    if cached is None:
        model.setup_cache(1, total, cache_dtype)
    start = min(cached or 0, len(prompt) - 1)  # at least the last prompt token is run, for its logits
    generator = torch.Generator().manual_seed(sampling.seed)
    decode_step = compile_decode(model) if compile else model
    device = model.inv_freq.device
    logits = model(torch.tensor([prompt[start:]], device=device),
                   input_pos=torch.arange(start, len(prompt), device=device),
                   logits_at=last_position(len(prompt) - start, device)).logits[0, -1]
    for pos in range(len(prompt), total):
        token = sample(logits, sampling, generator)
        yield token
        if token in stop_ids or pos + 1 >= total:
            return
        logits = decode_step(torch.tensor([[token]], device=device), input_pos=torch.tensor([pos], device=device)
                             ).logits[0, -1]


def last_position(n_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`logits_at` for a prefill of n tokens: the head runs at the last one only, the one generation samples
    from (as llama.cpp's prefill; the head at every prompt position was up to a third of the prefill's work)."""
    return torch.tensor([n_tokens - 1], device=device)


def stream_text(tokenizer, tokens: Iterator[int], out: list[int],
                on_token: Callable[[str], None] | None = None) -> str:
    """Decode generated tokens as they come (appended to `out`, stop token excluded), streaming new text pieces."""
    shown = ""
    for token in tokens:
        if token in tokenizer.stop_ids():
            break
        out.append(token)
        text = tokenizer.decode(out)
        if on_token is not None:
            on_token(text[len(shown):])
        shown = text
    return shown


def generate_text(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 64,
                  sampling: Sampling | None = None, on_token: Callable[[str], None] | None = None,
                  cache_dtype: torch.dtype | None = None, chat: bool = False, compile: bool = False) -> str:
    """Generate a continuation (or, with `chat`, an assistant reply) as text, streaming pieces to `on_token`."""
    ids = (tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0] if chat
           else tokenizer.encode(prompt, start=True))
    tokens = generate_tokens(model, ids, max_new_tokens, sampling, tokenizer.stop_ids(), cache_dtype=cache_dtype,
                             compile=compile)
    return stream_text(tokenizer, tokens, [], on_token)


class ChatSession:
    """A conversation: every turn renders the whole conversation through the checkpoint's chat template; the KV
    cache keeps the longest prefix the new rendering shares with what was already computed (usually all but the
    new user turn), so only the rest is prefilled."""

    def __init__(self, model: Transformer, tokenizer, max_context: int, sampling: Sampling | None = None,
                 cache_dtype: torch.dtype | None = None, compile: bool = False):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling or Sampling()
        self.max_context = min(max_context, model.cfg.max_seq_len)
        self.compile = compile
        self.messages: list[dict[str, str]] = []
        self.in_cache: list[int] = []  # tokens whose keys/values the model's cache holds, position by position
        model.setup_cache(1, self.max_context, cache_dtype)

    def reply(self, text: str, max_new_tokens: int, on_token: Callable[[str], None] | None = None) -> str:
        """The assistant's answer to `text` in this conversation, streamed to `on_token`."""
        ids = self.tokenizer.encode_chat([*self.messages, {"role": "user", "content": text}],
                                         add_generation_prompt=True)[0]
        if len(ids) >= self.max_context:
            raise MobileMoEError(f"the conversation has grown to {len(ids)} tokens and the context holds "
                                 f"{self.max_context}; start a new chat (or raise --max-context, up to the model's "
                                 f"max_seq_len {self.model.cfg.max_seq_len})")
        shared = next((i for i, (a, b) in enumerate(zip(self.in_cache, ids, strict=False)) if a != b),
                      min(len(self.in_cache), len(ids)))
        out: list[int] = []
        tokens = generate_tokens(self.model, ids, max_new_tokens, self.sampling, self.tokenizer.stop_ids(),
                                 self.max_context, compile=self.compile, cached=shared)
        answer = stream_text(self.tokenizer, tokens, out, on_token)
        # a reply cut at the length limit ends with a token never run through the model (a stop token is not in `out`)
        limit = min(self.max_context, len(ids) + max_new_tokens) - len(ids)
        self.in_cache = ids + (out[:-1] if len(out) == limit else out)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer
