"""Packed training batches from a weighted mixture of token shards, deterministic and resumable.

Each source is an endless token stream: epoch after epoch of its documents (each ending in EOS) in an
order shuffled per epoch from the seed. A training row is the next `seq_len + 1` tokens of one source's
stream; the source of every row is drawn by weight from an RNG keyed by (seed, step), and the source's
cursor then moves on by `seq_len` (so every token is a target exactly once per epoch). The whole position
is therefore `step` plus one cursor per source: a resumed run continues with exactly the batches an
uninterrupted run would see.

Distributed: every rank draws the same global batch of `world_size * batch_size` rows and keeps the rows
of its rank, so N processes see the same global batch as one process with N times the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilemoe.data.shards import Shard
from mobilemoe.errors import MobileMoEError

IGNORE_INDEX = -100  # targets with this value take no loss (torch cross_entropy's default ignore_index)


def row_arrays(tokens: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one row of seq_len + 1 tokens; masked-out targets become IGNORE_INDEX."""
    tokens = tokens.astype(np.int64)
    targets = tokens[1:].copy()
    if mask is not None:
        targets[mask[1:] == 0] = IGNORE_INDEX
    return tokens[:-1], targets


def mixture_rows(seed: int, step: int, rows: int, probs: np.ndarray) -> np.ndarray:
    """The source of each of a step's `rows` global rows, drawn by weight from an RNG keyed by (seed, step)."""
    return np.random.default_rng([seed, step]).choice(len(probs), size=rows, p=probs)


class _SourceStream:
    """One shard seen as an endless stream of epochs, documents shuffled per epoch."""

    def __init__(self, shard: Shard, seed: int, index: int):
        self.shard, self.seed, self.index = shard, seed, index
        self.lengths = np.diff(shard.offsets)
        self.total = shard.n_tokens
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start of each document in the epoch's stream) for `epoch`."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, self.index, epoch]).permutation(len(self.lengths))
            starts = np.concatenate([[0], np.cumsum(self.lengths[order])])
            self._epochs = {k: v for k, v in self._epochs.items() if k >= epoch - 1}  # keep it small
            self._epochs[epoch] = (order, starts)
        return self._epochs[epoch]

    def read(self, position: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens (and loss mask) at [position, position + n) of the endless stream."""
        tokens, masks = [], []
        while n > 0:
            epoch, offset = divmod(position, self.total)
            order, starts = self._epoch(epoch)
            d = int(np.searchsorted(starts, offset, side="right")) - 1
            begin = int(self.shard.offsets[order[d]] + offset - starts[d])
            take = min(n, int(self.shard.offsets[order[d] + 1]) - begin)
            tokens.append(self.shard.tokens[begin:begin + take])
            if self.shard.mask is not None:
                masks.append(self.shard.mask[begin:begin + take])
            position, n = position + take, n - take
        return checked(self.shard, np.concatenate(tokens)), (np.concatenate(masks) if masks else None)


def checked(shard: Shard, tokens: np.ndarray) -> np.ndarray:
    """`tokens`, after checking every id is inside the shard's vocabulary (a flipped byte in tokens.bin would
    otherwise end as an IndexError deep in the model)."""
    if len(tokens) and int(tokens.max()) >= int(shard.meta["vocab_size"]):
        raise MobileMoEError(f"shard {shard.directory} holds token id {int(tokens.max())}, outside its vocabulary of "
                             f"{shard.meta['vocab_size']}: tokens.bin is corrupt. `mobilemoe data verify "
                             f"{shard.directory.parent.parent}` checks every shard; delete that directory and re-run "
                             "`mobilemoe data prepare` to rebuild it.")
    return tokens


class PackedBatches:
    """Endless `(inputs, targets)` int64 batches [batch_size, seq_len] drawn from a weighted mixture.

    `sources` is a list of (shard directory, weight). Targets are the next token, IGNORE_INDEX (-100)
    where no loss is taken (SFT shards: everything but assistant tokens).
    """

    def __init__(self, sources: list[tuple[Path, float]], seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not sources:
            raise MobileMoEError("PackedBatches needs at least one (shard directory, weight) source")
        for path, weight in sources:
            if not weight > 0:
                raise MobileMoEError(f"mixture weight of {path} must be > 0, got {weight}")
        if seq_len < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise MobileMoEError(f"bad batch shape: seq_len={seq_len}, batch_size={batch_size}, "
                                 f"rank={rank}, world_size={world_size}")
        self.dirs = [Path(p) for p, _ in sources]
        shards = [Shard.open(p) for p in self.dirs]
        for shard in shards:
            if shard.n_tokens == 0:
                raise MobileMoEError(f"shard {shard.directory} is empty; drop it from the mixture")
        self.streams = [_SourceStream(s, seed, i) for i, s in enumerate(shards)]
        weights = np.asarray([w for _, w in sources], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0
        self.cursors = [0] * len(shards)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        global_rows = self.batch_size * self.world_size
        choice = mixture_rows(self.seed, self.step, global_rows, self.probs)
        mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        inputs = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        targets = np.empty_like(inputs)
        for row, source in enumerate(choice):
            if row in mine:
                tokens, mask = self.streams[source].read(self.cursors[source], self.seq_len + 1)
                i = row - mine.start
                inputs[i], targets[i] = row_arrays(tokens, mask)
            self.cursors[source] += self.seq_len
        self.step += 1
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "cursors": list(self.cursors), "seed": self.seed, "seq_len": self.seq_len,
                "sources": [str(d) for d in self.dirs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["cursors"]) != len(self.streams) or state["seq_len"] != self.seq_len:
            raise MobileMoEError(f"saved data position is for {len(state['cursors'])} sources at seq_len "
                                 f"{state['seq_len']}, but this loader has {len(self.streams)} sources at seq_len "
                                 f"{self.seq_len}; resume with the same data mixture and sequence length")
        self.step, self.cursors = int(state["step"]), [int(c) for c in state["cursors"]]


def iter_eval_batches(shard_dir: str | Path, seq_len: int, batch_size: int,
                      max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out batches: the shard's tokens in order, cut into rows; the last row is padded (no loss)."""
    shard = Shard.open(shard_dir)
    starts = range(0, max(shard.n_tokens - 1, 0), seq_len)
    n_batches = -(-len(starts) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        rows = starts[b * batch_size:(b + 1) * batch_size]
        inputs = np.full((len(rows), seq_len), shard.eos_id, dtype=np.int64)
        targets = np.full_like(inputs, IGNORE_INDEX)
        for i, start in enumerate(rows):
            stop = min(start + seq_len + 1, shard.n_tokens)
            mask = shard.mask[start:stop] if shard.mask is not None else None
            x, y = row_arrays(checked(shard, shard.tokens[start:stop]), mask)
            inputs[i, :len(x)], targets[i, :len(y)] = x, y
        yield torch.from_numpy(inputs), torch.from_numpy(targets)
