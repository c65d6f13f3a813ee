"""The INT4 engine's fp16 (default) and int8 KV caches vs an fp32 one, on a real checkpoint: greedy tokens, logits.

    .venv/bin/python bench/kv_cache_accuracy.py CKPT [--tokens 256] [--prompt-tokens 512]

CKPT: a float checkpoint (quantized to INT4 at load, as `generate --int4` does) or an INT4 one. The prompt
is Moby Dick through the checkpoint's tokenizer. Free-running greedy decode with each cache (C decode step):
how many tokens are equal to the fp32 cache's before the first difference. Then teacher-forced on the fp32
cache's tokens: each cache's next-token argmax agreement and its logits' error (max |difference| over max
|logit|, per step: median and max). For scale, the same two figures for two fp32-cache computations that differ only
in summation order: the C step vs the engine's torch modules (an int8 activation that rounds the other
way moves 8da4w logits much more than the rounding that caused it). Last, on the text itself: the perplexity of
the text's next `--tokens` tokens after the prompt, decoded one step at a time through each cache; and the
engine before 8da4w (the same INT4 weights with bf16 activations) against this one: its greedy tokens, and its
argmax teacher-forced on the fp32-cache engine's tokens.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from mobilemoe.checkpoint import INT4_FORMAT, load_config, load_model, model_tensors, read_tensors, read_tokenizer
from mobilemoe.infer.bench import real_text_ids, teacher_forced
from mobilemoe.infer.engine import KV_CACHE_DTYPES, build_int4_model, int4_format
from mobilemoe.infer.generate import generate_tokens
from mobilemoe.model import Transformer
from mobilemoe.quantize import dequantize_tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    args = parser.parse_args()
    stored, meta = read_tensors(f"{args.checkpoint}/model.safetensors")
    if meta.get("quantization") == INT4_FORMAT:
        cfg, tokenizer = load_config(args.checkpoint), read_tokenizer(args.checkpoint)
        tensors = int4_format(cfg, stored)
    else:
        loaded = load_model(args.checkpoint)
        cfg, tokenizer, tensors = loaded.model.cfg, loaded.tokenizer, model_tensors(loaded.model, int4=True)
    engine = build_int4_model(cfg, dict(tensors))
    prompt = real_text_ids(args.prompt_tokens, cfg.vocab_size, tokenizer)
    out = {name: list(generate_tokens(engine, prompt, args.tokens, cache_dtype=dtype))
           for name, dtype in KV_CACHE_DTYPES.items()}
    same = {name: next((i for i, (a, b) in enumerate(zip(out[name], out["fp32"], strict=True)) if a != b),
                       args.tokens) for name in ("fp16", "int8")}

    sequence = prompt + out["fp32"]
    runs = {"fp16 cache, C step": (torch.float16, True), "int8 cache, C step": (torch.int8, True),
            "fp32 cache, C step": (torch.float32, True), "fp32 cache, torch modules": (torch.float32, False)}
    logits = {name: teacher_forced(engine, sequence, len(prompt), dtype, c_decode)
              for name, (dtype, c_decode) in runs.items()}
    print(f"{args.checkpoint}: prompt {len(prompt)} tokens, {args.tokens} generated")
    for name, n in same.items():
        print(f"free-running greedy, {name} vs fp32 cache: the first {n} of {args.tokens} tokens equal")
    print(f"teacher-forced on the fp32 cache's tokens, vs {'fp32 cache, C step'}:")
    want = logits["fp32 cache, C step"]
    for name in ("fp16 cache, C step", "int8 cache, C step", "fp32 cache, torch modules"):
        errors = ((logits[name] - want).abs().amax(-1) / want.abs().amax(-1)).sort().values
        agree = (logits[name].argmax(-1) == want.argmax(-1)).sum().item()
        print(f"  {name}: next-token argmax equal at {agree} of {len(errors)} steps; logits error median "
              f"{errors[len(errors) // 2]:.1e}, max {errors[-1]:.1e}")
    text_ids = real_text_ids(args.prompt_tokens + args.tokens, cfg.vocab_size, tokenizer)
    truth = torch.tensor(text_ids[len(prompt):])
    perplexity = {name: F.cross_entropy(teacher_forced(engine, text_ids, len(prompt), dtype), truth).exp().item()
                  for name, dtype in KV_CACHE_DTYPES.items()}
    print(f"perplexity of the text's next {len(truth)} tokens, decoded step by step (C step): "
          + ", ".join(f"{name} cache {value:.3f}" for name, value in perplexity.items()))
    before_8da4w(cfg, tensors, prompt, sequence, want, args.tokens)


@torch.inference_mode()
def before_8da4w(cfg, tensors: dict, prompt: list[int], sequence: list[int], want: torch.Tensor,
                 n_tokens: int) -> None:
    """The engine before 8da4w, for scale: the same INT4 weights dequantized, run with bf16 activations. Its own
    greedy tokens vs the engine's (fp32 cache), and teacher-forced on the engine's tokens: argmax agreement."""
    old = Transformer(cfg)
    old.load_state_dict(dequantize_tensors(tensors))
    old = old.to(torch.bfloat16).eval()
    tokens = list(generate_tokens(old, prompt, n_tokens, cache_dtype=torch.bfloat16))
    same = next((i for i, (a, b) in enumerate(zip(tokens, sequence[len(prompt):], strict=True)) if a != b), n_tokens)
    logits = old(torch.tensor([sequence[:-1]])).logits[0, len(prompt) - 1:].float()
    agree = (logits.argmax(-1) == want.argmax(-1)).sum().item()
    print(f"the engine before 8da4w (bf16 activations, same INT4 weights): free-running, the first {same} of "
          f"{n_tokens} tokens equal; teacher-forced on the engine's tokens, argmax equal at {agree} of {len(want)}")


if __name__ == "__main__":
    main()
