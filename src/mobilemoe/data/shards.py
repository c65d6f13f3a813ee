"""Token shards on disk: one directory per source and split.

    tokens.bin   every document's token ids back to back, each document ending in EOS (uint16 when the
                 vocab fits, else uint32), read through a numpy memmap
    index.npy    int64 document offsets into tokens.bin, length n_docs + 1 (index[0] = 0, index[-1] = n_tokens)
    mask.bin     optional, uint8 per token: 1 where the token is a training target (SFT: assistant tokens)
    meta.json    dtype, counts, vocab size, EOS id and the sha256 of tokens.bin, index.npy and mask.bin

A shard is written into a fresh directory by `write_shard` (the caller renames a finished parent directory
into place, see `prepare`), and `Shard.open` checks that the index, mask and data agree before anything reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobilemoe.errors import MobileMoEError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


DATA_FILES = ("tokens.bin", "index.npy", "mask.bin")


@dataclass
class ShardStats:
    documents: int
    tokens: int
    loss_tokens: int  # tokens that are training targets (all of them without a mask)
    sha256: str  # of tokens.bin
    bytes: int
    files: dict[str, str]  # sha256 of every data file of the shard (tokens.bin, index.npy, mask.bin)


def write_shard(directory: Path, docs: Iterable[tuple[list[int], list[bool] | None]], vocab_size: int,
                eos_id: int) -> ShardStats:
    """Write documents (token ids, optional per-token loss mask) as a shard; EOS is appended to each.

    The EOS closing a masked (SFT) document is not a target: generation stops at `<|im_end|>`.
    """
    directory.mkdir(parents=True, exist_ok=False)
    dtype = token_dtype(vocab_size)
    offsets = [0]
    masked: bool | None = None
    loss_tokens = 0
    with open(directory / "tokens.bin", "wb") as ftok, open(directory / "mask.bin", "wb") as fmask:
        for ids, mask in docs:
            if masked is None:
                masked = mask is not None
            if masked != (mask is not None):
                raise MobileMoEError(f"shard {directory}: documents mix masked (chat) and unmasked text")
            ftok.write(np.asarray([*ids, eos_id], dtype=dtype).tobytes())
            if mask is not None:
                fmask.write(np.asarray([*mask, False], dtype=np.uint8).tobytes())
                loss_tokens += sum(mask)
            else:
                loss_tokens += len(ids) + 1
            offsets.append(offsets[-1] + len(ids) + 1)
    if not masked:
        (directory / "mask.bin").unlink()
    np.save(directory / "index.npy", np.asarray(offsets, dtype=np.int64))
    files = {name: file_sha256(directory / name) for name in DATA_FILES if (directory / name).is_file()}
    stats = ShardStats(documents=len(offsets) - 1, tokens=offsets[-1], loss_tokens=loss_tokens,
                       sha256=files["tokens.bin"], bytes=(directory / "tokens.bin").stat().st_size, files=files)
    meta = {"dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos_id, "masked": bool(masked),
            "documents": stats.documents, "tokens": stats.tokens, "loss_tokens": loss_tokens, "sha256": stats.sha256,
            "files": files}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
    return stats


class Shard:
    """A read-only view of a shard: `tokens` (memmap), `offsets` (doc boundaries), `mask` (memmap or None)."""

    def __init__(self, directory: Path, tokens: np.ndarray, offsets: np.ndarray, mask: np.ndarray | None,
                 meta: dict):
        self.directory, self.tokens, self.offsets, self.mask, self.meta = directory, tokens, offsets, mask, meta

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @classmethod
    def open(cls, directory: str | Path) -> Shard:
        directory = Path(directory)
        where = f"shard {directory}"
        files = [directory / name for name in ("meta.json", "index.npy", "tokens.bin")]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MobileMoEError(f"{where} is incomplete (missing {', '.join(missing)}); re-run "
                                 "`mobilemoe data prepare` to rebuild it")
        file = directory / "meta.json"
        try:
            meta = json.loads(file.read_text())
            dtype = np.dtype(meta["dtype"])
            file = directory / "index.npy"
            offsets = np.load(file)  # never pickled: np.load refuses object arrays
        except (ValueError, KeyError, TypeError, EOFError, OSError) as err:
            raise MobileMoEError(f"{where} is corrupt: {file.name} cannot be read ({err}). Delete it and re-run "
                                 "`mobilemoe data prepare`.") from None
        size = (directory / "tokens.bin").stat().st_size
        n_tokens = size // dtype.itemsize
        bad = None
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
            bad = "its index is not a list of increasing document offsets starting at 0"
        elif size % dtype.itemsize or int(offsets[-1]) != n_tokens:
            bad = f"its index covers {int(offsets[-1])} tokens but tokens.bin holds {size / dtype.itemsize:g}"
        elif meta.get("tokens") != n_tokens:
            bad = f"meta.json says {meta.get('tokens')} tokens but tokens.bin holds {n_tokens}"
        mask = None
        if not bad and meta.get("masked"):
            mask_file = directory / "mask.bin"
            if not mask_file.is_file() or mask_file.stat().st_size != n_tokens:
                bad = "its loss mask (mask.bin) is missing or not one byte per token"
            else:
                mask = np.memmap(mask_file, dtype=np.uint8, mode="r")
        if bad:
            raise MobileMoEError(f"{where} is corrupt: {bad}. Delete it and re-run `mobilemoe data prepare`.")
        tokens = np.memmap(directory / "tokens.bin", dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype)
        return cls(directory, tokens, offsets, mask, meta)
