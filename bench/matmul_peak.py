"""Dense matmul peak of this machine in fp32 and bf16 (the this-cpu entry of train/device_peaks.yaml).

Run under the shared CPU lock: `flock /tmp/mobilemoe-cpu.lock python bench/matmul_peak.py`.
"""

import time

import torch

torch.manual_seed(0)
n = 2048
for dtype in (torch.float32, torch.bfloat16):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 1e9
    for _ in range(10):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    print(dtype, f"{2 * n**3 / best / 1e9:.0f} GFLOP/s (best of 10, {n}x{n}, {torch.get_num_threads()} threads)")
