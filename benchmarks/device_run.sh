#!/usr/bin/env bash
# On a GPU machine that has torch and triton but no network: install the carried wheels
# (.whl/), run the GPU tests, then `make bench`. Logs and results go to $OUT (default ./artifacts).
set -uo pipefail
OUT=${OUT:-artifacts}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -x ${TESTS:-tests/test_kernels.py tests/test_gpu.py} 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  make bench BENCH_ARGS="--out $OUT ${BENCH_ARGS:-}" 2>&1 | tee "$OUT/bench.log"
fi
