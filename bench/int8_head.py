"""The 8-bit embedding/head's logits on our kernel (`q4.w8_linear`) vs aten's `_weight_int8pack_mm` (the engine's
kernel before), and the 4-bit head, on a real checkpoint: the same INT4 layers, side by side in one process.

    .venv/bin/python bench/int8_head.py CKPT [--threads 1,2] [--context 256] [--tokens 256]

CKPT: a float checkpoint, quantized at load twice (`--int4 --embedding-bits 4` and `8`, as `generate` does).
Speed: decode tok/s at `--context` (C decode step; the 8-bit heads run in Python after it), the three taking
turns in every round (median), and the head alone for 1 and 256 positions (prefill/eval with the head at every
position). Accuracy: greedy tokens of the 8-bit engine with our head vs aten's over `--tokens` from a Moby Dick
prompt (free-running, then teacher-forced on aten's tokens: argmax agreement, logits error).
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from mobilemoe.checkpoint import load_model, model_tensors
from mobilemoe.infer.bench import interleaved, real_text_ids, teacher_forced
from mobilemoe.infer.engine import Int8Head, build_int4_model
from mobilemoe.infer.generate import generate_tokens
from mobilemoe.model import Transformer
from mobilemoe.quantize import Int4Scheme
from mobilemoe.tokenizer import Tokenizer


class AtenInt8Head(nn.Module):
    """The 8-bit head as the engine computed it before: aten's weight-only int8 CPU kernel, same weights."""

    def __init__(self, head: Int8Head):
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).float().contiguous(), self.head.qweight,
                                      self.head.scales)
        return y.view(*x.shape[:-1], self.head.out_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    loaded = load_model(args.checkpoint)
    cfg, tokenizer = loaded.model.cfg, loaded.tokenizer
    e4, e8 = (build_int4_model(cfg, model_tensors(loaded.model, int4=True, scheme=Int4Scheme(embedding_bits=bits)))
              for bits in (4, 8))
    del loaded
    ours = e8.lm_head
    aten = AtenInt8Head(ours)
    heads = {"8-bit head, aten": aten, "8-bit head, ours": ours}

    with torch.inference_mode():
        agreement(e8, heads, tokenizer, args.tokens)
        ids = real_text_ids(args.context + args.steps, cfg.vocab_size, tokenizer)
        for model in (e4, e8):
            model.setup_cache(1, len(ids))
            model(torch.tensor([ids[:args.context]]), input_pos=torch.arange(args.context))
        runs = [(e4, None), (e8, aten), (e8, ours)]

        # every round re-decodes the same positions (the KV cache slots are rewritten)
        def decode(run: tuple[Transformer, nn.Module | None]) -> None:
            model, head = run
            if head is not None:
                model.lm_head = head
            for pos in range(args.context, args.context + args.steps):
                model(torch.tensor([[ids[pos]]]), input_pos=torch.tensor([pos]))

        hidden = {m: torch.randn(m, cfg.d_model) for m in (1, 256)}
        print("\n| threads | decode tok/s: 4-bit head | 8-bit, aten | 8-bit, ours | ours / aten | ours / 4-bit | "
              "head ms (1 position): aten / ours | head ms (256 positions): aten / ours |")
        print("|---|---|---|---|---|---|---|---|")
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            tok_s = [args.steps / s for s in interleaved(runs, decode, args.rounds)]
            head_ms = {m: [1e3 * s for s in interleaved([aten, ours], lambda h, m=m: h(hidden[m]), args.rounds)]
                       for m in hidden}
            print(f"| {threads} | {tok_s[0]:.1f} | {tok_s[1]:.1f} | {tok_s[2]:.1f} | {tok_s[2] / tok_s[1]:.2f}x | "
                  f"{tok_s[2] / tok_s[0]:.2f}x | {head_ms[1][0]:.2f} / {head_ms[1][1]:.2f} | "
                  f"{head_ms[256][0]:.1f} / {head_ms[256][1]:.1f} |")
        e8.lm_head = ours


def agreement(engine: Transformer, heads: dict[str, nn.Module], tokenizer: Tokenizer, n_tokens: int) -> None:
    """Greedy tokens of `engine` with each head: free-running, then teacher-forced on the first head's tokens."""
    prompt = real_text_ids(512, engine.cfg.vocab_size, tokenizer)
    first, second = heads
    out = {}
    for name, head in heads.items():
        engine.lm_head = head
        out[name] = list(generate_tokens(engine, prompt, n_tokens))
    same = next((i for i, (a, b) in enumerate(zip(out[first], out[second], strict=True)) if a != b), n_tokens)
    sequence = prompt + out[first]
    logits = {}
    for name, head in heads.items():
        engine.lm_head = head
        logits[name] = teacher_forced(engine, sequence, len(prompt))
    errors = ((logits[second] - logits[first]).abs().amax(-1) / logits[first].abs().amax(-1)).sort().values
    agree = (logits[second].argmax(-1) == logits[first].argmax(-1)).sum().item()
    print(f"prompt {len(prompt)} tokens; free-running greedy, {second} vs {first}: the first {same} of {n_tokens} "
          f"tokens equal; teacher-forced: next-token argmax equal at {agree} of {len(errors)} steps, logits error "
          f"median {errors[len(errors) // 2]:.1e}, max {errors[-1]:.1e}")


if __name__ == "__main__":
    main()
