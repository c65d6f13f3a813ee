"""`mobilemoe export hf|gguf|pte` and `mobilemoe import hf|released`."""

from __future__ import annotations

import argparse

from mobilemoe.argtypes import positive_int


def _check_export_flags(args: argparse.Namespace) -> None:
    """A flag that does not apply to the target would be silently ignored: refuse it, saying where it applies."""
    from mobilemoe.errors import MobileMoEError

    if args.quant is not None and args.target != "gguf":
        raise MobileMoEError(f"--quant applies to `export gguf` only; `export {args.target}` has no GGUF weight type "
                             "(drop the flag)")
    if args.f32 and args.target != "pte":
        raise MobileMoEError(f"--f32 applies to `export pte` only; drop it for `export {args.target}`")
    if args.embedding_bits is not None and (args.target == "hf" or (args.target == "gguf" and args.quant != "q4_0")
                                            or (args.target == "pte" and args.f32)):
        raise MobileMoEError("--embedding-bits applies where the weights are INT4: `export gguf --quant q4_0` and a "
                             "quantized `export pte` (without --f32); this export writes float or 8-bit weights "
                             "everywhere, so drop the flag")


def _export(args: argparse.Namespace) -> None:
    from mobilemoe.io import claim_dir, claim_file
    from mobilemoe.ui import console, human_bytes

    _check_export_flags(args)
    if args.target == "gguf" and args.quant is None:
        args.quant = "q8_0"
    if args.target == "hf":
        claim_dir(args.output, "hf-export", args.force)  # before any work
    else:
        claim_file(args.output)
    if args.target == "hf":
        from mobilemoe.export.hf import export_hf

        out = export_hf(args.checkpoint, args.output, force=args.force)
    elif args.target == "gguf":
        from mobilemoe.export.gguf import export_gguf

        out = export_gguf(args.checkpoint, args.output, args.quant, embedding_bits=args.embedding_bits)
    else:
        from mobilemoe.export.pte import export_pte

        out = export_pte(args.checkpoint, args.output, max_seq_len=args.max_seq_len, quantize=not args.f32,
                         embedding_bits=args.embedding_bits)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    console.print(f"wrote {out} ({human_bytes(size)})")


def _import(args: argparse.Namespace) -> None:
    from mobilemoe.checkpoint import save_model
    from mobilemoe.io import claim_dir
    from mobilemoe.ui import console

    if args.source == "gguf":
        from mobilemoe.export.gguf_import import import_gguf

        console.print(f"wrote checkpoint {import_gguf(args.directory, args.checkpoint, force=args.force)}")
        return
    if args.source == "hf":
        from mobilemoe.export.hf import import_hf as load
    else:
        from mobilemoe.export.released import load_released as load
    claim_dir(args.checkpoint, "checkpoint", args.force)  # before the (slow) load
    loaded = load(args.directory)
    save_model(args.checkpoint, loaded.model, loaded.tokenizer, force=args.force)
    console.print(f"wrote checkpoint {args.checkpoint}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to Hugging Face transformers, GGUF (llama.cpp) or "
                                      "ExecuTorch .pte")
    p.add_argument("target", choices=["hf", "gguf", "pte"])
    p.add_argument("checkpoint", help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("output", help="output directory (hf) or file (gguf, pte)")
    p.add_argument("--quant", choices=["q4_0", "q8_0", "f16", "f32"], help="gguf: weight type (default q8_0)")
    p.add_argument("--embedding-bits", type=int, choices=(4, 8), default=None, help="gguf q4_0: 8 writes the "
                   "embedding/output matrix as q8_0; pte: 8 makes them int8 rows (an 8da8w head), 4 INT4 g32 "
                   "(default: the checkpoint's INT4 scheme; 4 for float weights that record none)")
    p.add_argument("--max-seq-len", type=positive_int, default=256, help="pte: static KV-cache length")
    p.add_argument("--f32", action="store_true", help="pte: float32 linears and embedding instead of 8da4w "
                   "(4x larger; computes what the float model computes)")
    p.add_argument("--force", action="store_true", help="hf: replace the output directory even if it holds "
                   "something other than an HF export we wrote (its contents are deleted)")
    p.set_defaults(handler=_export)

    p = sub.add_parser("import", help="convert a GGUF file or registry model, a Hugging Face export or a released "
                                      "facebook/MobileMoE-* directory into a checkpoint")
    p.add_argument("source", choices=["gguf", "hf", "released"])
    p.add_argument("directory", help="local directory to read; gguf: a .gguf file or a registry model name "
                                     "(smollm2: SmolLM2-135M-Instruct, fetched once into the cache)")
    p.add_argument("checkpoint", help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="replace the checkpoint directory even if it holds "
                   "something other than a checkpoint we wrote (its contents are deleted)")
    p.set_defaults(handler=_import)
