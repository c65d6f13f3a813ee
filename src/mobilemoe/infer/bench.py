"""`mobilemoe bench`: the on-device profile of INT4 models on this CPU, side by side in one run.

For each preset (random INT4 weights, made directly in the INT4 format) or INT4 checkpoint directory (its
trained weights, e.g. a QAT stage's final/): prefill tok/s and time to first token at each prompt length,
decode tok/s at each context, INT4 weight bytes, resident memory after loading, and decode bandwidth use
(bytes read per token, active weights + KV cache at that context, x tok/s over this machine's copy bandwidth,
measured as one more turn in every round of that decode measurement), at each thread count asked for. Prompts
are real text
(the embedded Moby Dick; through a checkpoint's tokenizer, else as UTF-8 byte ids), so the routing sees
real token sequences. All models stay loaded and take turns in every measurement (median of 3 rounds).
Tables, bench.json and bench.png name each model by `NAME=` in front of its argument, else by a checkpoint's
recorded name (its config's), else by the preset's.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mobilemoe.checkpoint import checkpoint_scheme, load_config, read_tokenizer
from mobilemoe.config import ModelConfig, get_preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.infer.engine import (
    KV_CACHE_DTYPES,
    build_int4_model,
    compile_decode,
    in_huge_pages,
    random_int4_tensors,
    read_int4_checkpoint,
    stored_layout,
)
from mobilemoe.infer.generate import last_position
from mobilemoe.io import atomic_write_json
from mobilemoe.model import Transformer, build_on_meta, count_parameters
from mobilemoe.quantize import INT4_BYTES_PER_PARAM, PAPER_SCHEME, Int4Scheme, weight_bytes
from mobilemoe.ui import console, human_bytes, human_count


@dataclass
class ModelBench:
    name: str  # what tables and plots call it
    preset: str  # the preset or checkpoint directory measured
    active_params: int
    total_params: int
    int4_bytes: int
    active_int4_bytes: int  # weight bytes read per decoded token
    peak_rss: int  # process peak after this model was loaded (models load in order)
    kv_bytes_per_position: int  # KV cache bytes a decode step reads per context position
    kv_cache: str = "fp16"  # the KV cache it runs with (a name of engine.KV_CACHE_DTYPES)
    prefill_tok_s: dict[int, float] = field(default_factory=dict)
    ttft_s: dict[int, float] = field(default_factory=dict)
    decode_tok_s: dict[int, float] = field(default_factory=dict)
    prefill_rounds: dict[int, int] = field(default_factory=dict)  # a context alone is prefilled in one round
    # the copy and read bandwidth (bytes/s) measured between the rounds of this decode measurement: the yardstick
    # of bandwidth use. On a shared machine it moves between runs (2 threads: 42-73 GB/s here), so it is taken
    # in the same minutes as the decode it divides
    yardstick: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.kv_cache} KV)"


class Bandwidth:
    """The machine's memory bandwidth now, by torch ops on 512 MB buffers allocated once: `copy()` counts the
    reads and writes of a tensor copy (the yardstick of bandwidth use), `read()` the bytes a sum reads (the
    ceiling of a decode step, which only reads). Each is the best of `repeats` passes."""

    def __init__(self, n_bytes: int = 1 << 29):
        self.src, self.dst = torch.ones(n_bytes // 4), torch.empty(n_bytes // 4)
        self.dst.copy_(self.src)  # touch every page before timing
        self.n_bytes = n_bytes

    def copy(self, repeats: int = 3) -> float:
        return 2 * self.n_bytes / min(timed(lambda: self.dst.copy_(self.src)) for _ in range(repeats))

    def read(self, repeats: int = 3) -> float:
        return self.n_bytes / min(timed(self.src.sum) for _ in range(repeats))


@dataclass
class Yardstick:
    """The copy and read bandwidth of one measurement: called as `interleaved`'s `after_round`, it takes one more
    turn in every round; bandwidth use divides by its `medians()`."""

    bandwidth: Bandwidth
    copies: list[float] = field(default_factory=list)  # bytes/s, one per round
    reads: list[float] = field(default_factory=list)

    def __call__(self) -> None:
        self.copies.append(self.bandwidth.copy())
        self.reads.append(self.bandwidth.read())

    def medians(self) -> dict[str, float]:
        return {"copy": median(self.copies), "read": median(self.reads)}


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def real_text_ids(n: int, vocab: int, tokenizer=None) -> list[int]:
    from mobilemoe.data.documents import read_embedded

    text = "".join(doc for doc, _ in zip(read_embedded("moby-dick"), range(50), strict=False) if isinstance(doc, str))
    ids = tokenizer.encode(text) if tokenizer is not None else [b % vocab for b in text.encode()]
    return (ids * (n // len(ids) + 1))[:n]


@torch.inference_mode()
def teacher_forced(engine: Transformer, sequence: list[int], prompt_len: int, dtype: torch.dtype | None = None,
                   c_decode: bool = True) -> torch.Tensor:
    """Next-token logits [len(sequence) - prompt_len, vocab]: the prompt prefilled, then every later token of
    `sequence` decoded one step at a time, with a `dtype` KV cache (None: the model's own; the C step, or with
    `c_decode` False the torch modules). For accuracy benches that compare engines on the same tokens."""
    engine.c_decode = c_decode
    engine.setup_cache(1, len(sequence), dtype)
    steps = [engine(torch.tensor([sequence[:prompt_len]]), input_pos=torch.arange(prompt_len)).logits[0, -1]]
    for pos in range(prompt_len, len(sequence) - 1):
        steps.append(engine(torch.tensor([[sequence[pos]]]), input_pos=torch.tensor([pos])).logits[0, -1])
    engine.c_decode = True
    return torch.stack(steps).float()


def bench_names(specs: list[str]) -> list[tuple[str, str]]:
    """(name, preset or checkpoint directory) of each `mobilemoe bench` model: `NAME=WHAT` names it, a checkpoint
    is named by its config's recorded name, a preset by itself; two models may not share a name."""
    pairs = []
    for spec in specs:
        name, named, what = spec.partition("=")
        if not named or Path(spec).exists():
            name, what = "", spec
        if not name:
            name = load_config(what).name if (Path(what) / "config.json").is_file() else what
        pairs.append((name, what))
    names = [name for name, _ in pairs]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise MobileMoEError(f"two models would be called {repeated[0]!r} in the tables and the plot: name them, "
                             "e.g. --preset a=DIR --vs b=DIR")
    return pairs


@torch.inference_mode()
def bench_models(presets: list[str], prompt_lens: list[int], contexts: list[int], decode_steps: int,
                 rounds: int = 3, compile: bool = True, threads: tuple[int, ...] = (),
                 huge_pages: bool = False, kv_caches: tuple[str, ...] = ("fp16",)) -> list[ModelBench]:
    """Every measurement alternates between the models round by round (median of `rounds`), so load on
    a shared machine hits them alike. With `compile`, decode runs the torch.compile'd step (compiled once
    per context length, before timing). `threads`: measure at each of these thread counts (the models are
    loaded once), results keyed `(threads, length)`; empty: at the current count, keyed by length. `huge_pages`:
    every model's weights in transparent huge pages (`engine.in_huge_pages`). `kv_caches`: each preset runs
    once per KV cache (engines sharing one copy of a preset's weights), in the order given, e.g. S fp16, S int8,
    Pro fp16, Pro int8."""
    models, results, tokenizers = [], [], {}
    named = bench_names(presets)
    for name, preset in named:
        scheme = PAPER_SCHEME
        if (Path(preset) / "config.json").is_file():
            cfg, tensors = read_int4_checkpoint(preset)
            scheme, tokenizers[preset] = checkpoint_scheme(preset), read_tokenizer(preset)
        else:
            cfg = get_preset(preset)
            tensors = random_int4_tensors(cfg)
        tensors = stored_layout(cfg, tensors)  # in the kernels' layout: the engines (one per KV cache) share it
        tensors = in_huge_pages(tensors) if huge_pages else tensors
        engines = [build_int4_model(cfg, tensors) for _ in kv_caches]
        meta = build_on_meta(cfg)
        count = count_parameters(meta)
        for model, kv_cache in zip(engines, kv_caches, strict=True):
            model.kv_cache_dtype = KV_CACHE_DTYPES[kv_cache]
            models.append(model)
            results.append(ModelBench(name, preset, count.active, count.total, weight_bytes(meta, scheme=scheme),
                                      active_int4_bytes(cfg, scheme), _rss(), kv_cache_bytes(cfg, 1, kv_cache),
                                      kv_cache))
    extra = rounds * decode_steps + 2
    bandwidth = Bandwidth()
    ids = {id(m): real_text_ids(max(prompt_lens + contexts) + extra, m.cfg.vocab_size, tokenizers.get(r.preset))
           for m, r in zip(models, results, strict=True)}
    for n_threads in threads or (None,):
        if n_threads is not None:
            torch.set_num_threads(n_threads)

        def key(n: int, n_threads: int | None = n_threads) -> int | tuple[int, int]:
            return n if n_threads is None else (n_threads, n)

        for model in models:
            _prefill(model, ids[id(model)][:32])  # warm-up
        # lengths in ascending order; decode at a context goes on from the cache its last prefill left. A
        # context that is not a prompt length is prefilled once (timed too: one round)
        for n in sorted(set(prompt_lens) | set(contexts)):
            n_rounds = rounds if n in prompt_lens else 1
            times = interleaved(models, lambda m, n=n: _prefill(m, ids[id(m)][:n], extra), n_rounds)
            for r, seconds in zip(results, times, strict=True):
                r.prefill_tok_s[key(n)], r.ttft_s[key(n)], r.prefill_rounds[key(n)] = n / seconds, seconds, n_rounds
            if n in contexts:
                _decode_at(models, results, ids, n, key(n), decode_steps, rounds, compile, bandwidth)
    return results


def _decode_at(models: list[Transformer], results: list[ModelBench], ids: dict[int, list[int]], ctx: int,
               key: int | tuple[int, int], decode_steps: int, rounds: int, compile: bool, bandwidth: Bandwidth) -> None:
    position, steps = {}, {}
    for model in models:
        steps[id(model)] = compile_decode(model) if compile else model
        steps[id(model)](torch.tensor([[ids[id(model)][ctx]]]), input_pos=torch.tensor([ctx]))  # compiles
        position[id(model)] = ctx + 1

    def decode_block(model: Transformer) -> None:
        for _ in range(decode_steps):
            pos = position[id(model)]
            steps[id(model)](torch.tensor([[ids[id(model)][pos]]]), input_pos=torch.tensor([pos]))
            position[id(model)] = pos + 1

    yardstick = Yardstick(bandwidth)
    for r, seconds in zip(results, interleaved(models, decode_block, rounds, yardstick), strict=True):
        r.decode_tok_s[key] = decode_steps / seconds
        r.yardstick[key] = yardstick.medians()


def interleaved(items: list, work: Callable[[object], object], rounds: int,
                after_round: Callable[[], None] | None = None) -> list[float]:
    """Median seconds of `work(item)` per item, the items taking turns in each round, so load on a shared
    machine hits them alike; `after_round()`, if given, takes one more turn at the end of each round."""
    times: list[list[float]] = [[] for _ in items]
    for _ in range(rounds):
        for i, item in enumerate(items):
            times[i].append(timed(lambda item=item: work(item)))
        if after_round is not None:
            after_round()
    return [median(t) for t in times]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _prefill(model: Transformer, ids: list[int], extra: int = 1) -> None:
    model.setup_cache(1, len(ids) + extra)  # the model's kv_cache_dtype
    model(torch.tensor([ids]), input_pos=torch.arange(len(ids)), logits_at=last_position(len(ids)))


def active_int4_bytes(cfg: ModelConfig, scheme: Int4Scheme = PAPER_SCHEME) -> int:
    """INT4 weight bytes read per decoded token: every weight but the routed experts a token does not pick (the
    embedding/head at the bits `scheme` keeps it)."""
    model = build_on_meta(cfg)
    total = weight_bytes(model, scheme=scheme)
    for moe in model.moe_layers():
        per_expert = (moe.gate_up_proj.numel() + moe.down_proj.numel()) // moe.cfg.n_routed_experts
        total -= int((moe.cfg.n_routed_experts - moe.cfg.top_k) * per_expert * INT4_BYTES_PER_PARAM)
    return total


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def kv_cache_bytes(cfg: ModelConfig, context: int, kv_cache: str = "fp16") -> int:
    """KV cache bytes a decode step reads at `context`: keys and values of every layer and position (int8: and
    their fp32 scales, one per position and kv head)."""
    per_row = cfg.head_dim * KV_CACHE_DTYPES[kv_cache].itemsize + (4 if kv_cache == "int8" else 0)
    return cfg.n_layers * 2 * cfg.n_kv_heads * per_row * context


def run_bench(presets: list[str], prompt_lens: list[int], contexts: list[int], decode_steps: int,
              threads: list[int], out: Path, compile: bool = True, rounds: int = 3, huge_pages: bool = False,
              kv_caches: tuple[str, ...] = ("fp16",)) -> dict:
    """`bench_models` at each thread count (models loaded once); a table per thread count, bench.json and
    bench.png."""
    results = bench_models(presets, prompt_lens, contexts, decode_steps, rounds, compile, tuple(threads), huge_pages,
                           tuple(kv_caches))

    def by_thread(values: dict) -> dict[str, dict[int, float]]:
        return {str(t): {n: v for (tt, n), v in values.items() if tt == t} for t in threads}

    per_thread = ("prefill_tok_s", "ttft_s", "decode_tok_s", "prefill_rounds", "yardstick")
    report = {"threads": threads, "rounds": rounds, "compiled_decode": compile, "huge_pages": huge_pages,
              "kv_caches": list(kv_caches),
              "models": [asdict(r) | {f: by_thread(getattr(r, f)) for f in per_thread} |
                         {"decode_bandwidth_use": by_thread(decode_bandwidth_use(r))} for r in results]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", report)
    for t in threads:
        print_table(results, t, huge_pages)
    plot(results, out / "bench.png")
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return report


def decode_bandwidth_use(r: ModelBench) -> dict:
    """Per decode measurement: bytes read per token (weights + KV cache at that context) x tok/s, as a fraction
    of the copy and of the read bandwidth measured between its rounds."""
    use = {}
    for key, tok_s in r.decode_tok_s.items():
        context = key[1] if isinstance(key, tuple) else key
        streamed = (r.active_int4_bytes + r.kv_bytes_per_position * context) * tok_s
        use[key] = {"of_copy": streamed / r.yardstick[key]["copy"], "of_read": streamed / r.yardstick[key]["read"]}
    return use


def print_table(results: list[ModelBench], threads: int, huge_pages: bool = False) -> None:
    from rich.table import Table

    # ratios vs the last model with the same KV cache
    bases = {r.kv_cache: r for r in results}
    caches = ", ".join(f"{c} KV cache: vs {b.name}" for c, b in bases.items())
    pages = "weights in 2 MB huge pages" if huge_pages else "weights in 4 KB pages"
    table = Table(title=f"INT4 on this CPU ({threads} threads; {pages}; {caches})")
    for col in ("model", "active/total", "INT4 weights", "peak RSS so far", "metric", "value", "ratio",
                "bytes read / token (weights + KV)", "bandwidth use of copy / read (their GB/s)"):
        table.add_column(col)
    for r in results:
        base, use = bases[r.kv_cache], decode_bandwidth_use(r)
        rows = [(f"prefill {n} tok/s (TTFT {r.ttft_s[t, n]:.2f}s{', 1 round' if r.prefill_rounds[t, n] == 1 else ''})",
                 v, base.prefill_tok_s[t, n], "", "") for (t, n), v in r.prefill_tok_s.items() if t == threads]
        for (t, c), v in r.decode_tok_s.items():
            if t != threads:
                continue
            copy, read = r.yardstick[t, c]["copy"], r.yardstick[t, c]["read"]
            rows.append((f"decode @{c} tok/s", v, base.decode_tok_s[t, c],
                         human_bytes(r.active_int4_bytes + r.kv_bytes_per_position * c),
                         f"{use[t, c]['of_copy']:.0%} / {use[t, c]['of_read']:.0%} "
                         f"({copy / 1e9:.1f} / {read / 1e9:.1f})"))
        for i, (metric, value, ref, read_text, bw) in enumerate(rows):
            head = (r.label, f"{human_count(r.active_params)}/{human_count(r.total_params)}",
                    human_bytes(r.int4_bytes), human_bytes(r.peak_rss)) if i == 0 else ("",) * 4
            table.add_row(*head, metric, f"{value:,.1f}", f"{value / ref:.2f}x", read_text, bw)
    console.print(table)


def plot(results: list[ModelBench], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), layout="constrained")
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        for ax, values in zip(axes, (r.prefill_tok_s, r.decode_tok_s), strict=True):
            xs = [j + i * width for j in range(len(values))]
            ax.bar(xs, list(values.values()), width, label=r.label)
            ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(values))],
                          [f"{t} thr, {n}" for t, n in values])
    axes[0].set(title="prefill", xlabel="threads, prompt tokens", ylabel="tokens/s")
    axes[1].set(title="decode", xlabel="threads, context tokens", ylabel="tokens/s")
    # below both plots, not over the bars
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(results), 3))
    fig.savefig(path, dpi=120)
    plt.close(fig)
