"""Our INT4 engine vs llama.cpp (llama-cpp-python) on the same 4-bit model, side by side in one run.

    .venv/bin/python bench/llamacpp_vs_engine.py [--layers 20] [--prompt 256] [--context 256] [--steps 16]
    .venv/bin/python bench/llamacpp_vs_engine.py --checkpoint CKPT [--threads 1]   # any float checkpoint

Without --checkpoint the model is MobileMoE-S (random weights) as the paper configures it, llama3 RoPE scaling
included (GGUF architecture exaone-moe, GQA kept, see docs/interop.md); prompts are Moby Dick as byte ids.
With --checkpoint (e.g. `mobilemoe import gguf smollm2 CKPT`) it is that model, dense or MoE, and the prompt
is Moby Dick through the checkpoint's own tokenizer. Either way the float weights become our INT4 checkpoint
(group 32, fp16 scales; `save_model(..., int4=True)`, loaded by the engine's `load_int4_model`) and a GGUF q4_0,
llama.cpp's format with the same layout (32 values, one fp16 scale), through `mobilemoe export gguf`'s writer.
The router and norms stay f32 in both. Batch 1, the same threads for both; the two take turns in every
round (median of the rounds). Our decode is the torch.compile'd step; eager is shown too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mobilemoe.checkpoint import LoadedModel, load_model, save_model
from mobilemoe.config import resolve_model_config
from mobilemoe.data.documents import read_embedded
from mobilemoe.export.gguf import export_gguf
from mobilemoe.infer.bench import interleaved, real_text_ids
from mobilemoe.infer.engine import COMPUTE_DTYPE, compile_decode, load_int4_model
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import train_bpe
from mobilemoe.ui import console


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a float checkpoint directory (default: MobileMoE-S, "
                        "random weights)")
    parser.add_argument("--layers", type=int, default=20, help="MobileMoE-S layers (without --checkpoint)")
    parser.add_argument("--prompt", type=int, default=256, help="prefill prompt length")
    parser.add_argument("--context", type=int, default=256, help="context length at which decode is timed")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results directory (default: bench_results/llamacpp_vs_engine, "
                        "with --checkpoint its /<checkpoint>-t<threads>)")
    args = parser.parse_args()
    if args.out is None:
        args.out = "bench_results/llamacpp_vs_engine" + (f"/{Path(args.checkpoint).name}-t{args.threads}"
                                                         if args.checkpoint else "")
    from llama_cpp import Llama

    torch.set_num_threads(args.threads)
    n_ctx = _context_size(args)
    with tempfile.TemporaryDirectory() as tmp:
        loaded, ids = _model_and_prompt(args, n_ctx)
        args.model = f"{loaded.model.cfg.name} ({loaded.model.cfg.n_layers} layers)"
        console.print(f"{args.model}: INT4 checkpoint and GGUF q4_0 from the same float weights ...")
        save_model(Path(tmp) / "int4", loaded.model, loaded.tokenizer, int4=True)
        gguf = export_gguf(loaded, Path(tmp) / "model.gguf", "q4_0")
        del loaded
        engine, _ = load_int4_model(Path(tmp) / "int4")
        llm = Llama(str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)
        gguf_bytes = gguf.stat().st_size
        results = run(engine, llm, ids, args)
        llm.close()
    results["gguf_bytes"] = gguf_bytes
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
def run(engine: Transformer, llm, ids: list[int], args: argparse.Namespace) -> dict:
    n_ctx = _context_size(args)

    def engine_prefill(n: int) -> None:
        engine.setup_cache(1, n_ctx, COMPUTE_DTYPE)
        engine(torch.tensor([ids[:n]]), input_pos=torch.arange(n))

    def llama_prefill(n: int) -> None:
        llm.reset()
        llm.eval(ids[:n])

    prefill = {"ours (INT4 engine)": engine_prefill, "llama.cpp (q4_0)": llama_prefill}
    for fn in prefill.values():
        fn(32)  # warm-up
    seconds = interleaved(list(prefill.values()), lambda fn: fn(args.prompt), args.rounds)
    prefill_tok_s = {name: args.prompt / t for name, t in zip(prefill, seconds, strict=True)}

    # Ours and llama.cpp hold separate caches; compiled and eager decode are the same engine sharing one
    # cache, so they continue one position counter.
    engine_prefill(args.context)
    llama_prefill(args.context)
    position = {"engine": args.context, "llama": args.context}
    compiled = compile_decode(engine)

    def engine_decode(step) -> None:
        for _ in range(args.steps):
            step(torch.tensor([[ids[position["engine"]]]]), input_pos=torch.tensor([position["engine"]]))
            position["engine"] += 1

    def llama_decode() -> None:
        for _ in range(args.steps):
            llm.eval([ids[position["llama"]]])
            position["llama"] += 1

    decoders = {"ours (INT4 engine), compiled decode": lambda: engine_decode(compiled),
                "ours (INT4 engine), eager decode": lambda: engine_decode(engine),
                "llama.cpp (q4_0)": llama_decode}
    decoders["ours (INT4 engine), compiled decode"]()  # compiles, untimed
    seconds = interleaved(list(decoders.values()), lambda fn: fn(), args.rounds)
    return {"prefill_tok_s": prefill_tok_s,
            "decode_tok_s": {name: args.steps / t for name, t in zip(decoders, seconds, strict=True)}}


def _context_size(args: argparse.Namespace) -> int:
    return max(args.prompt, args.context) + (2 * args.rounds + 1) * args.steps + 2


def report(results: dict, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**vars(args), **results}, indent=2))
    base = "llama.cpp (q4_0)"
    llama_prefill, llama_decode = results["prefill_tok_s"][base], results["decode_tok_s"][base]
    console.print(f"{args.model}, {args.threads} threads; prefill {args.prompt} tokens, "
                  f"decode at context {args.context}, median of {args.rounds} rounds")
    console.print("| implementation | prefill tok/s | vs llama.cpp | decode tok/s | vs llama.cpp |")
    console.print("|---|---|---|---|---|")
    for name, value in results["decode_tok_s"].items():
        pre = results["prefill_tok_s"].get(name.split(",")[0])
        pre_text = f"{pre:.1f} | {pre / llama_prefill:.2f}x" if pre else "| "
        console.print(f"| {name} | {pre_text} | {value:.1f} | {value / llama_decode:.2f}x |")
    console.print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
