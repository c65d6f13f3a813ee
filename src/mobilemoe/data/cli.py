"""`mobilemoe data ...`: fetch open corpora from the registries, prepare token shards, inspect them."""

from __future__ import annotations

import argparse


def _fetch(args: argparse.Namespace) -> None:
    from mobilemoe.data import registry
    from mobilemoe.ui import console, human_bytes

    names = list(registry.SOURCES) if args.source == "all" else [args.source]
    for name in names:
        path = registry.fetch(name)
        info = registry.fetch_info(name)
        console.print(f"[bold]{name}[/]: {info['documents']} documents, {human_bytes(path.stat().st_size)} "
                      f"({info['license']}) -> {path}")


def _prepare(args: argparse.Namespace) -> None:
    from mobilemoe.data import prepare
    from mobilemoe.ui import console

    data = prepare(args.recipe, out=args.out, force=args.force)
    console.print(f"prepared data in [bold]{data.dir}[/]")


def _sources(args: argparse.Namespace) -> None:
    from rich.table import Table

    from mobilemoe.data import registry
    from mobilemoe.data.documents import embedded_info, embedded_names
    from mobilemoe.ui import console

    table = Table(title="data sources: `registry:<name>` (fetched once into the cache) and `embedded:<name>`")
    for col in ("source", "from", "kind", "licence", "what"):
        table.add_column(col)
    for s in registry.SOURCES.values():
        table.add_row(f"registry:{s.name}", f"{s.client} {s.package}", s.kind, s.license, s.what)
    for name in embedded_names():
        info = embedded_info(name)
        table.add_row(f"embedded:{name}", "the package", "", info["license"], f"{info['what']} ({info['subset']})")
    console.print(table)


def _verify(args: argparse.Namespace) -> None:
    from mobilemoe.data import PreparedData
    from mobilemoe.ui import console

    PreparedData(args.dir).verify()
    console.print(f"{args.dir}: the tokenizer and every shard file match their manifest checksums")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="fetch open corpora, prepare token shards (see docs/data.md)")
    sub = p.add_subparsers(dest="data_verb", required=True, metavar="<subverb>")
    f = sub.add_parser("fetch", help="download a registry source once into the cache and extract its documents")
    f.add_argument("source", help="a registry source name (see `mobilemoe data sources`) or 'all'")
    f.set_defaults(handler=_fetch)
    r = sub.add_parser("prepare", help="tokenize a data recipe into shards (cached by recipe hash)")
    r.add_argument("recipe", help="data recipe YAML, e.g. recipes/data/embedded.yaml")
    r.add_argument("--out", default=None, help="output directory (default: under the cache dir, keyed by recipe)")
    r.add_argument("--force", action="store_true", help="replace --out even if it holds something other than "
                   "prepared data (its contents are deleted)")
    r.set_defaults(handler=_prepare)
    s = sub.add_parser("sources", help="table of the registry and embedded sources with licences")
    s.set_defaults(handler=_sources)
    v = sub.add_parser("verify", help="check a prepared directory's shards against their indexes and manifest")
    v.add_argument("dir")
    v.set_defaults(handler=_verify)
