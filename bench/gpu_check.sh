#!/usr/bin/env bash
# One GPU-machine call: build gemma4rt._C against the machine's torch, run tests/gpu, run the kernel
# microbenchmarks. Logs go to $OUT when set; a summary table prints last. Budget: < 8 minutes.
#   usage (repo root): bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gemma4rt_gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} GEMMA4RT_BUILD_EXT=1
PY=${PYTHON:-python3}
T0=$(date +%s)
nvidia-smi -L 2>&1 | head -2
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# light runtime deps of `import gemma4rt` that the image may lack, carried as wheels in .whl/
if ! $PY -c "import msgspec" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl 2>&1 | tail -2
fi

echo "== build"
BUILD=FAIL
if $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 && $PY -c "import torch, gemma4rt._C"; then
  BUILD=ok
else
  echo "pip install -e failed or left no extension; trying build_ext --inplace" | tee -a "$OUT/build.log"
  $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 && $PY -c "import torch, gemma4rt._C" && BUILD=ok
fi
grep -E "error|Error" "$OUT/build.log" | grep -v "^\s*$" | head -30
echo "build: $BUILD ($(( $(date +%s) - T0 ))s)"

echo "== tests/gpu"
TESTS="not run"
if [ "$BUILD" = ok ]; then
  timeout 250 $PY -m pytest tests/gpu/test_attention.py tests/gpu/test_moe.py tests/gpu/test_norm_rope_act.py tests/gpu/test_sampling.py tests/gpu -q -p no:cacheprovider -rs --tb=short --maxfail=40 2>&1 | tee "$OUT/pytest.log" | \
    grep -vE "^\s*$" | tail -60
  TESTS=$(grep -E "passed|failed|error" "$OUT/pytest.log" | tail -1)
fi
echo "tests done ($(( $(date +%s) - T0 ))s)"

echo "== kernel benchmarks"
if [ "$BUILD" = ok ]; then
  timeout $(( 460 - ($(date +%s) - T0) )) $PY bench/kernels/run_all.py --out "$OUT" "$@" >"$OUT/bench.log" 2>&1
  grep -E "FAILED|Error|error" "$OUT/bench.log" | head -10
fi
echo
echo "== summary ($(( $(date +%s) - T0 ))s)"
echo "build: $BUILD"
echo "tests: $TESTS"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md" || tail -30 "$OUT/bench.log" 2>/dev/null
