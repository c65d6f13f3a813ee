"""Hand-written CPU kernels (C), compiled on first use with the system C compiler and loaded with ctypes.

Plain C + OpenMP rather than a torch C++ extension: it builds in about a second (no torch headers) and
shares torch's OpenMP runtime (the .so asks for `libgomp.so.1`, which torch has already loaded), so
`torch.set_num_threads` sets our threads too. One source (`q8q4.c`) is built once per instruction-set
variant; the variant is chosen at run time from the CPU's flags, or forced with MOBILEMOE_KERNEL. Builds
are cached under `<cache root>/kernels` (`mobilemoe.io.cache_root`), keyed by source, flags and compiler.
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

from mobilemoe.errors import MobileMoEError
from mobilemoe.io import cache_root

SOURCE = Path(__file__).with_name("q8q4.c")
COMMON_FLAGS = ["-O3", "-std=gnu11", "-fopenmp", "-shared", "-fPIC"]
# Best first. Each needs all its CPU flags (x86: /proc/cpuinfo names; ARM: the Features line).
VARIANTS: dict[str, tuple[list[str], set[str]]] = {
    "avx512_vnni": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c",
                     "-mprefer-vector-width=512"], {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    "avx_vnni": (["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], {"avx2", "fma", "f16c", "avx_vnni"}),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "neon_dot": (["-march=armv8.2-a+dotprod+fp16"], {"asimddp"}),
    "portable": ([], set()),
}
ENV_VARIANT = "MOBILEMOE_KERNEL"


def cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}


def supported_variants() -> list[str]:
    """The variants this CPU can run, best first."""
    flags, arm = cpu_flags(), platform.machine() in ("aarch64", "arm64")
    ok = [name for name, (_, needs) in VARIANTS.items() if needs <= flags]
    return [v for v in ok if (v == "neon_dot") == arm or v == "portable"]


def selected_variant() -> str:
    """MOBILEMOE_KERNEL if set (and runnable here), else the best variant for this CPU."""
    forced = os.environ.get(ENV_VARIANT)
    if forced:
        if forced not in VARIANTS:
            raise MobileMoEError(f"{ENV_VARIANT}={forced} is not a kernel variant; use one of {', '.join(VARIANTS)}")
        if forced not in supported_variants():
            raise MobileMoEError(f"{ENV_VARIANT}={forced}: this CPU lacks the instructions it needs "
                                 f"(runnable here: {', '.join(supported_variants())})")
        return forced
    return supported_variants()[0]


@functools.cache
def q8q4_library(variant: str | None = None) -> ctypes.CDLL:
    """The compiled kernels of `variant` (default: `selected_variant()`)."""
    variant = variant or selected_variant()
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        raise MobileMoEError("the INT4 engine compiles its kernels with a C compiler on first use and none was "
                             "found: install gcc (e.g. `apt install gcc`), or set CC")
    flags = COMMON_FLAGS + VARIANTS[variant][0]
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    cache = cache_root() / "kernels"
    path = cache / f"q8q4-{variant}-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # a unique temporary (not io.atomic_file's fixed name): concurrent builders must not share it
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / "q8q4.so"
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                raise MobileMoEError(f"compiling the INT4 kernels ({variant}) failed:\n{result.stderr[-2000:]}")
            os.replace(built, path)  # atomic: a concurrent builder never sees half a library
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.q4_variant.restype = ctypes.c_char_p
    lib.q8_quantize.argtypes = [p, i, i, p, p, p]
    lib.q4_linear.argtypes = [p, i, i, i, p, p, p, p]
    lib.q4_ffn.argtypes = [p, i, i, i, p, p, p, p, p, p, p]
    lib.q4_moe.argtypes = [p, i, i, p, p, i, i, i, p, p, p, p, p, p, i, p, p, p, p, p, p, p]
    lib.attention_decode.argtypes = [p, p, p, p, p, i, i, i, i, i, i, p]
    lib.kv_quantize.argtypes = [p, i, i, p, p]
    lib.f16_from_f32.argtypes = lib.f32_from_f16.argtypes = [p, p, i]
    lib.decode_step.argtypes = [p, i, i, p, p]
    lib.w8_linear.argtypes = [p, i, i, i, p, p, p]
    for fn in (lib.q8_quantize, lib.q4_linear, lib.q4_ffn, lib.q4_moe, lib.attention_decode, lib.decode_step,
               lib.f16_from_f32, lib.f32_from_f16, lib.kv_quantize, lib.w8_linear):
        fn.restype = None
    return lib
