"""Our INT4 engine vs llama.cpp (llama-cpp-python) on the same 4-bit model, side by side in one run.

    .venv/bin/python bench/llamacpp_vs_engine.py [--layers 20] [--contexts 256,1024] [--threads 1,2] [--cold-start]
    .venv/bin/python bench/llamacpp_vs_engine.py --checkpoint CKPT ...   # any float checkpoint

Without --checkpoint the model is MobileMoE-S (random weights) as the paper configures it, llama3 RoPE scaling
included (GGUF architecture exaone-moe, GQA kept, see docs/interop.md); prompts are Moby Dick as byte ids.
With --checkpoint (e.g. `mobilemoe import gguf smollm2 CKPT`) it is that model, dense or MoE, and the prompt
is Moby Dick through the checkpoint's own tokenizer. Either way the float weights become our INT4 checkpoint
(group 32, fp16 scales, stored in the engine's layout; `save_model(..., int4=True)`, loaded by the engine's
`load_int4_model`) and a GGUF q4_0, llama.cpp's format with the same numbers (32 values, one fp16 scale),
through `mobilemoe export gguf`'s writer. The router and norms stay f32 in both. Batch 1.

For every thread count and context: prefill of `context` prompt tokens, then decode at that context; the
implementations take turns in every round (median of the rounds). Our decode is the C decode step (one call
per token), with the engine's default fp16 KV cache (llama.cpp's default is f16 too) and with an fp32 one
(a second engine on the same mapped weights). Decode bandwidth use: weight bytes read per token (INT4,
active experts only) x tok/s over the copy bandwidth
(reads + writes of a 512 MB copy) and over the read bandwidth (a 512 MB sum), both measured as one more
turn in every round of that decode measurement. --cold-start: each implementation loads the model in a
fresh process of its own; time to load, time to first token (load + prefill of 64 tokens + the first token)
and the resident memory the loading adds (after minus before), after loading and after the first token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mobilemoe.checkpoint import LoadedModel, load_model, save_model
from mobilemoe.config import resolve_model_config
from mobilemoe.data.documents import read_embedded
from mobilemoe.export.gguf import export_gguf
from mobilemoe.infer.bench import Bandwidth, Yardstick, active_int4_bytes, interleaved, real_text_ids
from mobilemoe.infer.engine import load_int4_model
from mobilemoe.infer.generate import last_position
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import train_bpe
from mobilemoe.ui import console

OURS, OURS_FP32, LLAMA = "ours (C step, fp16 KV)", "ours (C step, fp32 KV)", "llama.cpp (q4_0, f16 KV)"
CACHE_DTYPES = {OURS: torch.float16, OURS_FP32: torch.float32}
COLD_PROMPT = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a float checkpoint directory (default: MobileMoE-S, "
                        "random weights)")
    parser.add_argument("--layers", type=int, default=20, help="MobileMoE-S layers (without --checkpoint)")
    parser.add_argument("--contexts", default="256,1024", help="prompt lengths = contexts at which decode is timed")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--cold-start", action="store_true", help="also measure loading in fresh processes")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results directory (default: bench_results/llamacpp_vs_engine, "
                        "with --checkpoint its /<checkpoint>)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(cold_start_child(*args.child)))
        return
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.out is None:
        args.out = "bench_results/llamacpp_vs_engine" + (f"/{Path(args.checkpoint).name}" if args.checkpoint else "")
    from llama_cpp import Llama

    n_ctx = _context_size(args)
    with tempfile.TemporaryDirectory() as tmp:
        loaded, ids = _model_and_prompt(args, n_ctx)
        cfg = loaded.model.cfg
        args.model = f"{cfg.name} ({cfg.n_layers} layers)"
        console.print(f"{args.model}: INT4 checkpoint and GGUF q4_0 from the same float weights ...")
        save_model(Path(tmp) / "int4", loaded.model, loaded.tokenizer, int4=True)
        gguf = export_gguf(loaded, Path(tmp) / "model.gguf", "q4_0")
        del loaded
        results = {"gguf_bytes": gguf.stat().st_size, "active_int4_bytes": active_int4_bytes(cfg)}
        if args.cold_start:
            results["cold_start"] = {name: _in_fresh_process(impl, path) for name, impl, path in
                                     ((OURS, "engine", Path(tmp) / "int4"), (LLAMA, "llama", gguf))}
        engines = {name: load_int4_model(Path(tmp) / "int4")[0] for name in CACHE_DTYPES}  # one mapping each
        llms = {t: Llama(str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=t, n_threads_batch=t,
                         verbose=False) for t in args.threads}
        results["runs"], bandwidth = {}, Bandwidth()
        for threads in args.threads:
            torch.set_num_threads(threads)
            for context in args.contexts:
                results["runs"][threads, context] = run(engines, llms[threads], ids, context, args, bandwidth)
        for llm in llms.values():
            llm.close()
    report(results, args)


def _model_and_prompt(args: argparse.Namespace, n_ctx: int) -> tuple[LoadedModel, list[int]]:
    """The float model and `n_ctx` prompt ids of real text (the checkpoint's tokenizer, else byte ids)."""
    if args.checkpoint:
        loaded = load_model(args.checkpoint)
        if loaded.tokenizer is not None:
            text = "".join(d for d, _ in zip(read_embedded("moby-dick"), range(50), strict=False) if isinstance(d, str))
            ids = loaded.tokenizer.encode(text)
            if len(ids) >= n_ctx:
                return loaded, ids[:n_ctx]
        return loaded, real_text_ids(n_ctx, loaded.model.cfg.vocab_size)
    torch.manual_seed(0)
    cfg = resolve_model_config({"preset": "mobilemoe-s", "n_layers": args.layers})
    with torch.no_grad():
        model = Transformer(cfg).eval()
    tokenizer = train_bpe(["MobileMoE runs on phones."] * 4, vocab_size=300)  # GGUF needs one; ids are fed directly
    return LoadedModel(model, tokenizer, False, Path("<memory>")), real_text_ids(n_ctx, cfg.vocab_size)


@torch.inference_mode()
def run(engines: dict[str, Transformer], llm, ids: list[int], context: int, args: argparse.Namespace,
        bandwidth: Bandwidth) -> dict:
    n_ctx = _context_size(args)

    def engine_prefill(name: str, n: int) -> None:
        engines[name].setup_cache(1, n_ctx, CACHE_DTYPES[name])
        engines[name](torch.tensor([ids[:n]]), input_pos=torch.arange(n), logits_at=last_position(n))

    def llama_prefill(n: int) -> None:
        llm.reset()
        llm.eval(ids[:n])

    prefill = {name: lambda n, name=name: engine_prefill(name, n) for name in engines} | {LLAMA: llama_prefill}
    for fn in prefill.values():
        fn(min(32, context))  # warm-up (the caches hold the context and the decode rounds' tokens only)
    seconds = interleaved(list(prefill.values()), lambda fn: fn(context), args.rounds)
    prefill_tok_s = {name: context / t for name, t in zip(prefill, seconds, strict=True)}

    # each implementation decodes on from the cache its last timed prefill left
    position = dict.fromkeys(prefill, context)

    def engine_decode(name: str) -> None:
        for _ in range(args.steps):
            engines[name](torch.tensor([[ids[position[name]]]]), input_pos=torch.tensor([position[name]]))
            position[name] += 1

    def llama_decode() -> None:
        for _ in range(args.steps):
            llm.eval([ids[position[LLAMA]]])
            position[LLAMA] += 1

    decoders = {name: lambda name=name: engine_decode(name) for name in engines} | {LLAMA: llama_decode}
    yardstick = Yardstick(bandwidth)  # takes a turn in every decode round
    seconds = interleaved(list(decoders.values()), lambda fn: fn(), args.rounds, yardstick)
    return {"prefill_tok_s": prefill_tok_s,
            "decode_tok_s": {name: args.steps / t for name, t in zip(decoders, seconds, strict=True)},
            "yardstick": yardstick.medians()}


def _context_size(args: argparse.Namespace) -> int:
    return max(args.contexts) + (3 * args.rounds + 1) * args.steps + 2


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def cold_start_child(impl: str, path: str) -> dict:
    """In a fresh process (imports done first): load, then the first token of a 64-token prompt."""
    ids = real_text_ids(COLD_PROMPT, 300)
    if impl == "engine":
        before = _rss()
        started = time.perf_counter()
        engine, _ = load_int4_model(path)
        loaded_s, after_load = time.perf_counter() - started, _rss()
        with torch.inference_mode():
            engine.setup_cache(1, COLD_PROMPT + 1)
            int(engine(torch.tensor([ids]), input_pos=torch.arange(COLD_PROMPT),
                       logits_at=last_position(COLD_PROMPT)).logits[0, -1].argmax())
    else:
        from llama_cpp import Llama

        before = _rss()
        started = time.perf_counter()
        llm = Llama(path, n_ctx=COLD_PROMPT + 1, n_batch=COLD_PROMPT, n_threads=torch.get_num_threads(),
                    verbose=False)
        loaded_s, after_load = time.perf_counter() - started, _rss()
        llm.eval(ids)
        int(llm.scores[COLD_PROMPT - 1].argmax())
    ttft = time.perf_counter() - started
    return {"load_s": loaded_s, "ttft_s": ttft, "rss_added_by_load": after_load - before,
            "rss_added_at_first_token": _rss() - before}


def _in_fresh_process(impl: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", impl, str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: dict, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {f"{t} threads, context {c}": r for (t, c), r in results["runs"].items()}
    (out / "results.json").write_text(json.dumps({**vars(args), **results, "runs": runs}, indent=2))
    active = results["active_int4_bytes"]
    console.print(f"{args.model}; prefill of `context` tokens, decode at that context, median of {args.rounds} "
                  f"rounds; {active / 1e6:.1f} MB of INT4 weights read per decoded token")
    console.print("| threads, context | implementation | prefill tok/s | vs llama.cpp | decode tok/s | vs llama.cpp "
                  "| decode bandwidth use (of copy / of read; GB/s between its rounds) |")
    console.print("|---|---|---|---|---|---|---|")
    for (threads, context), r in results["runs"].items():
        base_prefill, base_decode = r["prefill_tok_s"][LLAMA], r["decode_tok_s"][LLAMA]
        bw = r["yardstick"]
        for name, value in r["decode_tok_s"].items():
            pre = r["prefill_tok_s"].get(name)
            pre_text = f"{pre:.1f} | {pre / base_prefill:.2f}x" if pre else " | "
            console.print(f"| {threads}, {context} | {name} | {pre_text} | {value:.1f} | {value / base_decode:.2f}x | "
                          f"{active * value / bw['copy']:.0%} / {active * value / bw['read']:.0%} "
                          f"({bw['copy'] / 1e9:.1f} / {bw['read'] / 1e9:.1f}) |")
    if "cold_start" in results:
        console.print("| cold start (own process) | load s | time to first token s | RSS added by load | "
                      "RSS added at first token |")
        console.print("|---|---|---|---|---|")
        for name, c in results["cold_start"].items():
            console.print(f"| {name} | {c['load_s']:.3f} | {c['ttft_s']:.3f} | {c['rss_added_by_load'] / 1e6:.1f} MB "
                          f"| {c['rss_added_at_first_token'] / 1e6:.1f} MB |")
    console.print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
