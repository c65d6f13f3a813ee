"""Decode speed of the same MoE model in transformers' stock implementation (Dots1ForCausalLM, from our HF
export mapping) and in our engine (float, INT4, INT4 with the compiled decode step), side by side in one
run, batch 1, greedy.

    .venv/bin/python bench/hf_vs_engine.py [--layers 4] [--context 128] [--steps 16] [--threads 2]

The model is MobileMoE-S's layer shape (d 768, 60 experts x 384, top-4, shared 1536, vocab 128,256) with
fewer layers so the fp32 transformers copy fits comfortably; random weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mobilemoe.checkpoint import LoadedModel, model_tensors
from mobilemoe.config import resolve_model_config
from mobilemoe.export.hf import to_hf
from mobilemoe.infer.engine import build_int4_model, compile_decode
from mobilemoe.model import Transformer
from mobilemoe.ui import console


@torch.inference_mode()
def decode_tok_s(step, context: int, steps: int, rounds: int = 3) -> float:
    times = []
    for r in range(rounds):
        started = time.perf_counter()
        for i in range(steps):
            step(context + r * steps + i)
        times.append(time.perf_counter() - started)
    return steps / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = resolve_model_config({"preset": "mobilemoe-s", "n_layers": args.layers})
    ours = Transformer(cfg).eval()
    engine = build_int4_model(cfg, model_tensors(ours, int4=True))
    hf_model, _ = to_hf(LoadedModel(ours, None, False, None))
    total = args.context + 3 * args.steps + 2
    prompt = torch.randint(0, cfg.vocab_size, (1, args.context))

    with torch.inference_mode():
        out = hf_model(prompt, use_cache=True)
    cache = {"hf": out.past_key_values}

    def hf_step(pos: int) -> None:
        o = hf_model(torch.tensor([[7]]), past_key_values=cache["hf"], use_cache=True)
        cache["hf"] = o.past_key_values

    results = {}
    for name, model, dtype in (("ours, float32", ours, torch.float32), ("ours, INT4 engine", engine, torch.bfloat16)):
        model.setup_cache(1, total, dtype)
        with torch.inference_mode():
            model(prompt, input_pos=torch.arange(args.context))
        results[name] = decode_tok_s(lambda pos, m=model: m(torch.tensor([[7]]), input_pos=torch.tensor([pos])),
                                     args.context, args.steps)
    compiled = compile_decode(engine)
    engine.setup_cache(1, total, torch.bfloat16)
    with torch.inference_mode():
        engine(prompt, input_pos=torch.arange(args.context))
        compiled(torch.tensor([[7]]), input_pos=torch.tensor([args.context]))  # compiles, untimed
    results["ours, INT4 engine, compiled decode"] = decode_tok_s(
        lambda pos: compiled(torch.tensor([[7]]), input_pos=torch.tensor([pos + 1])), args.context, args.steps)
    results["transformers Dots1 (stock MoE), float32"] = decode_tok_s(hf_step, args.context, args.steps)
    base = results["transformers Dots1 (stock MoE), float32"]
    console.print(f"MobileMoE-S shape, {args.layers} layers, context {args.context}, {args.threads} threads, "
                  f"median of 3 x {args.steps} decode steps")
    console.print("| implementation | decode tok/s | vs transformers |\n|---|---|---|")
    for name, value in results.items():
        console.print(f"| {name} | {value:.1f} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()
