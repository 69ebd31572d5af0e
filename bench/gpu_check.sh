#!/usr/bin/env bash
# One GPU-machine call: build gemma4rt._C against the machine's own torch, run tests/gpu, and run the
# benchmarks. Logs go to $OUT when set; a summary prints last. Keep the whole call under 9 minutes.
#
#   usage (repo root): bash bench/gpu_check.sh [STAGE ...]
#   stages (default: build tests kernels targets):
#     build    pip install --no-build-isolation --no-deps -e .   (nothing is downloaded)
#     tests    pytest tests/gpu (kernel ops vs references, bf16 model vs our fp32 path; $GPU_TESTS: other paths;
#              $PYTEST_EXTRA: more pytest flags, e.g. -rP to keep the printed figures of passed tests in the log)
#     model    only tests/gpu/test_model_bf16.py
#     kernels  bench/kernels/run_all.py (each kernel's fraction of the copy / matmul limit; $KERNELS_ONLY: e.g. gemm,moe)
#     chain    bench/kernels/gemv_chain.py: a model's batch-1 projections as one CUDA graph, µs a layer with the
#              defaults against $CHAIN_ENV (default GEMMA4RT_GEMV_PRELOAD=0) in one process ($CHAIN_MODELS)
#     targets  batch-1 TPOT at ~1k context for $TARGET_MODELS (default: all five; transformers' for
#              $REFERENCE_MODELS, default E2B, "all" for every row),
#              with a kernel profile of 8 decode steps each (profile_<model>.txt); COMPARE_ENV="VAR=value ..."
#              runs each row again under those settings (e.g. GEMMA4RT_PDL=0, GEMMA4RT_GEMV=0); OVERLAP=1 runs each
#              row again with overlap scheduling (the server's default); SPEC=1 runs each row again with the
#              model's -assistant drafter ($SPEC_STEPS drafts, default 3)
#     batch    decode at batch $BATCH_SIZE (default 100, 1024-token prompts) for $TARGET_MODELS (default E2B and
#              26B-A4B), with a kernel profile of 8 steps each (profile_bs<N>_<model>.txt) and of 8 steps that
#              each also carry one new $PROMPT_LEN-token prompt (default 600; profile_bs<N>_prompt_<model>.txt);
#              COMPARE_ENV / COMPARE_ARGS run each model again under those settings / with those one_batch flags
#              (e.g. COMPARE_ARGS="--cuda-graph-max-tokens 0": the prompt steps eagerly, not through mixed graphs)
#     sweep    bench/kernels/decode_sweep.py: decode attention per layer at serving geometries for the engine's
#              plan and forced split sizes, per decode kernel ($SWEEP_VARIANTS, e.g. "16,8:16x3"), in the engine's
#              KV layout ($SWEEP_LAYOUTS=nhd,hnd adds head-major pages), random page order ($SWEEP_TABLES=random,seq
#              adds pages in order), $SWEEP_BATCHES (default 100,1), SWEEP_PROBE=1: the 8-row kernels' loads alone,
#              SWEEP_CONTEXTS=uniform,spread adds uneven contexts (uniform on [1, 2 ctx - 1], as in serving)
#     serving  the cookbook-style throughput run for $SERVING_MODELS (default E2B) against a server
#              started here ($SERVING_PROMPTS prompts, default 300; $SERVER_ARGS: extra server flags), and
#              again with $SERVER_COMPARE_ARGS added when set (e.g. "--disable-overlap-schedule");
#              SERVING_PROFILE=START:COUNT: a kernel profile of those engine steps in each run (profile_server.txt)
#     images   the cookbook image workload (2 x 720p images, 128 text tokens in, 1024 out) at concurrency
#              1 and 100 for $IMAGE_MODELS (default: E4B and 26B-A4B, dummy weights)
#     tp       on a machine of 2+ GPUs (kind nvidia-h200-x2): tests/gpu/test_tensor_parallel.py (only those matching
#              $TP_TESTS_K when set), then batch-1 and batch-$BATCH_SIZE decode with --tp ${TP:-2} for $TP_MODELS
#              (default 31B)
#   The device image lacks msgspec: carry it as a wheel (`run(..., carry=[".whl"])`, see README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_TOP=${OUT:-/tmp/gemma4rt_gpu_check}
OUT=$OUT_TOP/raw          # every log; packed into $OUT_TOP/logs.tgz at the end (one file comes back)
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
  local t=$(( $(left) > 60 ? $(left) - 30 : 30 ))
  [ -n "${TESTS_MAX_S:-}" ] && [ "$TESTS_MAX_S" -lt "$t" ] && t=$TESTS_MAX_S
  timeout $t $PY -m pytest "$@" -q -p no:cacheprovider -rs ${PYTEST_EXTRA:-} --tb=short \
    2>&1 | tee "$OUT/pytest_$name.log" | grep -vE "^\s*$" | tail -40
  SUMMARY+=("tests[$name]: $(grep -E "passed|failed|error" "$OUT/pytest_$name.log" | tail -1)")
}
if has tests; then echo "== ${GPU_TESTS:-tests/gpu}"; run_pytest gpu ${GPU_TESTS:-tests/gpu}; fi
if has model; then echo "== tests/gpu model"; run_pytest model tests/gpu/test_model_bf16.py -s; \
  grep "\[bf16-vs-fp32\]" "$OUT/pytest_model.log" | tee "$OUT/bf16_vs_fp32.txt"; fi

if has kernels && [ "$(left)" -gt 120 ]; then
  echo "== kernel benchmarks"
  timeout $(( $(left) - 60 )) $PY bench/kernels/run_all.py --out "$OUT" ${KERNELS_ONLY:+--only $KERNELS_ONLY} \
    >"$OUT/bench.log" 2>&1
  SUMMARY+=("kernels: see bench.md")
fi

if has chain && [ "$(left)" -gt 60 ]; then
  echo "== batch-1 projection chain, A: defaults vs B: ${CHAIN_ENV:-GEMMA4RT_GEMV_PRELOAD=0}"
  timeout $(( $(left) - 30 )) $PY -m bench.kernels.gemv_chain --env "${CHAIN_ENV:-GEMMA4RT_GEMV_PRELOAD=0}" \
    ${CHAIN_MODELS:+--models $CHAIN_MODELS} 2>&1 | tee "$OUT/gemv_chain.log"
fi

if has targets && [ "$(left)" -gt 90 ]; then
  echo "== batch-1 TPOT (ours, dummy weights, CUDA graphs)"
  for m in ${TARGET_MODELS:-gemma-4-E2B-it gemma-4-26B-A4B-it gemma-4-E4B-it gemma-4-12B-it gemma-4-31B-it}; do
    [ "$(left)" -gt 60 ] || { echo "skip $m: time"; continue; }
    REF=""; case " ${REFERENCE_MODELS:-gemma-4-E2B-it} " in *" $m "*|*" all "*) REF="--reference";; esac
    timeout $(( $(left) - 30 )) $PY -m bench.one_batch --model-path "$m" --load-format dummy --batch-size 1 \
      --input-len 1024 --output-len 32 $REF --output-file "$OUT/one_batch.jsonl" --profile "$OUT/profile_$m.txt" \
      >"$OUT/one_batch_$m.log" 2>&1
    echo "$m rc=$? ($(elapsed)s)"; grep -vE "^\s*$|Warning|warn|profiler_st" "$OUT/one_batch_$m.log" | tail -8
    [ -f "$OUT/profile_$m.txt" ] && head -${PROFILE_LINES:-16} "$OUT/profile_$m.txt"
    if [ -n "${COMPARE_ENV:-}" ] && [ "$(left)" -gt 60 ]; then    # the same row under other settings
      env ${COMPARE_ENV:-} timeout $(( $(left) - 30 )) $PY -m bench.one_batch --model-path "$m" --load-format dummy \
        --batch-size 1 --input-len 1024 --output-len 32 --output-file "$OUT/one_batch_cmp.jsonl" \
        --profile "$OUT/profile_cmp_$m.txt" >"$OUT/one_batch_cmp_$m.log" 2>&1
      echo "$m with $COMPARE_ENV rc=$?"; grep -E "batch-1 TPOT|GPU kernel time" "$OUT/one_batch_cmp_$m.log"
    fi
    if [ -n "${OVERLAP:-}" ] && [ "$(left)" -gt 60 ]; then    # the same row scheduled as the server does
      timeout $(( $(left) - 30 )) $PY -m bench.one_batch --model-path "$m" --load-format dummy --batch-size 1 \
        --input-len 1024 --output-len 32 --enable-overlap-schedule --output-file "$OUT/one_batch_overlap.jsonl" \
        >"$OUT/one_batch_overlap_$m.log" 2>&1
      echo "$m with overlap scheduling (decode time = launch period) rc=$?"; grep -E "batch-1 TPOT" "$OUT/one_batch_overlap_$m.log"
    fi
    if [ -n "${SPEC:-}" ] && [ "$(left)" -gt 60 ]; then    # the same row with the model's assistant drafter
      timeout $(( $(left) - 30 )) $PY -m bench.one_batch --model-path "$m" --load-format dummy --batch-size 1 \
        --input-len 1024 --output-len 32 --speculative-draft-model-path "$m-assistant" \
        --speculative-num-steps ${SPEC_STEPS:-3} --output-file "$OUT/one_batch_spec.jsonl" \
        --profile "$OUT/profile_spec_$m.txt" >"$OUT/one_batch_spec_$m.log" 2>&1
      echo "$m with its drafter (random weights: no draft accepted; the step time is the overhead) rc=$?"
      grep -E "batch-1 TPOT" "$OUT/one_batch_spec_$m.log"
      [ -f "$OUT/profile_spec_$m.txt" ] && head -${PROFILE_LINES:-16} "$OUT/profile_spec_$m.txt" | cut -c1-160
      if [ -n "${COMPARE_ENV:-}" ] && [ "$(left)" -gt 60 ]; then
        env ${COMPARE_ENV:-} timeout $(( $(left) - 30 )) $PY -m bench.one_batch --model-path "$m" --load-format dummy \
          --batch-size 1 --input-len 1024 --output-len 32 --speculative-draft-model-path "$m-assistant" \
          --speculative-num-steps ${SPEC_STEPS:-3} --output-file "$OUT/one_batch_spec_cmp.jsonl" \
          >"$OUT/one_batch_spec_cmp_$m.log" 2>&1
        echo "$m with its drafter and $COMPARE_ENV rc=$?"; grep -E "batch-1 TPOT" "$OUT/one_batch_spec_cmp_$m.log"
      fi
    fi
  done
fi

if has batch && [ "$(left)" -gt 90 ]; then
  bs=${BATCH_SIZE:-100}
  echo "== decode at batch $bs (dummy weights, CUDA graphs)"
  for m in ${TARGET_MODELS:-gemma-4-E2B-it gemma-4-26B-A4B-it}; do
    [ "$(left)" -gt 60 ] || { echo "skip $m: time"; continue; }
    timeout $(( $(left) - 30 )) $PY -m bench.one_batch --model-path "$m" --load-format dummy --batch-size $bs \
      --input-len 1024 --output-len 16 --output-file "$OUT/one_batch_bs$bs.jsonl" \
      --profile "$OUT/profile_bs${bs}_$m.txt" --profile-prompt "$OUT/profile_bs${bs}_prompt_$m.txt" \
      --profile-prompt-len ${PROMPT_LEN:-600} >"$OUT/one_batch_bs${bs}_$m.log" 2>&1
    echo "$m rc=$? ($(elapsed)s)"; grep -A1 "  bs " "$OUT/one_batch_bs${bs}_$m.log" | tail -1
    for f in "$OUT/profile_bs${bs}_$m.txt" "$OUT/profile_bs${bs}_prompt_$m.txt"; do
      [ -f "$f" ] && head -${PROFILE_LINES:-12} "$f" | cut -c1-160
    done
    if [ -n "${COMPARE_ENV:-}${COMPARE_ARGS:-}" ] && [ "$(left)" -gt 60 ]; then    # the same row, other settings
      env ${COMPARE_ENV:-} timeout $(( $(left) - 30 )) $PY -m bench.one_batch --model-path "$m" --load-format dummy \
        ${COMPARE_ARGS:-} --batch-size $bs --input-len 1024 --output-len 16 --output-file "$OUT/one_batch_bs${bs}_cmp.jsonl" \
        --profile "$OUT/profile_bs${bs}_cmp_$m.txt" --profile-prompt "$OUT/profile_bs${bs}_prompt_cmp_$m.txt" \
        --profile-prompt-len ${PROMPT_LEN:-600} >"$OUT/one_batch_bs${bs}_cmp_$m.log" 2>&1
      echo "$m with ${COMPARE_ENV:-}${COMPARE_ARGS:-} rc=$?"; grep -A1 "  bs " "$OUT/one_batch_bs${bs}_cmp_$m.log" | tail -1
      for f in "$OUT/profile_bs${bs}_cmp_$m.txt" "$OUT/profile_bs${bs}_prompt_cmp_$m.txt"; do
        [ -f "$f" ] && head -1 "$f" | cut -c1-160
      done
    fi
  done
fi

if has tp && [ "$(left)" -gt 90 ]; then
  echo "== tensor parallel (--tp ${TP:-2})"; run_pytest tp tests/gpu/test_tensor_parallel.py ${TP_TESTS_K:+-k "$TP_TESTS_K"}
  for m in ${TP_MODELS:-gemma-4-31B-it}; do
    [ "$(left)" -gt 60 ] || { echo "skip $m: time"; continue; }
    timeout $(( $(left) - 30 )) $PY -m bench.one_batch --model-path "$m" --load-format dummy --tp ${TP:-2} \
      --batch-size 1 ${BATCH_SIZE:-64} --input-len 1024 --output-len 32 --output-file "$OUT/one_batch_tp.jsonl" \
      >"$OUT/one_batch_tp_$m.log" 2>&1
    echo "$m --tp ${TP:-2} rc=$? ($(elapsed)s)"; grep -A3 "  bs " "$OUT/one_batch_tp_$m.log" | tail -3
  done
fi

if has sweep && [ "$(left)" -gt 90 ]; then
  echo "== decode attention sweep"
  timeout $(( $(left) - 60 )) $PY -m bench.kernels.decode_sweep --layouts ${SWEEP_LAYOUTS:-nhd} --out "$OUT" \
    ${SWEEP_VARIANTS:+--variants $SWEEP_VARIANTS} ${SWEEP_TABLES:+--tables $SWEEP_TABLES} ${SWEEP_PROBE:+--probe} \
    ${SWEEP_BATCHES:+--batches $SWEEP_BATCHES} ${SWEEP_CONTEXTS:+--contexts $SWEEP_CONTEXTS} >"$OUT/decode_sweep.log" 2>&1
  echo "sweep rc=$? ($(elapsed)s)"
  $PY - "$OUT/decode_sweep.jsonl" <<'PYEOF' 2>/dev/null
import collections, json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = collections.defaultdict(dict)
for r in rows:
    k = (r["geom"], r["B"], r["layout"] + "/" + r.get("pages", "random") + "/" + r.get("contexts", "uniform"),
         r.get("kernel", ""))
    if r["label"] in ("plan", "probe"):
        best[k][r["label"]] = (r["us"], r.get("read_frac", 0))
    if r["label"] != "probe" and r["us"] < best[k].get("best", (1e9, ""))[0]:
        best[k]["best"] = (r["us"], r["label"])
for (g, b, lay, kern), v in best.items():
    us, rf = v.get("plan", (float("nan"), 0))
    pr = f", loads alone {v['probe'][0]:.1f} us" if "probe" in v else ""
    print(f"{g:12s} B={b:<3d} {lay} {kern:8s}: plan {us:.1f} us ({100 * rf:.0f}% of read BW), "
          f"best {v['best'][0]:.1f} us ({v['best'][1]}){pr}")
PYEOF
fi

if has serving && [ "$(left)" -gt 90 ]; then
  echo "== serving throughput (${SERVING_MODELS:-E2B}, dummy weights)"
  PROF=""; [ -n "${SERVING_PROFILE:-}" ] && PROF="GEMMA4RT_PROFILE_STEPS=$SERVING_PROFILE:$OUT/profile_server.txt"
  env $PROF timeout $(( $(left) - 20 )) $PY -m bench.run_targets --models ${SERVING_MODELS:-E2B} --skip-latency \
    --num-prompts ${SERVING_PROMPTS:-300} --max-duration $(( $(left) - 60 )) --out-dir "$OUT" \
    "--server-args=${SERVER_ARGS:-}" >"$OUT/serving.log" 2>&1
  tail -25 "$OUT/serving.log"
  grep -h "steps in" "$OUT"/server_logs.txt 2>/dev/null | tail -${STEP_LOG_LINES:-8} | cut -c1-300
  [ -f "$OUT/profile_server.txt" ] && head -${PROFILE_LINES:-24} "$OUT/profile_server.txt" | cut -c1-160
  if [ -n "${SERVER_COMPARE_ARGS:-}" ] && [ "$(left)" -gt 90 ]; then     # the same run with other server flags
    mkdir -p "$OUT/cmp"
    PROF=""; [ -n "${SERVING_PROFILE:-}" ] && PROF="GEMMA4RT_PROFILE_STEPS=$SERVING_PROFILE:$OUT/cmp/profile_server.txt"
    env $PROF timeout $(( $(left) - 20 )) $PY -m bench.run_targets --models ${SERVING_MODELS:-E2B} --skip-latency \
      --num-prompts ${SERVING_PROMPTS:-300} --max-duration $(( $(left) - 60 )) --out-dir "$OUT/cmp" \
      "--server-args=${SERVER_ARGS:-} $SERVER_COMPARE_ARGS" >"$OUT/serving_cmp.log" 2>&1
    echo "== serving with $SERVER_COMPARE_ARGS"; tail -4 "$OUT/serving_cmp.log"
    grep -h "steps in" "$OUT"/cmp/server_logs.txt 2>/dev/null | tail -${STEP_LOG_LINES:-8} | cut -c1-300
    [ -f "$OUT/cmp/profile_server.txt" ] && head -${PROFILE_LINES:-24} "$OUT/cmp/profile_server.txt" | cut -c1-160
  fi
fi

image_run() {   # $1 = model name
  local m=$1 port=30177 log="$OUT/image_server_$1.log" ok=0
  $PY -m gemma4rt.server --model-path "$m" --load-format dummy --port $port --log-level info \
    --context-length 8192 --max-running-requests 128 >"$log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 $(( $(left) - 60 ))); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && { ok=1; break; }
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  if [ $ok = 1 ]; then
    echo "$m server up ($(elapsed)s)"
    for c in 1 100; do
      local n=$([ $c = 1 ] && echo 3 || echo ${IMAGE_PROMPTS:-100})
      [ "$(left)" -gt 40 ] || { echo "skip $m c=$c: time"; continue; }
      timeout $(( $(left) - 20 )) $PY -m bench.serving --backend sglang-oai-chat --port $port --dataset-name image \
        --image-count 2 --image-resolution 720p --random-input-len 128 --random-output-len 1024 \
        --random-range-ratio 1.0 --num-prompts $n --max-concurrency $c --max-duration $(( $(left) - 40 )) \
        --tag "images $m c=$c" --output-file "$OUT/images.jsonl" >"$OUT/images_${m}_c$c.log" 2>&1
      echo "$m c=$c rc=$?"; grep -E "Successful|throughput|TTFT|TPOT|Failed" "$OUT/images_${m}_c$c.log" | head -12
      grep "steps in" "$log" | tail -${STEP_LOG_LINES:-6} | cut -c1-240
    done
  else
    echo "$m server did not start"; tail -20 "$log"
  fi
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  SUMMARY+=("images[$m]: server_ok=$ok")
}
if has images; then
  for m in ${IMAGE_MODELS:-gemma-4-E4B-it gemma-4-26B-A4B-it}; do
    [ "$(left)" -gt 120 ] || { echo "skip images $m: time"; continue; }
    echo "== image serving ($m)"; image_run "$m"
  done
fi

echo
echo "== summary ($(elapsed)s)"
printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/bench.md" ] && head -60 "$OUT/bench.md"
tar czf "$OUT_TOP/logs.tgz" -C "$OUT_TOP" raw && rm -rf "$OUT"
