"""One error type for everything a user can get wrong; the CLI prints its message and exits non-zero.

`explain` turns the OS and file-format errors a user can cause (disk full, permissions, a path through a
file, a truncated or foreign file) into the same kind of message, so `mobilemoe.cli.main` never shows a
traceback for them (`MOBILEMOE_DEBUG=1` or `mobilemoe --debug` does).
"""

from __future__ import annotations

import errno
import json
import types
import zipfile
from pathlib import Path


class MobileMoEError(Exception):
    """A problem with the user's input (config, files, budgets) that they can fix.

    The message must say what is wrong and what to do; the CLI shows it without a traceback.
    """


class ConfigError(MobileMoEError, ValueError):
    """A config or recipe names a key that does not exist or holds inconsistent values."""


NO_SPACE = "no space left on the device"
_OS_ERRORS = {
    errno.ENOSPC: (NO_SPACE, "free some space or write elsewhere (--out), then retry; outputs are written "
                             "atomically, so nothing that was there before was replaced"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere (--out), then retry"),
    errno.EACCES: ("permission denied", "choose a location you can write to, or fix the permissions"),
    errno.EPERM: ("operation not permitted", "choose a location you can write to, or fix the permissions"),
    errno.EROFS: ("the file system is read-only", "write somewhere else (--out)"),
    errno.ENOTDIR: ("a part of this path is a file, not a directory", "choose a path whose parents are "
                                                                      "directories"),
    errno.ENOENT: ("no such file or directory", "check the path (and that its parent directory exists)"),
    errno.EISDIR: ("is a directory, where a file is expected", "pass the file inside it"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
}


def explain(err: BaseException) -> str | None:
    """A one-paragraph message for a known OS or format error, naming the file and what to do; None for
    anything else (a bug, which should keep its traceback)."""
    if isinstance(err, MobileMoEError):
        return str(err)
    if describe_os_error(err):
        return f"{_where(err, getattr(err, 'filename', None))}: {describe_os_error(err)}"
    text = str(err)
    kind = _format_error(err)
    if kind:
        return (f"{_where(err)} is truncated or is not {kind} ({text.splitlines()[0] if text else type(err).__name__})."
                " Re-create it with the command that wrote it, or pass the right file.")
    return None


def describe_os_error(err: BaseException) -> str | None:
    """What went wrong and what to do, for a known OS error (disk full also as a library's own error)."""
    code = errno.ENOSPC if is_no_space(err) else getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code not in _OS_ERRORS:
        return None
    what, todo = _OS_ERRORS[code]
    return f"{what}. {todo}."


def is_no_space(err: BaseException) -> bool:
    """The disk is full, as an OSError or as the message of a library's own error (safetensors)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return "os error 28" in str(err) or "No space left on device" in str(err)


def _format_error(err: BaseException) -> str | None:
    from safetensors import SafetensorError
    from yaml import YAMLError

    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (SafetensorError, "a safetensors file"), (json.JSONDecodeError, "valid JSON"), (YAMLError, "valid YAML"),
        (UnicodeDecodeError, "UTF-8 text"), ((zipfile.BadZipFile, EOFError), "a complete archive")]
    try:
        import pyarrow

        kinds.append((pyarrow.ArrowException, "an Arrow file"))
    except ImportError:
        pass
    return next((kind for types_, kind in kinds if isinstance(err, types_)), None)


def _where(err: BaseException, filename: object = None) -> str:
    """The file an error is about: the OS error's own file name, else, in the innermost frame of MobileMoE code
    on the traceback, a variable that names a file (`file`, `config_file`, ...), a `path` or a `directory`."""
    if filename:
        return str(filename)
    found = None
    tb: types.TracebackType | None = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__", "").startswith("mobilemoe"):
            paths = {name: value for name, value in frame.f_locals.items() if isinstance(value, Path)}
            for suffix in ("file", "path", "directory"):
                named = [value for name, value in paths.items() if name.endswith(suffix)]
                if named:
                    found = named[0]
                    break
        tb = tb.tb_next
    return str(found) if found is not None else "a file this command reads or writes"
