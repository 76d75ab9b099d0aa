#!/usr/bin/env bash
# On a machine with one CUDA GPU: run the gpu-marked tests and write the log under ${OUT:-gpu_results}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
{
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  "$PY" -c "import nvidia.dali as d; print('dali', d.__version__)" || echo "DALI missing: DALI GPU tests will be skipped"
} 2>&1 | tee "$OUT/env.txt"
timeout 420 "$PY" -m pytest -q -m gpu -rs tests 2>&1 | tee "$OUT/gpu_tests.txt"
exit "${PIPESTATUS[0]}"
