#!/usr/bin/env bash
# Issue 16's GPU check, for a machine with 1..8 NVIDIA GPUs (bf16, SM >= 80), run from the repository root:
#     bash bench/gpu_check.sh            # results in gpu_check/ (JSON per run) and on stdout
# 1. the tests that need CUDA (padded grouped GEMM vs the per-expert loop; the trainer in bf16 + compile on cuda
#    vs CPU fp32, and its resume); 2. full-size MobileMoE-S at seq 4096 on one GPU; 3. on every GPU of the node
#    (FSDP2, bf16 parameters, fp32 reduction). Copy the printed tokens/s, MFU and peak memory into BENCHMARKS.md.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_check}
STEPS=${STEPS:-30}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.__version__, torch.cuda.get_device_name())"
$PY -m pytest -q -m "" tests/test_model.py tests/test_train.py -k cuda
$PY bench/gpu_train.py --preset mobilemoe-s --seq 4096 --batch 4 --steps "$STEPS" --json "$OUT/mobilemoe-s_1gpu.json"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 1 ]; then
  $PY -m torch.distributed.run --nproc_per_node "$GPUS" bench/gpu_train.py --preset mobilemoe-s --seq 4096 --batch 4 \
    --steps "$STEPS" --json "$OUT/mobilemoe-s_${GPUS}gpu.json"
fi
