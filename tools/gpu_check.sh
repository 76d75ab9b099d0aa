#!/usr/bin/env bash
# One machine with one CUDA GPU, under 8 minutes: the gpu-marked tests, then the GPU benchmarks.
# Logs and results files go to ${OUT:-gpu_results}; copy the JSON files to benchmarks/results/ and run
# `fastsort bench readme` to regenerate the README tables from them.
# Runs from the checkout without installing (PYTHONPATH), with whatever torch/triton/timm the machine has.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.txt, remember failures
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
  [ $rc -eq 0 ] || status=1
}
{
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  "$PY" -c "import nvidia.dali as d; print('dali', d.__version__)" || echo "DALI missing: DALI GPU tests skip"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step gpu_tests 240 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests
step bench_mish 180 "$PY" -m fastsort bench mish --modes native,fused --out "$OUT/mish-gpu.json"
step bench_mish_compile 150 "$PY" -m fastsort bench mish --dtypes bf16 --models efficientnet_b4 \
  --modes native,compile --out "$OUT/mish-gpu-compile.json"
exit $status
