#!/usr/bin/env bash
# One machine with one CUDA GPU, under 8 minutes: the gpu-marked tests, then the GPU benchmarks.
# Logs and results files go to ${OUT:-gpu_results}; copy the JSON files to benchmarks/results/ and run
# `fastsort bench readme` to regenerate the README tables from them.
# Runs from the checkout without installing (PYTHONPATH), with whatever torch/triton/timm the machine has.
# The loader and train-step benchmarks need real images: BENCH_DATA (default data/bench/elpv-384-jpeg, made by
# tools/make_bench_data.py); without them those two steps are skipped with a message. DALI's variants need
# nvidia-dali-cuda120 on the machine; where it is missing they are reported as skipped and the rest still runs.
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
BENCH_DATA="${BENCH_DATA:-data/bench/elpv-384-jpeg}"
if [ -d "$BENCH_DATA" ]; then
  step bench_loader 150 "$PY" -m fastsort bench loader "$BENCH_DATA" --batch 64 --size 384 --epochs 3 \
    --out "$OUT/loader-$(basename "$BENCH_DATA")-gpu.json"
  step bench_step 150 "$PY" -m fastsort bench step "$BENCH_DATA" --model efficientnet_b4 --batch 64 --size 384 \
    --precisions bf16,fp32 --out "$OUT/step-gpu.json"
else
  echo "== no $BENCH_DATA: loader and step benchmarks skipped (make it with tools/make_bench_data.py)"
fi
exit $status
