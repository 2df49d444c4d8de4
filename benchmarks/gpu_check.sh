#!/usr/bin/env bash
# One call on a CUDA machine: the fused ops (kdiff.ops) and the rest of the CUDA maths against
# the reference (fp32 and bf16, values and gradients; the training step and the sampler without
# host syncs), then the op benchmark and the whole-step benchmark. Every stage has a time limit
# (60 + 200 + 270 + 300 s at most after setup), so one H100/H200 is done within 14 minutes.
#
# Usage (from anywhere):  bash benchmarks/gpu_check.sh [OUT_DIR]     (default: benchmarks/results)
# Writes OUT_DIR/gpu_tests_<gpu>.log, OUT_DIR/ops_<gpu>.json and OUT_DIR/step_<gpu>.json (rows
# are written as they finish, so a benchmark cut short by its time limit keeps what it measured). Exit status: 0 when the
# tests passed and the benchmark finished, else the first failure's.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$repo/benchmarks/results}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo"
py="${PYTHON:-python}"
# Run the working tree as is (no install step: the machine may have no package index).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Compiled kernels, not Triton's interpreter; keep Triton's FMA contraction explicit.
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

if ! "$py" -c "import pytest, hypothesis, einops" 2>/dev/null; then
    timeout 120 "$py" -m pip install --quiet "pytest>=7.4" "hypothesis>=6.90" einops \
        || echo "warning: could not install the test dependencies; the tests below may fail" >&2
fi

timeout 60 "$py" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("error: no CUDA device visible to torch")
try:
    import triton
except Exception as err:  # noqa: BLE001
    sys.exit(f"error: triton does not import ({err}); the fused ops need it")
print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton.__version__}")
EOF
gpu="$(timeout 60 "$py" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9_.-]+', '_', torch.cuda.get_device_name(0)))")"

status=0
# 1. Correctness: test_cuda.py (CUDA vs float64 CPU reference, no host syncs) and test_ops.py
#    (fused vs torch path; on a GPU it runs the compiled kernels, bf16 included).
timeout 200 "$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda.py tests/test_ops.py \
    2>&1 | tee "$out/gpu_tests_${gpu}.log" || status=$?
echo "tests: exit status $status"

# 2. Timings: fused vs plain vs torch.compile, fp32 first (the time limit cuts bf16 first).
bench=0
timeout 270 "$py" benchmarks/bench_ops.py --device cuda --repeats 30 --out "$out/ops_${gpu}.json" \
    > "$out/bench_ops_${gpu}.log" 2>&1 || bench=$?
tail -n 3 "$out/bench_ops_${gpu}.log"
echo "benchmark: exit status $bench (124: cut by its time limit); results in $out/ops_${gpu}.json"
if [ "$status" -eq 0 ]; then
    status=$bench
fi

# 3. The whole PD and CFD step (paper-style fp32 vs kdiff eager vs bf16 + channels_last + compile),
#    paper UNet, ResNet-18, batch 128; the PD results are written before the CFD ones start.
step=0
timeout 300 "$py" benchmarks/bench_step.py --device cuda --repeats 10 --out "$out/step_${gpu}.json" \
    > "$out/bench_step_${gpu}.log" 2>&1 || step=$?
tail -n 3 "$out/bench_step_${gpu}.log"
echo "step benchmark: exit status $step (124: cut by its time limit); results in $out/step_${gpu}.json"
if [ "$status" -eq 0 ]; then
    status=$step
fi
exit "$status"
