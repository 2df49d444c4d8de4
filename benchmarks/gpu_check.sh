#!/usr/bin/env bash
# One call on a CUDA machine: correctness of the maths on the GPU, then op timings.
# Usage (repository root):  bash benchmarks/gpu_check.sh [OUT_DIR]
# Writes OUT_DIR/gpu_tests.log, OUT_DIR/ops_<gpu>.json; copy the JSON to benchmarks/results/.
set -uo pipefail
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
python -m pip install --quiet --no-deps -e . 2>/dev/null || python -m pip install --quiet -e .
python -m pip install --quiet "hypothesis>=6.90" "pytest>=7.4" pytest-timeout einops 2>/dev/null
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
echo "GPU: $gpu"
python -m pytest -q tests/test_cuda.py tests/test_losses.py tests/test_distill.py tests/test_sampling.py 2>&1 | tee "$out/gpu_tests.log"
python benchmarks/bench_ops.py --device cuda --repeats 50 --out "$out/ops_${gpu}.json"
