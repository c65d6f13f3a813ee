"""Files on disk: atomic writes, mapping reads and the cache root — one way to do each, used everywhere.

Every output is written to a temporary sibling (`.<name>.tmp`) and renamed onto its final name only once
it is complete, so a crash, a full disk or Ctrl-C never leaves half a file or half a directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mobilemoe.errors import ConfigError, MobileMoEError


def cache_root() -> Path:
    """Where downloads, prepared data and builds are cached: `$MOBILEMOE_CACHE`, else
    `$XDG_CACHE_HOME/mobilemoe`, else `~/.cache/mobilemoe`."""
    if os.environ.get("MOBILEMOE_CACHE"):
        return Path(os.environ["MOBILEMOE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobilemoe"


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


@contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `directory` to fill; on success it replaces `directory` in one rename.

    On any error the temporary is removed and the previous `directory` (if any) is untouched; running
    out of disk becomes a MobileMoEError that says so.
    """
    directory = Path(directory)
    tmp = _temp_sibling(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except OSError as err:
        raise MobileMoEError(f"could not write {directory}: {err}. The previous version (if any) is untouched; "
                             "free some disk space and retry.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping, with clear errors for the usual mistakes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data
