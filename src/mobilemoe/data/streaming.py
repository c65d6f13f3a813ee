"""Training rows straight from Hugging Face `datasets`, streamed and tokenized on the fly (nothing downloaded
in full, nothing prepared on disk): the data of the paper's recipes (`hub_data:` in a training recipe).

As torchtitan's HuggingFaceDataset does it: every source is `load_dataset(name, streaming=True)` split across
the torchrun ranks with `datasets.distributed.split_dataset_by_node` (whole files per rank when their count
divides by the world size, else every world_size-th record), read in the dataset's own order (a shuffle
buffer would not come back bit-exact after a resume), each document tokenized as it arrives and ended
with EOS, and the tokens packed back to back into rows. Rows are cut and the mixture drawn exactly as for
token shards (loader.py): a row is the next `seq_len + 1` tokens of one source, which then moves on by
`seq_len`; the source of every row is drawn by weight from an RNG keyed by (seed, step). At the end of a
dataset the source starts its next epoch (`set_epoch`: datasets reshuffles the order of its files).

Resuming: a source's position is the `IterableDataset.state_dict()` taken just before the first document
that still has unread tokens, plus how many of that document's tokens were read; a resumed run reloads
that state, re-reads and re-tokenizes that document, and continues with bit-exact the rows an
uninterrupted run sees.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilemoe.data.documents import open_hf_stream, record_to_document
from mobilemoe.data.loader import mixture_rows, row_arrays
from mobilemoe.errors import ConfigError, MobileMoEError
from mobilemoe.tokenizer import Tokenizer

# A hub dataset or model name as the hub spells it: owner/name.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class HubSource:
    """One mixture source: a hub dataset (`owner/name`) or a local dataset directory (JSON lines, parquet, ...;
    what `datasets.load_dataset(<directory>)` reads), with its config, split and the record field with text."""

    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    @classmethod
    def parse(cls, value: str | dict[str, Any] | HubSource, where: str, base_dir: Path) -> HubSource:
        """From `owner/name[:config]`, a directory, or a mapping {name, config, split, text_field}."""
        from mobilemoe.config import from_dict

        if isinstance(value, str):
            name, _, config = value.partition(":") if HUB_NAME.match(value) else (value, "", "")
            source = cls(name, config or None)
        else:
            source = value if isinstance(value, HubSource) else from_dict(cls, value, where)
        local = _local_dir(source.name, base_dir)
        if local is not None:
            source.name = str(local)
        elif not HUB_NAME.fullmatch(source.name):
            raise ConfigError(f"{where} must be a dataset name 'owner/name' or 'owner/name:config', a mapping "
                              f"{{name, config, split, text_field}}, or an existing local dataset directory; got "
                              f"{source.name!r}")
        return source


def _local_dir(name: str, base_dir: Path) -> Path | None:
    """`name` as an existing directory (as given, or under the recipe's directory), else None."""
    for path in (Path(name).expanduser(), base_dir / name):
        if path.is_dir():
            return path.resolve()
    return None


def load_tokenizer(spec: str, base_dir: Path) -> Tokenizer:
    """A tokenizer.json, a directory with one (e.g. a checkpoint), or a hub model's (owner/name, downloaded with
    its tokenizer_config.json, which holds the chat template)."""
    for path in (Path(spec).expanduser(), base_dir / spec):
        if path.exists():
            return Tokenizer.load(path)
    if not HUB_NAME.fullmatch(spec):
        raise MobileMoEError(f"tokenizer {spec!r} is neither a tokenizer.json / directory that exists nor a hub model "
                             "name owner/name")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        file = hf_hub_download(spec, "tokenizer.json")
        with contextlib.suppress(EntryNotFoundError):  # the chat template, beside tokenizer.json in the hub cache
            hf_hub_download(spec, "tokenizer_config.json")
    except Exception as err:  # offline, unknown or gated repository: huggingface_hub raises many types
        raise MobileMoEError(f"could not download the tokenizer of '{spec}' from the Hugging Face hub "
                             f"({type(err).__name__}: {err}); check the name, your connection and access (gated "
                             "models need `hf auth login` after accepting their licence), or point `tokenizer:` at "
                             "a local tokenizer.json") from None
    return Tokenizer.load(file)


class _Document:
    """A tokenized document: ids (EOS-terminated), loss mask, and the dataset position just before it."""

    __slots__ = ("before", "epoch", "ids", "mask")

    def __init__(self, ids: np.ndarray, mask: np.ndarray, before: dict | None, epoch: int):
        self.ids, self.mask, self.before, self.epoch = ids, mask, before, epoch


class HubStream:
    """One source as an endless token stream on this rank: documents of the rank's part of the dataset, epoch
    after epoch, tokenized on demand."""

    def __init__(self, source_name: str, source: HubSource, tokenizer: Tokenizer, rank: int, world_size: int):
        from datasets.distributed import split_dataset_by_node

        self.source_name, self.source, self.tokenizer = source_name, source, tokenizer
        dataset = open_hf_stream(source.name, source.config, source.split)
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size) if world_size > 1 else dataset
        self.epoch = 0
        self.position: dict | None = None  # dataset state after the last document read (None: start of the epoch)
        self.pending: list[_Document] = []  # documents with unread tokens, the first one read up to `offset`
        self.offset = 0
        self._records: Iterator[dict[str, Any]] | None = None
        self._fresh_epoch = True  # this epoch started from its beginning (an empty one is an error)

    def _next_document(self) -> _Document:
        while True:
            if self._records is None:
                self.dataset.set_epoch(self.epoch)
                if self.position is not None:
                    self.dataset.load_state_dict(self.position)
                self._records = iter(self.dataset)
            before = self.position
            try:
                record = next(self._records)
            except StopIteration:
                if self._fresh_epoch:
                    raise MobileMoEError(f"data source '{self.source_name}' ({self.source.name}) gives this process no "
                                         f"document: its records need a '{self.source.text_field}' field (set "
                                         "text_field) or messages; check the split, or use fewer processes than "
                                         "the dataset has records") from None
                self.epoch, self.position, self._records, self._fresh_epoch = self.epoch + 1, None, None, True
                continue
            self.position = self.dataset.state_dict()
            ids, mask = self._encode(record_to_document(record, self.source.text_field))
            if ids is not None:
                self._fresh_epoch = False
                return _Document(ids, mask, before, self.epoch)

    def _encode(self, doc: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
        """EOS-terminated ids and loss mask of a document; (None, None) for an empty one or a conversation
        without an assistant answer (nothing to learn from)."""
        tok = self.tokenizer
        if isinstance(doc, str):
            if not doc.strip():
                return None, None
            ids = [*tok.encode(doc, start=True), tok.eos_id]
            return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)
        if not doc or not any(m["role"] == "assistant" and m["content"].strip() for m in doc):
            return None, None
        ids, mask = tok.encode_chat(doc)
        # the closing EOS is not a target, as in token shards (generation stops at the end of turn)
        return np.asarray([*ids, tok.eos_id], dtype=np.int64), np.asarray([*mask, False], dtype=bool)

    def read(self, n: int, advance: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `n` tokens and their loss mask; then move on by `advance` tokens."""
        while sum(len(d.ids) for d in self.pending) - self.offset < n:
            self.pending.append(self._next_document())
        tokens = np.concatenate([d.ids for d in self.pending])[self.offset:self.offset + n]
        mask = np.concatenate([d.mask for d in self.pending])[self.offset:self.offset + n]
        self.offset += advance
        while self.pending and self.offset >= len(self.pending[0].ids):
            self.offset -= len(self.pending.pop(0).ids)
        return tokens, mask

    def state_dict(self) -> dict[str, Any]:
        if self.pending:
            head = self.pending[0]
            return {"epoch": head.epoch, "dataset": head.before, "offset": self.offset}
        return {"epoch": self.epoch, "dataset": self.position, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.offset = int(state["epoch"]), state["dataset"], int(state["offset"])
        self.pending, self._records, self._fresh_epoch = [], None, self.position is None


class StreamedBatches:
    """Endless `(inputs, targets)` int64 batches [batch_size, seq_len] from a weighted mixture of hub streams; the
    same interface (iteration, state_dict / load_state_dict) as PackedBatches."""

    def __init__(self, streams: list[HubStream], weights: list[float], seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if seq_len < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise MobileMoEError(f"bad batch shape: seq_len={seq_len}, batch_size={batch_size}, "
                                 f"rank={rank}, world_size={world_size}")
        self.streams = streams
        weights_ = np.asarray(weights, dtype=np.float64)
        self.probs = weights_ / weights_.sum()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        # every rank draws the same global batch and fills its own rows from its own part of each dataset
        choice = mixture_rows(self.seed, self.step, self.batch_size * self.world_size, self.probs)
        inputs = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        targets = np.empty_like(inputs)
        for i, source in enumerate(choice[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]):
            tokens, mask = self.streams[source].read(self.seq_len + 1, advance=self.seq_len)
            inputs[i], targets[i] = row_arrays(tokens, mask)
        self.step += 1
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "streams": [s.state_dict() for s in self.streams], "seed": self.seed,
                "seq_len": self.seq_len, "sources": [s.source_name for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [s.source_name for s in self.streams]
        if state.get("sources") != names or state.get("seq_len") != self.seq_len:
            raise MobileMoEError(f"saved data position is for the hub sources {state.get('sources')} at seq_len "
                                 f"{state.get('seq_len')}, but this run streams {names} at seq_len {self.seq_len}; "
                                 "resume with the same data mixture and sequence length")
        self.step = int(state["step"])
        for stream, saved in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(saved)


class HubData:
    """The data of a training recipe's `hub_data`: streamed sources and the recipe's tokenizer. The same methods
    the trainer calls on PreparedData; hub streams have no held-out split (no val_loss is measured)."""

    def __init__(self, sources: dict[str, HubSource], tokenizer: str, base_dir: Path):
        self.sources = sources
        self.tokenizer = load_tokenizer(tokenizer, base_dir)
        for source in sources.values():  # a bad name fails here, before the run directory is written
            open_hf_stream(source.name, source.config, source.split)

    def source_names(self) -> list[str]:
        return list(self.sources)

    def check_vocab(self, model_vocab_size: int) -> None:
        from mobilemoe.data.prepare import check_vocab

        check_vocab(self.tokenizer, model_vocab_size, f"the tokenizer {self.tokenizer.source}")

    def train_batches(self, mixture: list[tuple[str, float]], seq_len: int, batch_size: int, seed: int,
                      rank: int = 0, world_size: int = 1) -> StreamedBatches:
        streams = [HubStream(name, self.sources[name], self.tokenizer, rank, world_size) for name, _ in mixture]
        return StreamedBatches(streams, [w for _, w in mixture], seq_len, batch_size, seed, rank, world_size)

    def eval_batches(self, name: str, seq_len: int, batch_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(())
