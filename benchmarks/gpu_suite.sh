#!/usr/bin/env bash
# The GPU suite in one command, from the source tree, with only what the GPU machines have:
#   bash benchmarks/gpu_suite.sh [tests] [bench] [bench-tf32] [variants] [variants-tf32] [sanitizer] [depthwise] [exported]   (no argument: all)
# tests:     every test marked gpu except compute-sanitizer (pytest -m gpu), in 8 processes
# bench:     benchmarks/bench_gpu.py --save (torch.compile rows within BENCH_BUDGET_S seconds)
# bench-tf32: the same with TF32 on both sides
# variants:  bench_gpu.py --variants --profile --no-main: every layer under each earlier rule
#            (bench_gpu.VARIANTS) that changes its kernels, against the current ones, vgg_small's and
#            LeNet-5's steps under the weight-gradient rules (STEP_RULES), and each kernel of the steps
#            alone (not the layer/step/bandwidth rows of `bench`)
# variants-tf32: the same with --tf32 (the session-6 tensor-core direct convolutions and weight
#            gradients against the FP32 kernels they replace, and the one-buffer rule), no --profile
# sanitizer: the compute-sanitizer memcheck and racecheck tests, where the tool is installed
# depthwise: bench_gpu.py --depthwise --no-main: MobileNet-like depthwise layers, the depthwise kernels
#            against the GEMM they replaced and PyTorch eager
# exported:  cubins compiled elsewhere by NVRTC 13.5 (GRAPHCONV_EXPORTED, see device_check.py) checked here
# Logs and results go to $OUT (default benchmarks/results/logs); each step has a time limit.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=${*:-tests bench bench-tf32 variants variants-tf32 sanitizer depthwise exported}
PAR=""  # pytest-xdist and pytest-timeout where installed (the GPU machines have both)
$PY -c "import xdist" 2>/dev/null && PAR="-n ${JOBS:-8}"
$PY -c "import pytest_timeout" 2>/dev/null && PAR="$PAR --timeout 240"
status=0
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu,memory.used --format=csv
  $PY -c "import sys, cupy, numpy, torch; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
  $PY -c "from codegen import nvrtc; print('NVRTC', nvrtc.version())"
  command -v compute-sanitizer || echo "no compute-sanitizer"
} 2>&1 | tee "$OUT/env.txt"
for step in $STEPS; do
  echo "=== $step $(date +%T)"
  case $step in
    tests)
      timeout "${TESTS_S:-300}" $PY -m pytest -q tests/test_gpu.py -m gpu -k "not sanitizer" $PAR -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"; s=${PIPESTATUS[0]} ;;
    bench|bench-tf32)
      precision=""; [ "$step" = bench-tf32 ] && precision="--tf32"
      timeout "${BENCH_S:-420}" $PY benchmarks/bench_gpu.py --save $precision --out "$OUT" \
        --budget-s "${BENCH_BUDGET_S:-240}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$step.log"; s=${PIPESTATUS[0]} ;;
    variants)
      timeout "${VARIANTS_S:-420}" $PY benchmarks/bench_gpu.py --variants --profile --no-main --out "$OUT/variants" \
        ${BENCH_ARGS:-} 2>&1 | tee "$OUT/variants.log"; s=${PIPESTATUS[0]} ;;
    variants-tf32)
      timeout "${VARIANTS_S:-420}" $PY benchmarks/bench_gpu.py --variants --tf32 --no-main --out "$OUT/variants-tf32" \
        ${BENCH_ARGS:-} 2>&1 | tee "$OUT/variants-tf32.log"; s=${PIPESTATUS[0]} ;;
    depthwise)
      timeout "${DEPTHWISE_S:-300}" $PY benchmarks/bench_gpu.py --depthwise --no-main --out "$OUT/depthwise" \
        ${BENCH_ARGS:-} 2>&1 | tee "$OUT/depthwise.log"; s=${PIPESTATUS[0]} ;;
    sanitizer)
      timeout "${SANITIZER_S:-300}" $PY -m pytest -q tests/test_gpu.py -m gpu -k sanitizer -p no:cacheprovider 2>&1 \
        | tee "$OUT/sanitizer.log"; s=${PIPESTATUS[0]} ;;
    exported)
      if [ -d "${GRAPHCONV_EXPORTED:-.gpucache}" ]; then
        GRAPHCONV_CACHE=${GRAPHCONV_EXPORTED:-.gpucache} timeout "${EXPORTED_S:-300}" $PY benchmarks/device_check.py verify 2>&1 \
          | tee "$OUT/exported.log"; s=${PIPESTATUS[0]}
      else echo "no exported cubins"; s=0; fi ;;
    *) echo "unknown step $step"; s=2 ;;
  esac
  echo "=== $step exit $s $(date +%T)"
  [ "$s" = 0 ] || status=1
done
exit $status
