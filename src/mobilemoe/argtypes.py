"""argparse types for the CLI's numbers: a bad value is refused where it is parsed, naming the flag.

argparse turns an `ArgumentTypeError` into `mobilemoe <verb>: error: argument --top-p: must be in (0, 1],
got '2'` and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def number(kind: type = int, low: float | None = None, high: float | None = None, low_open: bool = False,
           what: str = "") -> Callable[[str], int | float]:
    """A parser of `kind` (int or float) in [low, high] (`low_open`: (low, high]); `what` names the range."""
    if not what:
        left = "(" if low_open else "["
        what = f"in {left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'} {what}, got {text!r}") from None
        bad = (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
               or (high is not None and value > high))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = number(int, 1, what="a positive integer")
non_negative_int = number(int, 0, what="0 or more")
positive_float = number(float, 0, low_open=True, what="positive")
non_negative_float = number(float, 0, what="0 or more")
probability = number(float, 0, 1, low_open=True, what="in (0, 1]")


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. `256,1024`."""
    values = [positive_int(item) for item in text.split(",") if item.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return values


def byte_size(text: str) -> float:
    """A size such as `3GB`, `512MB` or `1.5e9` (bytes), positive."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    unit = next((u for u in units if text.strip().upper().endswith(u)), "")
    digits = text.strip()[: len(text.strip()) - len(unit)]
    try:
        value = float(digits) * units.get(unit, 1.0)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 3GB, 512MB or 1.5e9 (bytes), got {text!r}")
    return value


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_int4_scheme_arguments(parser: argparse.ArgumentParser) -> None:
    """--embedding-bits and --rounding: how `--int4` quantizes a float checkpoint (`quantize.Int4Scheme`)."""
    parser.add_argument("--embedding-bits", type=int, choices=(4, 8),
                        help="with --int4 on float weights: bits of the tied embedding/head (4: the paper's format; "
                             "8: int8 per row, as llama.cpp keeps it — less loss on pretrained models). Default: the "
                             "scheme the checkpoint records (a QAT stage's), else 4")
    parser.add_argument("--rounding", choices=("rtn", "hqq"),
                        help="with --int4 on float weights: round to nearest (the paper's, what QAT trains against) "
                             "or torchao's HQQ scale fit (less loss on pretrained models). Default: the checkpoint's, "
                             "else rtn")


def int4_scheme(args: argparse.Namespace, checkpoint: str | Path | None = None):
    """The `quantize.Int4Scheme` of parsed --embedding-bits/--rounding; what they leave out comes from the scheme
    `checkpoint` records (`checkpoint.checkpoint_scheme`), else the paper's."""
    from mobilemoe.checkpoint import checkpoint_scheme
    from mobilemoe.quantize import PAPER_SCHEME

    recorded = PAPER_SCHEME if checkpoint is None else checkpoint_scheme(checkpoint)
    return recorded.with_overrides(args.embedding_bits, args.rounding)
