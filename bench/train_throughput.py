"""Training throughput: a tiny MobileMoE vs its dense twin (same active parameters), and the grouped
dropless dispatch vs a plain per-expert loop, side by side in one run (interleaved rounds, median).

    .venv/bin/python bench/train_throughput.py [--preset tiny-moe --dense tiny-dense --batch 16 --seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mobilemoe.config import get_preset
from mobilemoe.model import Transformer, count_parameters
from mobilemoe.moe import run_experts_reference
from mobilemoe.ui import console


def step_time(model: Transformer, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    started = time.perf_counter()
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--dense", default="tiny-dense")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"moe (grouped dispatch)": Transformer(get_preset(args.preset)),
              "moe (per-expert loop)": Transformer(get_preset(args.preset)),
              "dense twin": Transformer(get_preset(args.dense))}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    tokens = torch.randint(0, 4096, (args.batch, args.seq + 1))
    times: dict[str, list[float]] = {k: [] for k in models}
    for layer in models["moe (per-expert loop)"].moe_layers():
        layer.dispatch = run_experts_reference
    for rnd in range(args.rounds + 2):  # two warm-up rounds
        for name, model in models.items():
            t = step_time(model, optimizers[name], tokens)
            if rnd >= 2:
                times[name].append(t)
    dense = statistics.median(times["dense twin"])
    console.print(f"batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, median of "
                  f"{args.rounds} interleaved rounds")
    console.print("| model | active / total params | step (ms) | tokens/s | step time vs dense |")
    console.print("|---|---|---|---|---|")
    for name, model in models.items():
        t = statistics.median(times[name])
        c = count_parameters(model)
        console.print(f"| {name} | {c.active / 1e6:.2f}M / {c.total / 1e6:.2f}M | {t * 1e3:.1f} | "
                      f"{args.batch * args.seq / t:,.0f} | {t / dense:.2f}x |")


if __name__ == "__main__":
    main()
