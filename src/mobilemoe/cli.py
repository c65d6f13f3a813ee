"""The one command line: `mobilemoe <verb>`, verbs in pipeline order.

Each room of the package registers its verbs with a `register(subparsers)` function that imports
nothing heavy; the heavy imports happen inside the handlers, so `mobilemoe --help` stays quick.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from mobilemoe.errors import MobileMoEError, explain


def _models(args: argparse.Namespace) -> None:
    from rich.table import Table

    from mobilemoe.config import PRESETS, get_preset
    from mobilemoe.model import build_on_meta, count_parameters
    from mobilemoe.quantize import weight_bytes
    from mobilemoe.ui import console, human_bytes, human_count

    names = args.presets or list(PRESETS)
    table = Table(title="MobileMoE model presets (counts from the built module; embedding tied, counted once)")
    for col in ("preset", "layers", "d_model", "heads/kv", "experts", "top-k", "expert", "shared", "active",
                "total", "INT4 weights"):
        table.add_column(col, justify="left" if col == "preset" else "right")
    for name in names:
        cfg = get_preset(name)
        model = build_on_meta(cfg)
        count = count_parameters(model)
        table.add_row(name, str(cfg.n_layers), str(cfg.d_model), f"{cfg.n_heads}/{cfg.n_kv_heads}",
                      str(cfg.n_routed_experts or "dense"), str(cfg.top_k or "-"),
                      str(cfg.expert_size or cfg.ffn_size),
                      f"{cfg.n_shared_experts}x{cfg.shared_expert_size}" if cfg.n_shared_experts else "-",
                      human_count(count.active), human_count(count.total), human_bytes(weight_bytes(model)))
    console.print(table)


def _quickstart(args: argparse.Namespace) -> None:
    from mobilemoe.quickstart import quickstart

    quickstart(fast=args.fast, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobilemoe", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (or set MOBILEMOE_DEBUG=1)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="<verb>")
    p = sub.add_parser("models", help="table of model presets: shapes, active/total params, INT4 bytes")
    p.add_argument("presets", nargs="*", help="preset names (default: all)")
    p.set_defaults(handler=_models)
    # Rooms in pipeline order; each adds its verbs. Keep one line per room.
    for register in _room_registrars():
        register(sub)
    # The main job drives several rooms (data, train, eval), so it belongs to none of them.
    p = sub.add_parser("quickstart", help="the main job: a tiny MobileMoE and its dense twin through all four "
                       "stages on open data, evaluated, with a report (re-run to continue an interrupted one)")
    p.add_argument("--fast", action="store_true", help="about 2 minutes instead of about 15")
    p.add_argument("--out", default=None, help="output directory (default runs/quickstart[-fast])")
    p.set_defaults(handler=_quickstart)
    return parser


def _room_registrars() -> list:
    from mobilemoe.data import cli as data_cli
    from mobilemoe.eval import cli as eval_cli
    from mobilemoe.export import cli as export_cli
    from mobilemoe.infer import cli as infer_cli
    from mobilemoe.scaling import cli as scaling_cli
    from mobilemoe.train import cli as train_cli
    from mobilemoe.upcycle import cli as upcycle_cli

    return [scaling_cli.register, data_cli.register, train_cli.register, export_cli.register, infer_cli.register,
            eval_cli.register, upcycle_cli.register]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MOBILEMOE_DEBUG", "") not in ("", "0")
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # known user-facing failures become one message; anything else is a bug
        message = explain(err)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(err, MobileMoEError) else 1)
