#!/bin/bash
# One time-boxed call on a GPU machine that checks and measures softxent's GPU path, so that partial results
# come back even when a stage runs out of time. From the project root there:
#
#     bash benchmarks/gpu_check.sh [all|kernels|apps]   (all: 11.7 minutes at most, more than one call's
#                                                         10: run kernels (7.3) and apps (4.3) as two calls)
#
# kernels: the kernels' tests on CUDA (80 s); benchmarks/bench_gpu.py --quick (170 s: every family, the
# peers in the same run, the targets as pass/miss lines); its --sweep of the row kernel's launch shapes
# (50 s); its --breakdown of the speed-mode linear head (50 s: the parts of a chunk, and the head at chunk
# sizes of 128 MiB to 2 GiB with and without dW on a second stream, issue 13's levers); bench_llm.py
# --device cuda (90 s: per-token log-probs and distillation against TRL's kernels and Liger's fused linear
# JSD, issue 25; TRL needs transformers there, in .whl/ with its pure-Python dependencies if not installed).
# apps: the estimators' GPU tests (30 s); benchmarks/bench_hf.py (80 s: one Llama training step, unpatched
# and patched, eager and compiled); bench_trl.py --device cuda (150 s: log-prob, GRPO, DPO and distillation
# steps through TRL's fused head with its Triton kernels and with softxent's, Llama-3 head, bf16, issue 26;
# needs TRL and transformers there);
# bench_classifier.py --scale 1000000 (90 s: SoftmaxClassifier on CUDA against 2 CPU threads, both solvers,
# issue 16's GPU target).
# The GPU machines run their own torch and triton (2.11 and 3.6 when last seen): the project's pins do not
# apply there. The peers' wheels, if any, in .whl/ (see bench_gpu.py's docstring). Logs and JSON go to $OUT
# (default /tmp/out); the tables are printed last.
set -u
STAGES=${1:-all}
case "$STAGES" in all|kernels|apps) ;; *) echo "gpu_check.sh: expected all, kernels or apps, got '$STAGES'"; exit 2;; esac
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
stamp() { echo "=== [$(date +%T)] $*"; }
stamp env; nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ "$STAGES" != apps ]; then
  stamp "GPU tests (80s)"
  timeout 80 python3 -m pytest -q -p no:cacheprovider -o addopts="" --import-mode=importlib -rfEs -n 8 \
    tests/test_triton_cross_entropy.py tests/test_triton_bce.py tests/test_triton_linear.py tests/test_lean.py \
    tests/test_launches.py tests/test_transforms.py::test_transforms_and_compile_on_cuda_with_the_triton_kernels \
    tests/test_llm_ops.py::test_llm_ops_on_cuda tests/test_triton_llm_ops.py \
    > "$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | cut -c1-200 | tail -25
  stamp "bench --quick (170s)"
  timeout 170 python3 benchmarks/bench_gpu.py --quick --json "$OUT/quick.json" > "$OUT/quick.log" 2>&1
  stamp "bench --sweep (50s)"
  timeout 50 python3 benchmarks/bench_gpu.py --quick --only ce --methods softxent --sweep \
    --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
  stamp "bench --breakdown (50s)"
  timeout 50 python3 benchmarks/bench_gpu.py --quick --breakdown --json "$OUT/breakdown.json" \
    > "$OUT/breakdown.log" 2>&1
  stamp "bench_llm (90s)"
  timeout 90 python3 benchmarks/bench_llm.py --device cuda --repeats 5 --json "$OUT/llm.json" \
    > "$OUT/llm.log" 2>&1
fi
if [ "$STAGES" != kernels ]; then
  stamp "estimator GPU tests (30s)"
  timeout 30 python3 -m pytest -q -p no:cacheprovider -o addopts="" --import-mode=importlib -rfEs -m gpu \
    tests/test_weighted.py tests/test_estimators.py > "$OUT/estimator_tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/estimator_tests.log" | cut -c1-200 | tail -10
  stamp "bench_hf (80s)"
  timeout 80 python3 benchmarks/bench_hf.py --json "$OUT/hf.json" > "$OUT/hf.log" 2>&1
  stamp "bench_trl (150s)"
  timeout 150 python3 benchmarks/bench_trl.py --device cuda --json "$OUT/trl.json" > "$OUT/trl.log" 2>&1
  stamp "bench_classifier --scale (90s)"
  (cd benchmarks && timeout 90 python3 bench_classifier.py --scale 1000000) > "$OUT/scale.log" 2>&1
fi

stamp tables
for log in quick sweep breakdown llm hf trl scale; do
  [ -f "$OUT/$log.log" ] || continue
  case $log in
    quick) grep -E "^\||^- " "$OUT/quick.log" | tail -80 ;;
    sweep) grep -E "^\| .*(stream|registers|policy)" "$OUT/sweep.log" | tail -40 ;;
    breakdown) grep -E "^\||^###|^breakdown .*(Error|error)" "$OUT/breakdown.log" | tail -60 ;;
    llm) grep -E "^\||^- |Error" "$OUT/llm.log" | tail -30 ;;
    hf) grep -E "^\||^##" "$OUT/hf.log" | tail -8 ;;
    trl) grep -E "^\||Error" "$OUT/trl.log" | tail -8 ;;
    scale) grep -E "^\|" "$OUT/scale.log" | tail -8 ;;
  esac
done
stamp done
