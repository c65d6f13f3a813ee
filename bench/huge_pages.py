"""The INT4 engine's weights in 4 KB pages vs in 2 MB transparent huge pages (`--huge-pages`), side by side.

    .venv/bin/python bench/huge_pages.py [--models mobilemoe-s,mobilellm-pro] [--threads 1,2] [--context 256]

For each model (a preset with random INT4 weights, or an INT4 checkpoint directory): the same weights built
twice, once as they are (a checkpoint: mapped from its file) and once copied into huge pages; then decode
at `--context` with the C step, the two copies taking turns in every round (median of the rounds), and the
copy bandwidth measured as one more turn in every round. A checkpoint's load time is measured too, each way,
in the same process (the file is in the page cache after the first load: this is a warm load).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mobilemoe.config import get_preset
from mobilemoe.infer.bench import Bandwidth, active_int4_bytes, interleaved, kv_cache_bytes, median, real_text_ids
from mobilemoe.infer.engine import build_int4_model, load_int4_model, random_int4_tensors
from mobilemoe.model import Transformer
from mobilemoe.ui import console


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilemoe-s,mobilellm-pro")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bandwidth = Bandwidth()
    console.print("| model | threads | 4 KB pages tok/s | huge pages tok/s | huge / 4 KB | bandwidth use of copy, "
                  "4 KB / huge | copy GB/s | load s, mapped / huge |")
    console.print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        if Path(name, "config.json").is_file():
            started = time.perf_counter()
            mapped, _ = load_int4_model(name)
            load_mapped = time.perf_counter() - started
            started = time.perf_counter()
            huge, _ = load_int4_model(name, huge_pages=True)
            load_text = f"{load_mapped:.2f} / {time.perf_counter() - started:.2f}"
        else:
            cfg = get_preset(name)
            tensors = random_int4_tensors(cfg)
            mapped, huge = build_int4_model(cfg, tensors), build_int4_model(cfg, tensors, huge_pages=True)
            load_text = "(random weights)"
        cfg = mapped.cfg
        ids = real_text_ids(args.context + args.rounds * args.steps + 1, cfg.vocab_size)
        read_per_token = active_int4_bytes(cfg) + kv_cache_bytes(cfg, args.context)  # the engine's fp16 KV cache
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            small, big, copy = decode_side_by_side(mapped, huge, ids, args, bandwidth)
            console.print(f"| {cfg.name} | {threads} | {small:.1f} | {big:.1f} | {big / small:.3f}x | "
                          f"{read_per_token * small / copy:.0%} / {read_per_token * big / copy:.0%} | "
                          f"{copy / 1e9:.1f} | {load_text} |")
        del mapped, huge


@torch.inference_mode()
def decode_side_by_side(mapped: Transformer, huge: Transformer, ids: list[int], args: argparse.Namespace,
                        bandwidth: Bandwidth) -> tuple[float, float, float]:
    """Decode tok/s of each copy at `args.context`, taking turns, and the copy bandwidth between the rounds."""
    position = {}
    for model in (mapped, huge):
        model.setup_cache(1, len(ids))
        model(torch.tensor([ids[:args.context]]), input_pos=torch.arange(args.context))
        position[id(model)] = args.context

    def decode(model: Transformer) -> None:
        for _ in range(args.steps):
            pos = position[id(model)]
            model(torch.tensor([[ids[pos]]]), input_pos=torch.tensor([pos]))
            position[id(model)] = pos + 1

    copies: list[float] = []
    seconds = interleaved([mapped, huge], decode, args.rounds, lambda: copies.append(bandwidth.copy()))
    return args.steps / seconds[0], args.steps / seconds[1], median(copies)


if __name__ == "__main__":
    main()
