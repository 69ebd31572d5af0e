#!/usr/bin/env bash
# The whole test suite, from a fresh machine: creates .venv (if missing), installs a CPU torch and
# the package with its test extras, then runs pytest. GPU tests (tests/gpu) report "not run" here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # the CPU build (a plain `torch` would pull a multi-GB CUDA build)
  "$VPY" -m pip install -q "torch==2.13.0"
fi
GEMMA4RT_BUILD_EXT=0 "$VPY" -m pip install -q -e ".[test]"
exec "$VPY" -m pytest -q -p no:cacheprovider "$@"
