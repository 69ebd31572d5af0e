#!/usr/bin/env bash
# One GPU-machine call: build gemma4rt._C against the machine's own torch, run tests/gpu, and run the
# benchmarks. Logs go to $OUT when set; a summary prints last. Keep the whole call under 9 minutes.
#
#   usage (repo root): bash bench/gpu_check.sh [STAGE ...]
#   stages (default: build tests kernels targets):
#     build    pip install --no-build-isolation --no-deps -e .   (nothing is downloaded)
#     tests    pytest tests/gpu (kernel ops vs references, bf16 model vs our fp32 path)
#     model    only tests/gpu/test_model_bf16.py
#     kernels  bench/kernels/run_all.py (each kernel's fraction of the copy / matmul limit)
#     targets  batch-1 TPOT at ~1k context for the five models (ours; transformers' for E2B)
#     serving  the cookbook-style throughput run for E2B against a server started here
#   The device image lacks msgspec: carry it as a wheel (`run(..., carry=[".whl"])`, see README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gemma4rt_gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} GEMMA4RT_BUILD_EXT=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PYTHON:-python3}
STAGES=${*:-build tests kernels targets}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( ${GPU_CHECK_BUDGET_S:-540} - $(elapsed) )); }
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
SUMMARY=()

nvidia-smi -L 2>&1 | head -2
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
if ! $PY -c "import msgspec" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl 2>&1 | tail -2
fi

BUILD="not run"
if has build; then
  echo "== build"
  if $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 && $PY -c "import torch, gemma4rt._C"; then
    BUILD=ok
  else
    $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 && $PY -c "import torch, gemma4rt._C" && BUILD=ok || BUILD=FAIL
  fi
  grep -E " error|Error" "$OUT/build.log" | head -20
  echo "build: $BUILD ($(elapsed)s)"
  SUMMARY+=("build: $BUILD ($(elapsed)s)")
fi

run_pytest() {   # $1 = name, rest = pytest args
  local name=$1; shift
  timeout $(( $(left) > 60 ? $(left) - 30 : 30 )) $PY -m pytest "$@" -q -p no:cacheprovider -rs --tb=short \
    2>&1 | tee "$OUT/pytest_$name.log" | grep -vE "^\s*$" | tail -40
  SUMMARY+=("tests[$name]: $(grep -E "passed|failed|error" "$OUT/pytest_$name.log" | tail -1)")
}
if has tests; then echo "== tests/gpu"; run_pytest gpu tests/gpu; fi
if has model; then echo "== tests/gpu model"; run_pytest model tests/gpu/test_model_bf16.py -s; \
  grep "\[bf16-vs-fp32\]" "$OUT/pytest_model.log" | tee "$OUT/bf16_vs_fp32.txt"; fi

if has kernels && [ "$(left)" -gt 120 ]; then
  echo "== kernel benchmarks"
  timeout $(( $(left) - 60 )) $PY bench/kernels/run_all.py --out "$OUT" >"$OUT/bench.log" 2>&1
  SUMMARY+=("kernels: see bench.md")
fi

if has targets && [ "$(left)" -gt 90 ]; then
  echo "== batch-1 TPOT (ours, dummy weights, CUDA graphs)"
  for m in ${TARGET_MODELS:-gemma-4-E2B-it gemma-4-26B-A4B-it gemma-4-E4B-it gemma-4-12B-it gemma-4-31B-it}; do
    [ "$(left)" -gt 60 ] || { echo "skip $m: time"; continue; }
    REF=""; [ "$m" = gemma-4-E2B-it ] && REF="--reference"
    timeout $(( $(left) - 30 )) $PY -m bench.one_batch --model-path "$m" --load-format dummy --batch-size 1 \
      --input-len 1024 --output-len 32 $REF --output-file "$OUT/one_batch.jsonl" >"$OUT/one_batch_$m.log" 2>&1
    echo "$m rc=$? ($(elapsed)s)"; grep -vE "^\s*$|Warning|warn" "$OUT/one_batch_$m.log" | tail -12
  done
fi

if has serving && [ "$(left)" -gt 90 ]; then
  echo "== serving throughput (E2B, dummy weights)"
  timeout $(( $(left) - 20 )) $PY -m bench.run_targets --models E2B --skip-latency \
    --num-prompts ${SERVING_PROMPTS:-300} --max-duration $(( $(left) - 60 )) --out-dir "$OUT" >"$OUT/serving.log" 2>&1
  tail -25 "$OUT/serving.log"
fi

echo
echo "== summary ($(elapsed)s)"
printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/bench.md" ] && head -60 "$OUT/bench.md"
