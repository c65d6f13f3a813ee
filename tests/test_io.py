"""Atomic writes leave either the old file or the new one, never half of one; one cache root everywhere."""

from pathlib import Path

import pytest

from mobilemoe.errors import ConfigError, MobileMoEError
from mobilemoe.io import atomic_dir, atomic_file, atomic_write_json, cache_root, read_mapping


def test_atomic_file_keeps_the_old_file_when_the_write_fails(tmp_path: Path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    atomic_write_json(tmp_path / "new" / "x.json", {"a": 1})  # creates the parent
    assert read_mapping(tmp_path / "new" / "x.json") == {"a": 1}


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path: Path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(MobileMoEError, match="untouched"), atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
        raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and [p.name for p in out.iterdir()] == ["a"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b"]


def test_read_mapping_says_what_is_wrong(tmp_path: Path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not found"):
        read_mapping(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        read_mapping(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_mapping(tmp_path / "bad.json")


def test_one_cache_root_for_data_benchmarks_and_kernels(monkeypatch, tmp_path: Path):
    from mobilemoe.eval import data as eval_data

    monkeypatch.delenv("MOBILEMOE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mobilemoe"
    monkeypatch.setenv("MOBILEMOE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert eval_data.cache_dir() == tmp_path / "mine" / "benchmarks"
