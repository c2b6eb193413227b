#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine (device tool; 15 minutes a session, machine start
# included). First, here: `bash bench/gpu_wheels.sh`; then run it there with carry [".whl"]:
#     bash bench/gpu_check.sh          (timeout_s 480; it needs about 5 minutes)
# 1. tests/test_sam3.py on CUDA (TEST_TORCH_DEVICE=cuda): transformers' Sam3Model equality in float32 and under the
#    bfloat16 autocast that precision 'auto' picks on CUDA, the CLI with --device cuda;
# 2. bench/bench_gpu.py: SAM 3 (bf16 autocast and fp32), Grounded-SAM and Grounded-EdgeTAM at full size on the GPU.
# Logs and results land in $OUT (the device tool brings them back), or out/gpu elsewhere.
# `DEVICE=cpu BENCH_ARGS="--runs 1 --warmup 0" bash bench/gpu_check.sh` (without .whl/) checks the script here.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
device="${DEVICE:-cuda}"
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version; } 2>&1 | tee "$out/machine.txt"
if compgen -G '.whl/*.whl' >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/tests:$PWD/bench" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, transformers, automask; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__)" 2>&1 | tee -a "$out/machine.txt"
TEST_TORCH_DEVICE="$device" timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_sam3.py 2>&1 |
    tee "$out/tests.log"
tests=${PIPESTATUS[0]}
timeout 300 python3 bench/bench_gpu.py --device "$device" --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench" | tee -a "$out/machine.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
