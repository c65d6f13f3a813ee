"""Files on disk: atomic writes, mapping reads and the cache root — one way to do each, used everywhere.

Every output is written to a temporary sibling (`.<name>.tmp`) and renamed onto its final name only once
it is complete, so a crash, a full disk or Ctrl-C never leaves half a file or half a directory behind.

Output directories carry a marker file (`.mobilemoe`, holding the kind of output: checkpoint, hf-export,
prepared-data, eval-results, run). Writing into an existing non-empty directory that is not our own output
of the same kind is refused unless the user passes `--force` (`claim_dir`), so nothing we did not write
is ever replaced.
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

from mobilemoe.errors import ConfigError, MobileMoEError, describe_os_error, is_no_space


def cache_root() -> Path:
    """Where downloads, prepared data and builds are cached: `$MOBILEMOE_CACHE`, else
    `$XDG_CACHE_HOME/mobilemoe`, else `~/.cache/mobilemoe`."""
    if os.environ.get("MOBILEMOE_CACHE"):
        return Path(os.environ["MOBILEMOE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobilemoe"


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


OUTPUT_MARKER = ".mobilemoe"
# Run directories written before the marker existed are recognised by these entries, so `--resume` and the
# quickstart keep continuing them.
LEGACY_SIGNATURES = {"run": ("recipe.yaml", "tensorboard")}


def output_kind(directory: str | Path) -> str | None:
    """The kind of mobilemoe output `directory` holds (its marker file), or None."""
    marker = Path(directory) / OUTPUT_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def claim_dir(directory: str | Path, kind: str, force: bool = False) -> Path:
    """Check that `kind` output may be written into `directory`, before any work is done: it must not exist,
    be empty, or hold our own output of the same `kind`; anything else is refused unless `force`."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise MobileMoEError(f"{directory} is a file, where an output directory ({kind}) is to be written; "
                             "choose another path")
    _check_parent(directory)
    if force or not directory.is_dir() or not any(directory.iterdir()) or output_kind(directory) == kind:
        return directory
    if kind in LEGACY_SIGNATURES and all((directory / name).exists() for name in LEGACY_SIGNATURES[kind]):
        return directory
    found = output_kind(directory)
    names = sorted(p.name for p in directory.iterdir())
    holds = (f"holds a mobilemoe {found}" if found else
             f"holds files mobilemoe did not write ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    raise MobileMoEError(f"{directory} already exists and {holds}, not a {kind}; nothing was written. Choose "
                         f"another output path, or pass --force to replace {directory} and everything in it.")


def mark_dir(directory: Path, kind: str) -> None:
    (directory / OUTPUT_MARKER).write_text(kind + "\n")


def _check_parent(path: Path) -> None:
    """A clear error when `path` cannot be created because one of its parents is a file."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MobileMoEError(f"cannot write {path}: {parent} is a file, not a directory; choose another path")
            return


def claim_file(path: str | Path) -> Path:
    """Check, before any work is done, that a file can be written at `path` (not a directory, no file for a
    parent directory)."""
    path = Path(path)
    if path.is_dir():
        raise MobileMoEError(f"{path} is a directory, where a file is to be written; pass a file path")
    _check_parent(path)
    return path


def _write_failed(target: Path, err: BaseException) -> MobileMoEError:
    detail = describe_os_error(err) or f"{err}."
    return MobileMoEError(f"could not write {target}: {detail} The previous version (if any) is untouched.")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds."""
    path = claim_file(path)
    tmp = _temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        if is_no_space(err) or isinstance(err, PermissionError):
            raise _write_failed(path, err) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


@contextmanager
def atomic_dir(directory: str | Path, kind: str | None = None, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `directory` to fill; on success it replaces `directory` in one rename.

    `kind` names the output for `claim_dir` (checked before the block runs) and the marker written with it;
    None is for directories inside our own (caches, a run's checkpoints). On any error the temporary is
    removed and the previous `directory` (if any) is untouched; running out of disk becomes a
    MobileMoEError that says so.
    """
    directory = Path(directory)
    if kind is not None:
        claim_dir(directory, kind, force)
    _check_parent(directory)
    tmp = _temp_sibling(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise _write_failed(directory, err) from None
    try:
        yield tmp
        if kind is not None:
            mark_dir(tmp, kind)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except Exception as err:
        if isinstance(err, OSError) or is_no_space(err):
            raise _write_failed(directory, err) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping, with clear errors for the usual mistakes."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))
        raise ConfigError(f"{path} is a directory; pass a YAML file" + (f", e.g. {path / inside[0]}" if inside else ""))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data
