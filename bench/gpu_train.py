"""Train full-size MobileMoE-S for N steps on the GPUs present and print tokens/s, MFU and peak memory.

    # one GPU (bf16 autocast + compile per block)
    .venv/bin/python bench/gpu_train.py --preset mobilemoe-s --seq 4096 --batch 4 --steps 30
    # 1..8 GPUs of one node: FSDP2 with bf16 parameters for compute and fp32 gradient reduction, + compile
    .venv/bin/torchrun --nproc_per_node 8 bench/gpu_train.py --preset mobilemoe-s --seq 4096 --batch 4 --steps 30
    # the same code path on CPU at a tiny size (what the tests run)
    .venv/bin/python bench/gpu_train.py --preset micro-moe --device cpu --seq 64 --batch 2 --steps 2 --warmup 0

The model and the step are the trainer's (train/runtime.py, train/parallel.py): the model is built directly on
the device, activation checkpointing (optional) then compile then FSDP2 applied per block, forward and loss,
backward, gradient clipping, fused AdamW, the MoE balancing-bias update. Tokens are uniform random ids (no data
loading in the measurement). MFU = tokens/s x training FLOPs per token (train/flops.py, PaLM's counting) over the
device peak in train/device_peaks.yaml times the number of processes. The first --warmup steps (compilation) are
not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mobilemoe.config import get_preset
from mobilemoe.io import atomic_write_text
from mobilemoe.model import Transformer, count_parameters
from mobilemoe.train import parallel
from mobilemoe.train.flops import flops_per_token, peak_flop_s, peak_memory_mb
from mobilemoe.train.runtime import Runtime, build_optimizer, prepare_model, resolve_device
from mobilemoe.ui import console


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mobilemoe-s")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4, help="sequences per process per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--json", help="also write the result as JSON to this file (rank 0)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    world = parallel.init_world(device)
    runtime = Runtime(device, args.precision, args.compile, args.activation_checkpointing,
                      fsdp_mixed_precision=args.precision == "bf16" and world.distributed)
    cfg = get_preset(args.preset)
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq)
    torch.manual_seed(0)
    with torch.device(device):  # full size: initialise on the GPU, not on the host first
        model = Transformer(cfg)
    count = count_parameters(model)
    model = parallel.wrap_model(prepare_model(model, runtime), world, "fsdp", bf16=args.precision == "bf16")
    optimizer = build_optimizer(model, 3e-4, (0.9, 0.95), 0.1)
    generator = torch.Generator(device).manual_seed(1000 + world.rank)
    if world.is_main:
        console.print(f"{cfg.name}: {count.total / 1e9:.3f}B parameters, {count.active / 1e9:.3f}B active; "
                      f"{world.size} process(es) on {runtime.describe()}, FSDP2 when more than one; "
                      f"batch {args.batch} x seq {args.seq} per process")

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device, generator=generator)
        started = time.perf_counter()
        with runtime.autocast():
            out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for moe in parallel.unwrap(model).moe_layers():
            parallel.all_reduce_sum(moe.load_since_update, world)
        parallel.unwrap(model).update_expert_bias()
        loss = out.lm_loss.item()  # waits for the device: the step is done
        elapsed = time.perf_counter() - started
        losses.append(loss)
        if step >= args.warmup:
            times.append(elapsed)
        if world.is_main:
            console.print(f"step {step + 1}/{args.warmup + args.steps}  loss {loss:.3f}  {elapsed * 1e3:.0f} ms"
                          + ("  (warm-up)" if step < args.warmup else ""))

    step_s = statistics.median(times)
    tok_s = args.batch * args.seq * world.size / step_s
    peak = peak_flop_s(device, args.precision)
    mfu = None if peak is None else tok_s * flops_per_token(cfg, args.seq) / (peak * world.size)
    memory = torch.tensor([peak_memory_mb()], dtype=torch.float64, device=device)
    if world.distributed:  # the fullest process's
        torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MAX)
    result = {"preset": cfg.name, "processes": world.size, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "precision": args.precision, "compile": args.compile,
              "activation_checkpointing": args.activation_checkpointing, "seq": args.seq, "batch": args.batch,
              "timed_steps": len(times), "step_ms": step_s * 1e3, "tokens_per_s": tok_s, "mfu": mfu,
              "peak_memory_mb": float(memory.item()), "first_loss": losses[0], "last_loss": losses[-1]}
    if world.is_main:
        mfu_text = "n/a (no peak listed for this device)" if mfu is None else f"{mfu:.1%}"
        console.print(f"tokens/s {tok_s:,.0f}  MFU {mfu_text}  peak memory {result['peak_memory_mb']:,.0f} MB "
                      f"(median step {step_s * 1e3:.0f} ms over {len(times)} steps)")
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(result, indent=1))
    if world.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
