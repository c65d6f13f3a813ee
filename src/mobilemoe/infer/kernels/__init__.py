"""Hand-written CPU kernels (C), compiled on first use with the system C compiler and loaded with ctypes.

Plain C + OpenMP rather than a torch C++ extension: it builds in about a second (no torch headers) and
shares torch's OpenMP runtime (the .so asks for `libgomp.so.1`, which torch has already loaded). The
build is cached under `<cache root>/kernels` (`mobilemoe.io.cache_root`), keyed by source, flags and CPU;
where there is no compiler or the CPU is not one the kernel's weight layout is written for, callers use aten instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from mobilemoe.io import cache_root

SOURCE = Path(__file__).with_name("moe_decode.c")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC"]


@functools.cache
def moe_decode_kernel() -> ctypes.CDLL | None:
    """The compiled `moe_decode` library, or None when it cannot be used on this machine."""
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None or torch.backends.cpu.get_cpu_capability() != "AVX512" or not _aten_layout_is_blocked_64():
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_model().encode()).hexdigest()[:16]
    cache = cache_root() / "kernels"
    path = cache / f"moe_decode-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # a unique temporary (not io.atomic_file's fixed name): concurrent builders must not share it
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / "moe_decode.so"
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                return None
            os.replace(built, path)  # atomic: a concurrent builder never sees half a library
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.moe_decode.argtypes = [p, p, p, i, i, i, p, p, p, p, p, p]
    lib.moe_decode.restype = None
    return lib


def _aten_layout_is_blocked_64() -> bool:
    """Does aten pack int4 weights as [N/64][K][32] bytes (row j low nibble, row j+32 high)? Checked on a
    small matrix, so a different torch build makes us fall back instead of computing garbage."""
    n, k = 128, 64
    unsigned = torch.arange(n * k, dtype=torch.int32).reshape(n, k) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1).contiguous().view(torch.uint8)
    if packed.numel() != n * k // 2:
        return False
    blocks = packed.flatten().view(n // 64, k, 32)
    rows = torch.cat([blocks & 15, blocks >> 4], dim=2).permute(0, 2, 1).reshape(n, k)
    return torch.equal(rows.to(torch.int32), unsigned)


def _cpu_model() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()
