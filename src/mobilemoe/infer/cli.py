"""Verbs of the inference room: generate, chat, serve, bench."""

from __future__ import annotations

import argparse
from pathlib import Path

from mobilemoe.argtypes import (
    add_int4_scheme_arguments,
    int4_scheme,
    non_empty,
    non_negative_float,
    non_negative_int,
    number,
    positive_int,
    positive_ints,
    probability,
)


def _load(args: argparse.Namespace):
    """(model, tokenizer, cache dtype) from a checkpoint directory, float or INT4; `--int4` on a float checkpoint
    rounds its weights to INT4 (g32, post-training) at load, as `save_model(..., int4=True)` would. The INT4
    engine's KV cache is `--kv-cache`, else (None) the model's own: the engine's fp16, a float model's fp32."""
    from mobilemoe.checkpoint import INT4_FORMAT, load_model, model_tensors, read_metadata
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.infer.engine import KV_CACHE_DTYPES, build_int4_model, load_int4_model
    from mobilemoe.ui import console

    path = Path(args.checkpoint)
    if args.huge_pages and not args.int4:
        raise MobileMoEError("--huge-pages places the INT4 engine's weights: add --int4 (a float model keeps torch's "
                             "own memory)")
    if args.kv_cache and not args.int4:
        raise MobileMoEError(f"--kv-cache {args.kv_cache} sets the INT4 engine's KV cache: add --int4 (a float model "
                             "keeps an fp32 cache)")
    float_weights = (path / "model.safetensors").is_file() and read_metadata(path / "model.safetensors").get(
        "quantization") != INT4_FORMAT
    if args.int4 and float_weights:
        scheme = int4_scheme(args, path)
        hint = ("" if (scheme.embedding_bits, scheme.rounding) == (8, "hqq") else
                "; for a pretrained model, --embedding-bits 8 --rounding hqq loses less (docs/eval.md)")
        console.print(f"[yellow]note:[/] {path} holds float weights; quantizing them to INT4 (g32{scheme.suffix}) "
                      f"at load{hint}")
        loaded = load_model(path)
        model = build_int4_model(loaded.model.cfg, model_tensors(loaded.model, int4=True, scheme=scheme),
                                 args.huge_pages)
        tokenizer = loaded.tokenizer
    elif args.int4:
        model, tokenizer = load_int4_model(path, args.huge_pages)
    else:
        loaded = load_model(path)
        model, tokenizer = loaded.model, loaded.tokenizer
    dtype = KV_CACHE_DTYPES[args.kv_cache] if args.kv_cache else None  # None: the model's own (engine fp16)
    if tokenizer is None:
        raise MobileMoEError(f"{args.checkpoint} has no tokenizer.json; copy the tokenizer of the data it was "
                             "trained on into the directory")
    return model, tokenizer, dtype


def _generate(args: argparse.Namespace) -> None:
    from mobilemoe.infer.generate import generate_text
    from mobilemoe.ui import console

    model, tokenizer, dtype = _load(args)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, _sampling(args),
                  on_token=lambda piece: console.print(piece, end="", markup=False, highlight=False),
                  cache_dtype=dtype, chat=args.chat, compile=args.compile)
    console.print()


def _sampling(args: argparse.Namespace):
    from mobilemoe.infer.generate import Sampling

    return Sampling(args.temperature, args.top_k, args.top_p, args.seed)


def _chat(args: argparse.Namespace) -> None:
    """Turns from --prompt, then stdin, until EOF; each answer streams as it is generated."""
    import sys

    from mobilemoe.infer.generate import ChatSession
    from mobilemoe.ui import console

    model, tokenizer, dtype = _load(args)
    session = ChatSession(model, tokenizer, args.max_context, _sampling(args), dtype, args.compile)
    first = args.prompt
    while True:
        if first is not None:
            text, first = first, None
            console.print(f"[bold]you> [/]{text}", highlight=False)
        else:
            try:
                text = console.input("[bold]you> [/]")
            except EOFError:  # stdin closed (Ctrl-D, or the piped input ran out): the conversation is over
                console.print()
                return
            if not sys.stdin.isatty():  # piped turns are not echoed by a terminal: show them in the transcript
                console.print(text, highlight=False, markup=False)
        if not text.strip():
            continue
        console.print("[bold]model> [/]", end="")
        session.reply(text, args.max_new_tokens,
                      on_token=lambda piece: console.print(piece, end="", markup=False, highlight=False))
        console.print()


def _serve(args: argparse.Namespace) -> None:
    from mobilemoe.infer.serve import Server, serve

    model, tokenizer, dtype = _load(args)
    serve(Server(model, tokenizer, args.name or model.cfg.name, dtype), args.host, args.port)


def _bench(args: argparse.Namespace) -> None:
    from mobilemoe.infer.bench import run_bench

    run_bench([args.preset, *args.vs], args.prompt_lens, args.contexts, args.decode_steps,
              args.threads, Path(args.out), compile=args.compile, rounds=args.rounds, huge_pages=args.huge_pages,
              kv_caches=args.kv_cache)


def _kv_caches(text: str) -> list[str]:
    """A comma-separated list of KV cache names, e.g. `fp16,int8`."""
    from mobilemoe.infer.engine import KV_CACHE_DTYPES

    names = [item.strip() for item in text.split(",") if item.strip()]
    if not names or any(n not in KV_CACHE_DTYPES for n in names):
        raise argparse.ArgumentTypeError(f"must be comma-separated KV caches of {', '.join(KV_CACHE_DTYPES)}; "
                                         f"got {text!r}")
    if repeated := next((n for n in names if names.count(n) > 1), None):  # two engines would share one label
        raise argparse.ArgumentTypeError(f"{repeated} is named twice in {text!r}")
    return names


def _add_kv_cache_argument(p: argparse.ArgumentParser) -> None:
    from mobilemoe.infer.engine import KV_CACHE_DTYPES  # ~20 ms: torch is loaded already

    p.add_argument("--kv-cache", choices=list(KV_CACHE_DTYPES), default=None,
                   help="the INT4 engine's KV cache (with --int4): fp16 (half fp32's bytes; default), int8 (one "
                        "scale per head and position: about half fp16's bytes, for long contexts) or fp32")


def _add_huge_pages_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--huge-pages", action="store_true",
                   help="copy the INT4 engine's weights into transparent huge pages at load instead of mapping the "
                        "file (decode 0-12%% faster here; loading then copies them, as llama.cpp's --no-mmap reads "
                        "them)")


def register(sub: argparse._SubParsersAction) -> None:
    for verb, helptext in (("generate", "continue a prompt (streaming), float or INT4 checkpoint"),
                           ("chat", "chat with a checkpoint through its chat template; the conversation is kept "
                                    "(--prompt is the first turn, then stdin until EOF)")):
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("checkpoint", help="checkpoint directory (e.g. runs/quickstart/tiny-moe/qat/final)")
        p.add_argument("--prompt", type=non_empty, required=verb == "generate", help="the prompt (chat: first message)")
        p.add_argument("--int4", action="store_true", help="run INT4 weights through the engine's int4 kernels")
        add_int4_scheme_arguments(p)
        _add_kv_cache_argument(p)
        _add_huge_pages_argument(p)
        p.add_argument("--max-new-tokens", type=positive_int, default=64)
        p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
        p.add_argument("--top-p", type=probability, default=1.0, help="1 = off")
        p.add_argument("--seed", type=non_negative_int, default=0)
        p.add_argument("--compile", action="store_true",
                       help="capture the decode step with torch.compile (faster decode after a one-off compile)")
        if verb == "generate":
            p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template "
                                                                "as one user turn")
            p.set_defaults(handler=_generate)
        else:
            p.add_argument("--max-context", type=positive_int, default=2048,
                           help="tokens the conversation may grow to (KV cache size; capped at the model's)")
            p.set_defaults(handler=_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                                     "/v1/models) over one checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--int4", action="store_true", help="run INT4 weights through the engine's int4 kernels")
    add_int4_scheme_arguments(p)
    _add_kv_cache_argument(p)
    _add_huge_pages_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000)
    p.add_argument("--name", help="model id clients send (default: the model config's name)")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("bench", help="INT4 prefill/decode speed and memory of presets, side by side")
    p.add_argument("--preset", default="mobilemoe-s", help="preset (random INT4 weights) or INT4 checkpoint "
                   "directory; NAME=WHAT names it in the tables and plot (default: a checkpoint's recorded name, "
                   "a preset's own)")
    p.add_argument("--vs", nargs="*", default=["mobilellm-pro"], help="presets or INT4 checkpoint directories to "
                   "compare against (last = base), NAME= as for --preset")
    p.add_argument("--prompt-lens", type=positive_ints, default="256,1024",
                   help="comma-separated prompt lengths for prefill")
    p.add_argument("--contexts", type=positive_ints, default="256,1024", help="comma-separated contexts for decode")
    p.add_argument("--decode-steps", type=positive_int, default=16)
    p.add_argument("--threads", type=positive_ints, default="2", help="comma-separated thread counts (e.g. 1,2)")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds per measurement (the median is shown)")
    p.add_argument("--kv-cache", type=_kv_caches, default="fp16",
                   help="comma-separated KV caches (fp16, int8, fp32; default fp16): each model runs with each, "
                        "interleaved, e.g. fp16,int8; ratios compare models with the same cache")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="time the eager decode step instead of the torch.compile'd one")
    _add_huge_pages_argument(p)
    p.add_argument("--out", default="bench_results")
    p.set_defaults(handler=_bench)
