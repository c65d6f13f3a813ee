"""ExecuTorch .pte (fused MoE op, and the previous gather + einsum experts) vs our INT4 engine, in one run.

    .venv/bin/python bench/pte_vs_engine.py [--layers 4] [--prompt 64] [--steps 16]
    .venv/bin/python bench/pte_vs_engine.py --checkpoint CKPT      # e.g. `mobilemoe import gguf smollm2 CKPT`
    .venv/bin/python bench/pte_vs_engine.py --checkpoint CKPT --embedding-bits 8   # int8 embedding, 8da8w head

Without --checkpoint the model is MobileMoE-S with random weights (the paper's shapes; `--layers` of its 20).
The same float weights become (a) `export_pte` with MoE layers on `llama::quantized_moe_ffn`, (b) `export_pte(...,
fused_moe=False)`, the previous gather + einsum experts, and (c) our INT4 checkpoint run by the engine
(`load_int4_model`). A dense checkpoint has no MoE layer, so (a) and (b) would be the same program: one .pte.
The .pte programs take one token per call (static T = 1), so their prefill is the prompt fed token by token;
the engine prefills the prompt in one batched call. Decode: `--steps` tokens after the prompt. Every
implementation takes its turn in every round (median of `--rounds`), ExecuTorch's threadpool and torch both at
`--threads`.
Before the timing, every .pte and the engine take the same prompt and `--steps` greedy tokens, all fed the
engine's choices: how many tokens each .pte picks like the engine before the first difference, and its logits'
relative error (max |diff| / max |engine|) at the prompt's last position and over the generated steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mobilemoe.checkpoint import LoadedModel, load_model, save_model
from mobilemoe.config import resolve_model_config
from mobilemoe.export.pte import PteRunner, export_pte, pte_kernels
from mobilemoe.infer.bench import interleaved, real_text_ids
from mobilemoe.infer.engine import compile_decode, load_int4_model
from mobilemoe.model import Transformer
from mobilemoe.ui import console, human_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a float checkpoint (default: MobileMoE-S, random)")
    parser.add_argument("--layers", type=int, default=4, help="MobileMoE-S layers (without --checkpoint)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt length")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embedding-bits", type=int, choices=[4, 8], default=None,
                        help="embedding/head bits of the .pte and the engine (default: the checkpoint's scheme)")
    parser.add_argument("--out", default=None, help="results file (default: bench_results/pte_vs_engine/<model>.json)")
    args = parser.parse_args()
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    torch.set_num_threads(args.threads)
    _unsafe_reset_threadpool(args.threads)
    max_seq_len = args.prompt + (2 * args.rounds + 1) * args.steps + 2
    loaded = _model(args)
    cfg = loaded.model.cfg
    ids = real_text_ids(max_seq_len, cfg.vocab_size, loaded.tokenizer)
    scheme = loaded.scheme.with_overrides(args.embedding_bits)
    args.model = f"{cfg.name}{scheme.suffix} ({cfg.n_layers} layers)"
    results: dict = {"pte_bytes": {}, "export_s": {}, "kernels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"ExecuTorch .pte, fused MoE op": True, "ExecuTorch .pte, gather + einsum experts": False}
        if not cfg.is_moe:
            head = " + 8da8w head" if scheme.embedding_bits == 8 else ""
            variants = {f"ExecuTorch .pte (dense: XNNPACK 8da4w linears{head})": False}
        runners = {}
        for name, fused in variants.items():
            console.print(f"{args.model}: {name} ...")
            started = time.perf_counter()
            path = export_pte(loaded, Path(tmp) / f"{len(runners)}.pte", max_seq_len, fused_moe=fused,
                              embedding_bits=args.embedding_bits)
            results["export_s"][name] = time.perf_counter() - started
            results["pte_bytes"][name] = path.stat().st_size
            operators, delegates = pte_kernels(path)
            results["kernels"][name] = {"portable/custom operators": sorted(set(operators)),
                                        "delegate calls": len(delegates), "delegates": sorted(set(delegates))}
            runners[name] = PteRunner(path)
        save_model(Path(tmp) / "int4", loaded.model, loaded.tokenizer, int4=True, scheme=scheme)
        results["int4_checkpoint_bytes"] = sum(f.stat().st_size for f in (Path(tmp) / "int4").iterdir())
        del loaded
        engine, _ = load_int4_model(Path(tmp) / "int4")
        results["agreement"] = {name: agreement(engine, runner, ids, max_seq_len, args)
                                for name, runner in runners.items()}
        results.update(run(engine, runners, ids, max_seq_len, args))
    report(results, args)


def _model(args: argparse.Namespace) -> LoadedModel:
    if args.checkpoint:
        return load_model(args.checkpoint)
    torch.manual_seed(0)
    cfg = resolve_model_config({"preset": "mobilemoe-s", "n_layers": args.layers})
    with torch.no_grad():
        model = Transformer(cfg).eval()
        for moe in model.moe_layers():  # a trained router has a non-zero selection bias
            moe.router.expert_bias.normal_(0, 0.05)
    return LoadedModel(model, None, False, Path("<memory>"))


@torch.inference_mode()
def agreement(engine: Transformer, runner: PteRunner, ids: list[int], max_seq_len: int, args: argparse.Namespace
              ) -> dict:
    """The .pte against the engine on the prompt then `--steps` greedy tokens, both fed the engine's tokens."""
    engine.setup_cache(1, max_seq_len)
    engine_logits = engine(torch.tensor([ids[:args.prompt]]), input_pos=torch.arange(args.prompt)).logits[0, -1]
    for pos in range(args.prompt):
        pte_logits = runner.step(ids[pos], pos)
    errors, same = [], None
    for step in range(args.steps + 1):
        errors.append(float((pte_logits - engine_logits.float()).abs().max() / engine_logits.float().abs().max()))
        token = int(engine_logits.argmax())
        if same is None and int(pte_logits.argmax()) != token:
            same = step
        if step == args.steps:
            break
        pos = args.prompt + step
        engine_logits = engine(torch.tensor([[token]]), input_pos=torch.tensor([pos])).logits[0, -1]
        pte_logits = runner.step(token, pos)
    later = sorted(errors[1:])
    return {"greedy_tokens_equal": args.steps + 1 if same is None else same, "of": args.steps + 1,
            "rel_error_prompt_end": errors[0], "rel_error_steps_median": later[len(later) // 2],
            "rel_error_steps_max": later[-1]}


@torch.inference_mode()
def run(engine: Transformer, runners: dict[str, PteRunner], ids: list[int], max_seq_len: int,
        args: argparse.Namespace) -> dict:
    engine_name = "ours (INT4 engine)"

    def pte_prefill(runner: PteRunner) -> None:
        for pos in range(args.prompt):
            runner.step(ids[pos], pos)

    def engine_prefill() -> None:
        engine.setup_cache(1, max_seq_len)
        engine(torch.tensor([ids[:args.prompt]]), input_pos=torch.arange(args.prompt))

    prefill = {name: (lambda r=r: pte_prefill(r)) for name, r in runners.items()} | {engine_name: engine_prefill}
    for fn in prefill.values():
        fn()  # warm-up; leaves every cache filled with the prompt
    seconds = interleaved(list(prefill.values()), lambda fn: fn(), args.rounds)
    prefill_tok_s = {name: args.prompt / t for name, t in zip(prefill, seconds, strict=True)}

    position = {name: args.prompt for name in [*runners, engine_name]}

    def pte_decode(name: str) -> None:
        for _ in range(args.steps):
            runners[name].step(ids[position[name]], position[name])
            position[name] += 1

    def engine_decode(step) -> None:  # compiled and eager share the engine's cache and one position counter
        for _ in range(args.steps):
            step(torch.tensor([[ids[position[engine_name]]]]), input_pos=torch.tensor([position[engine_name]]))
            position[engine_name] += 1

    compiled = compile_decode(engine)
    decoders = {name: (lambda n=name: pte_decode(n)) for name in runners}
    decoders |= {f"{engine_name}, compiled decode": lambda: engine_decode(compiled),
                 f"{engine_name}, eager decode": lambda: engine_decode(engine)}
    engine_decode(compiled)  # compiles, untimed
    seconds = interleaved(list(decoders.values()), lambda fn: fn(), args.rounds)
    return {"prefill_tok_s": prefill_tok_s,
            "decode_tok_s": {name: args.steps / t for name, t in zip(decoders, seconds, strict=True)}}


def report(results: dict, args: argparse.Namespace) -> None:
    out = Path(args.out or f"bench_results/pte_vs_engine/{args.model.split()[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**vars(args), **results}, indent=2))
    engine_decode = results["decode_tok_s"]["ours (INT4 engine), compiled decode"]
    engine_prefill = results["prefill_tok_s"]["ours (INT4 engine)"]
    previous = "ExecuTorch .pte, gather + einsum experts"
    console.print(f"{args.model}, {args.threads} threads; prompt {args.prompt}, decode {args.steps} tokens after it, "
                  f"median of {args.rounds} rounds; INT4 checkpoint {human_bytes(results['int4_checkpoint_bytes'])}")
    console.print("| implementation | size | prefill tok/s | vs engine | decode tok/s | vs engine (compiled) | "
                  "vs previous .pte |")
    console.print("|---|---|---|---|---|---|---|")
    for name, decode in results["decode_tok_s"].items():
        prefill = results["prefill_tok_s"].get(name.split(",")[0] if name.startswith("ours") else name)
        size = human_bytes(results["pte_bytes"][name]) if name in results["pte_bytes"] else ""
        vs_previous = (f"{decode / results['decode_tok_s'][previous]:.2f}x"
                       if previous in results["decode_tok_s"] and name != previous and name in results["pte_bytes"]
                       else "")
        prefill_text = f"{prefill:.1f} | {prefill / engine_prefill:.2f}x" if prefill else " | "
        console.print(f"| {name} | {size} | {prefill_text} | {decode:.1f} | {decode / engine_decode:.2f}x | "
                      f"{vs_previous} |")
    for name, agreed in results["agreement"].items():
        console.print(f"{name} vs engine: greedy tokens equal for {agreed['greedy_tokens_equal']} of {agreed['of']}; "
                      f"logits rel. error {agreed['rel_error_prompt_end']:.1e} at the prompt's end, "
                      f"{agreed['rel_error_steps_median']:.1e} median / {agreed['rel_error_steps_max']:.1e} max after")
    for name, kernels in results["kernels"].items():
        console.print(f"{name}: {kernels['delegate calls']} XNNPACK delegate calls; portable/custom operators: "
                      f"{', '.join(kernels['portable/custom operators'])}")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
