#!/bin/bash
# One time-boxed call on a GPU machine that checks and measures softxent's GPU path, so that partial results
# come back even when a stage runs out of time. From the project root there:
#
#     bash benchmarks/gpu_check.sh [TESTS_S QUICK_S SWEEP_S]   (defaults 90 200 80, plus 30 + 80 + 100 s: 9.7 minutes)
#
# Stages: the kernels' tests on CUDA, then the estimators' GPU tests (the GPU machines run their own torch
# and triton, 2.11 and 3.6 when last seen: the project's pins do not apply there);
# benchmarks/bench_gpu.py --quick (every family, the peers in the same run, the targets as pass/miss
# lines); then its --sweep of the row kernel's launch shapes; then benchmarks/bench_hf.py (one Llama
# training step, unpatched and patched, eager and compiled); then bench_classifier.py --scale 1000000
# (SoftmaxClassifier on CUDA against 2 CPU threads, both solvers).
# The peers' wheels, if any, in .whl/ (see bench_gpu.py's docstring). Logs and JSON go to $OUT
# (default /tmp/out); the tables are printed last.
set -u
T_TESTS=${1:-90}; T_QUICK=${2:-200}; T_SWEEP=${3:-80}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
stamp() { echo "=== [$(date +%T)] $*"; }
stamp env; nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

stamp "GPU tests (${T_TESTS}s)"
timeout "$T_TESTS" python3 -m pytest -q -p no:cacheprovider -o addopts="" --import-mode=importlib -rfEs -n 8 \
  tests/test_triton_cross_entropy.py tests/test_triton_bce.py tests/test_triton_linear.py tests/test_lean.py \
  tests/test_launches.py > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | cut -c1-200 | tail -25
stamp "estimator GPU tests (30s)"
timeout 30 python3 -m pytest -q -p no:cacheprovider -o addopts="" --import-mode=importlib -rfEs -m gpu \
  tests/test_weighted.py tests/test_estimators.py > "$OUT/estimator_tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/estimator_tests.log" | cut -c1-200 | tail -10

stamp "bench --quick (${T_QUICK}s)"
timeout "$T_QUICK" python3 benchmarks/bench_gpu.py --quick --json "$OUT/quick.json" > "$OUT/quick.log" 2>&1
stamp "bench --sweep (${T_SWEEP}s)"
timeout "$T_SWEEP" python3 benchmarks/bench_gpu.py --quick --only ce --methods softxent --sweep \
  --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1

stamp "bench_hf (80s)"
timeout 80 python3 benchmarks/bench_hf.py --json "$OUT/hf.json" > "$OUT/hf.log" 2>&1
stamp "bench_classifier --scale (100s)"
(cd benchmarks && timeout 100 python3 bench_classifier.py --scale 1000000) > "$OUT/scale.log" 2>&1

stamp tables
grep -E "^\||^- " "$OUT/quick.log" | tail -80
grep -E "^\| .*(stream|registers|policy)" "$OUT/sweep.log" | tail -40
grep -E "^\||^##" "$OUT/hf.log" | tail -8
grep -E "^\|" "$OUT/scale.log" | tail -8
stamp done
