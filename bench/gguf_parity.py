"""Does llama.cpp compute what we compute? A checkpoint's GGUF export vs our model, on real prompts.

    .venv/bin/python bench/gguf_parity.py CKPT [--quants f32,q8_0] [--new-tokens 32] [--out DIR]

For every quant: `mobilemoe export gguf`, then for each prompt (plain text and chat turns, encoded with the
checkpoint's tokenizer) the greedy continuation of llama.cpp (llama-cpp-python) and of our float model
(the checkpoint as loaded by `load_model`; INT4 checkpoints dequantized), and the prompt logits' largest
difference relative to our largest logit. Prints a table and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from mobilemoe.checkpoint import load_model
from mobilemoe.export.gguf import export_gguf
from mobilemoe.ui import console

TEXTS = ["Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse,",
         "The capital of France is", "Four score and seven years ago our fathers brought forth on this continent"]
QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "How do plants make food?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--quants", default="f32,q8_0")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_results/gguf_parity")
    args = parser.parse_args()
    loaded = load_model(args.checkpoint)
    tok = loaded.tokenizer
    prompts = [tok.encode(t) for t in TEXTS]
    if tok.im_start_id is not None:
        prompts += [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
                    for q in QUESTIONS]
    ours = [_ours(loaded.model, ids, args.new_tokens, tok.stop_ids()) for ids in prompts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants.split(","):
            path = export_gguf(loaded, Path(tmp) / f"m-{quant}.gguf", quant)
            theirs = [_llama_cpp(path, ids, args.new_tokens, tok.stop_ids(), args.threads) for ids in prompts]
            for i, ((want, ref), (got, logits)) in enumerate(zip(ours, theirs, strict=True)):
                first = next((j for j, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)
                rows.append({"quant": quant, "prompt": i, "prompt_tokens": len(prompts[i]), "ours": want,
                             "llama_cpp": got, "equal": want == got, "first_difference": first,
                             "rel_logit_error": float(np.abs(logits - ref).max() / np.abs(ref).max()),
                             "argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean())})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=2))
    console.print(f"{args.checkpoint} ({loaded.model.cfg.name}): greedy {args.new_tokens} tokens, llama.cpp vs ours")
    console.print("| quant | prompt | prompt tokens | greedy equal | first difference | rel. logit error | argmax |")
    console.print("|---|---|---|---|---|---|---|")
    for r in rows:
        first = "-" if r["first_difference"] is None else r["first_difference"]
        console.print(f"| {r['quant']} | {r['prompt']} | {r['prompt_tokens']} | {r['equal']} | {first} "
                      f"| {r['rel_logit_error']:.1e} | {r['argmax_agreement']:.2f} |")
    console.print(f"wrote {out / 'results.json'}")


@torch.inference_mode()
def _ours(model, ids: list[int], n: int, stop: set[int]) -> tuple[list[int], np.ndarray]:
    """Greedy tokens (full forward each step: no cache involved) and the prompt's logits."""
    logits = model(torch.tensor([ids])).logits[0].float().numpy()
    seq, new = list(ids), []
    for _ in range(n):
        token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        new.append(token)
        if token in stop:
            break
        seq.append(token)
    return new, logits


def _llama_cpp(path: Path, ids: list[int], n: int, stop: set[int], threads: int) -> tuple[list[int], np.ndarray]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(ids) + n + 8, logits_all=True, n_threads=threads, verbose=False)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        new = []
        for _ in range(n):
            new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if new[-1] in stop:
                break
            llm.eval([new[-1]])
        return new, logits
    finally:
        llm.close()


if __name__ == "__main__":
    main()
