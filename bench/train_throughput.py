"""Training step time on this machine's CPU per compute mode (fp32 eager, bf16 autocast, bf16 + torch.compile
per block), for MoE models and their dense twins (same active parameters), all interleaved in one process:
each round steps every (model, mode) once, and the median over rounds is reported.

    .venv/bin/python bench/train_throughput.py [--pairs tiny-moe:tiny-dense,micro-moe:micro-dense]
        [--modes fp32,bf16,bf16+compile] [--batch 16 --seq 256 --rounds 10] [--per-expert-loop]

A step is what the trainer does: forward and loss under the mode's autocast, backward, fused AdamW
(train/runtime.py), then the MoE's balancing-bias update. `--per-expert-loop` adds each MoE in fp32 with
`moe.run_experts_reference` as its dispatch (the grouped dispatch's baseline).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mobilemoe.config import get_preset
from mobilemoe.model import Transformer, count_parameters
from mobilemoe.moe import run_experts_reference
from mobilemoe.train.runtime import Runtime, build_optimizer, prepare_model
from mobilemoe.ui import console

MODES = {"fp32": Runtime(torch.device("cpu")),
         "bf16": Runtime(torch.device("cpu"), precision="bf16"),
         "bf16+compile": Runtime(torch.device("cpu"), precision="bf16", compile=True)}


class Case:
    def __init__(self, preset: str, mode: str, per_expert_loop: bool = False):
        self.preset, self.mode, self.runtime = preset, mode, MODES[mode]
        torch.manual_seed(0)
        model = Transformer(get_preset(preset))
        self.params = count_parameters(model)
        if per_expert_loop:
            for layer in model.moe_layers():
                layer.dispatch = run_experts_reference
            self.mode = f"{mode}, per-expert loop"
        self.model = prepare_model(model, self.runtime)
        self.optimizer = build_optimizer(self.model, 1e-4, (0.9, 0.95), 0.1)
        self.times: list[float] = []

    def step(self, tokens: torch.Tensor) -> float:
        started = time.perf_counter()
        with self.runtime.autocast():
            out = self.model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_expert_bias()  # as the trainer does: without it the routing stays as uneven as at init
        return time.perf_counter() - started

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="tiny-moe:tiny-dense,micro-moe:micro-dense",
                        help="comma-separated MOE:DENSE preset pairs with equal active parameters")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="rounds not counted (compile happens in the first)")
    parser.add_argument("--per-expert-loop", action="store_true")
    args = parser.parse_args()
    pairs = [tuple(pair.split(":")) for pair in args.pairs.split(",")]
    modes = args.modes.split(",")
    cases = [Case(preset, mode) for pair in pairs for preset in pair for mode in modes]
    if args.per_expert_loop:
        cases += [Case(moe, "fp32", per_expert_loop=True) for moe, _ in pairs]
    tokens = torch.randint(0, 4096, (args.batch, args.seq + 1))
    for rnd in range(args.warmup + args.rounds):
        for case in cases:
            elapsed = case.step(tokens)
            if rnd >= args.warmup:
                case.times.append(elapsed)
    by_key = {(c.preset, c.mode): c for c in cases}
    console.print(f"batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, median of {args.rounds} "
                  f"interleaved rounds after {args.warmup} warm-up rounds")
    console.print("| model | active / total params | mode | step (ms) | tokens/s | step time vs fp32 eager |")
    console.print("|---|---|---|---|---|---|")
    for c in cases:
        base = by_key[(c.preset, "fp32")].median if (c.preset, "fp32") in by_key else float("nan")
        console.print(f"| {c.preset} | {c.params.active / 1e6:.2f}M / {c.params.total / 1e6:.2f}M | {c.mode} | "
                      f"{c.median * 1e3:.1f} | {args.batch * args.seq / c.median:,.0f} | {c.median / base:.2f}x |")
    console.print("\n| MoE / dense step time | " + " | ".join(modes) + " |")
    console.print("|---|" + "---|" * len(modes))
    for moe, dense in pairs:
        ratios = [by_key[(moe, m)].median / by_key[(dense, m)].median for m in modes]
        console.print(f"| {moe} / {dense} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")


if __name__ == "__main__":
    main()
