#!/usr/bin/env bash
# One call on a CUDA machine, under 8 minutes on one H100/H200 from start to end, installs
# included:
#   1. correctness: tests/test_cuda.py (fused ops and the CUDA maths against a float64 CPU
#      reference, fp32 and bf16, values and gradients; the training step and the sampler under
#      torch.cuda.set_sync_debug_mode("error")) and tests/test_ops.py (every fused op against the
#      torch path, fp32/fp16/bf16, values and gradients, on the compiled kernels);
#   2. benchmarks/bench_ops.py (fused vs plain vs torch.compile; compiled rows last, cut by a
#      time budget);
#   3. benchmarks/bench_step.py, eager variants (paper-style fp32, kdiff fp32, kdiff bf16 +
#      channels_last), one step of each kdiff variant under sync-debug "error";
#   4. benchmarks/bench_step.py, the torch.compile variant (PD results are written before CFD).
# Every part has a time limit, capped by what is left of the whole budget (KDIFF_GPU_CHECK_BUDGET_S,
# default 420 s), and prints its elapsed time; a part that runs out is cut, and the next one starts.
#
# Usage (from anywhere):  bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#   OUT_DIR   default benchmarks/results (a new temporary folder with --dry-run)
#   --dry-run every part on the CPU at toy sizes (the compiled variant through aot_eager): checks
#             the script itself without a GPU
# Writes OUT_DIR/gpu_tests_<gpu>.log, ops_<gpu>.json, step_<gpu>.json, step_compiled_<gpu>.json,
# the benchmarks' logs and gpu_check_<gpu>.txt (elapsed time and exit status per part), <gpu>
# being the GPU's name. Exit status: 0 when every part passed, else the first failure's (124: a
# part cut by its time limit).
#
# Python: $PYTHON, else `python`, else `python3`; its torch is used as installed (on a GPU machine,
# the machine's CUDA build: nothing here installs torch). Missing test dependencies (pytest,
# hypothesis, einops, numpy) are installed with pip, into a virtual environment that sees the
# machine's packages (--system-site-packages) when the interpreter's own site-packages refuse.
set -uo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$dry_run" -eq 1 ]; then
    out="${1:-$(mktemp -d "${TMPDIR:-/tmp}/kdiff_gpu_check_dry_run.XXXXXX")}"
else
    out="${1:-${OUT:-$repo/benchmarks/results}}"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo"
# Under 8 minutes on the GPU with margin; a CPU dry run is slower.
budget="${KDIFF_GPU_CHECK_BUDGET_S:-$([ "$dry_run" -eq 1 ] && echo 900 || echo 420)}"
start=$SECONDS
exec 3>&1  # the parts' progress lines go here, wherever their own output goes
# Run the working tree as is (no install of kdiff: the machine may have no package index).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Compiled kernels, not Triton's interpreter; keep Triton's FMA contraction explicit.
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif command -v python >/dev/null 2>&1; then
    py=python
else
    py=python3
fi

status=0
summary=()
note() { # record the first failure's status
    if [ "$status" -eq 0 ] && [ "$1" -ne 0 ]; then status=$1; fi
}
# part NAME CAP_S CMD...: run CMD with a limit of min(CAP_S, budget left - 5 s); print and
# record its elapsed time and status. Skipped (status 124) when under 15 s are left.
part() {
    local name=$1 cap=$2
    shift 2
    local left=$(( budget - (SECONDS - start) - 5 ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped, the time budget is spent ($(( SECONDS - start )) s of $budget s)" >&3
        summary+=("$name: skipped (time budget spent)")
        note 124
        return 124
    fi
    echo "== $name (limit ${limit} s, $(( SECONDS - start )) s of $budget s used)" >&3
    local t0=$SECONDS rc=0
    timeout -k 5 "$limit" "$@" || rc=$?
    local took=$(( SECONDS - t0 ))
    echo "== $name: ${took} s, exit status $rc$([ "$rc" -eq 124 ] && echo ' (cut by its time limit)')" >&3
    summary+=("$name: ${took} s of ${limit} s, exit status $rc")
    note "$rc"
    return "$rc"
}

# 0. The interpreter, torch, the device, triton; the test dependencies.
probe_out="$(mktemp)"
part probe 60 "$py" - "$dry_run" > "$probe_out" 2>&1 <<'EOF'
import re
import sys

import torch

if sys.argv[1] == "1":
    print(f"dry run on the CPU; torch {torch.__version__}")
    print("NAME=cpu-dry-run")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit(f"error: no CUDA device visible to torch {torch.__version__} (a CPU-only build?); "
             "install a CUDA build of torch on this machine first")
name = torch.cuda.get_device_name(0)
try:
    import triton

    triton_version = triton.__version__
except Exception as err:  # noqa: BLE001
    triton_version = f"missing ({err}): the fused-op tests will skip"
print(f"GPU: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton_version}")
print("NAME=" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
EOF
cat "$probe_out"
gpu="$(sed -n 's/^NAME=//p' "$probe_out")"
rm -f "$probe_out"
if [ -z "$gpu" ]; then
    echo "error: the probe failed; nothing else can run" >&2
    exit "$(( status ? status : 1 ))"
fi

missing="$("$py" - <<'EOF'
import importlib.util

wanted = {"pytest": "pytest>=7.4", "hypothesis": "hypothesis>=6.90", "einops": "einops>=0.7", "numpy": "numpy>=1.23"}
print(" ".join(spec for module, spec in wanted.items() if importlib.util.find_spec(module) is None))
EOF
)"
if [ -n "$missing" ]; then
    # pip into the interpreter's own site-packages; where it refuses (externally managed,
    # read-only), into a venv that still sees the interpreter's packages, torch included.
    install='pip_args="install --quiet --disable-pip-version-check --retries 1 --timeout 15"
        if "$PY" -m pip $pip_args $MISSING; then echo "PY=$PY"; exit 0; fi
        "$PY" -m venv --system-site-packages "$VENV" && "$VENV/bin/python" -m pip $pip_args $MISSING \
            && echo "PY=$VENV/bin/python"'
    install_out="$(mktemp)"
    part "install $missing" 90 env PY="$py" MISSING="$missing" VENV="${TMPDIR:-/tmp}/kdiff_gpu_check_venv" \
        bash -c "$install" > "$install_out" 2>&1
    cat "$install_out"
    new_py="$(sed -n 's/^PY=//p' "$install_out")"
    py="${new_py:-$py}"
    rm -f "$install_out"
fi

if [ "$dry_run" -eq 1 ]; then
    device=cpu
    tests=(tests/test_cuda.py tests/test_ops.py -k "test_cuda or (feature_kl_matches_reference and batchmean and float32)")
    ops_args=(--batch 8 --features 16 --classes 10 --image 3 8 8 --dtypes fp32 --repeats 2 --warmup 1)
    step_args=(--unet tiny --unet-ch 8 --classifier smallcnn --batch 2 --repeats 1 --warmup 0)
    compiled_args=(--compile-backend aot_eager)
    # The CPU has no GPU kernels to test: the interpreter runs the fused ones.
    export TRITON_INTERPRET=1
else
    device=cuda
    tests=(tests/test_cuda.py tests/test_ops.py)
    # Batch sizes of a training step; every fused op, fp32 and bf16, each mode.
    ops_args=(--batch 1024 4096 --features 512 2048 --classes 10 1000 --dtypes fp32 bf16 --repeats 20 --warmup 3
              --compile-dtypes bf16)
    # The paper's sizes: UNet ch 128 (35.7M parameters), ResNet-18, batch 128.
    step_args=(--repeats 10 --warmup 2)
    compiled_args=()
fi

# 1. Correctness.
part tests 130 "$py" -m pytest -q -p no:cacheprovider -m "not slow" "${tests[@]}" \
    > "$out/gpu_tests_${gpu}.log" 2>&1
tail -n 5 "$out/gpu_tests_${gpu}.log"

# 2. The fused ops: eager rows for every size first, then compiled ones while the budget lasts.
part bench_ops 80 "$py" benchmarks/bench_ops.py --device "$device" "${ops_args[@]}" --time-budget 55 \
    --out "$out/ops_${gpu}.json" > "$out/bench_ops_${gpu}.log" 2>&1
tail -n 2 "$out/bench_ops_${gpu}.log"

# 3. The whole step, eager: a, b, c; sync-free check of b and c on CUDA.
part bench_step 90 "$py" benchmarks/bench_step.py --device "$device" --variants a b c "${step_args[@]}" \
    --out "$out/step_${gpu}.json" > "$out/bench_step_${gpu}.log" 2>&1
tail -n 3 "$out/bench_step_${gpu}.log"

# 4. The whole step compiled (c_compiled against a), with whatever time is left.
part bench_step_compiled 240 "$py" benchmarks/bench_step.py --device "$device" --variants a c_compiled \
    "${step_args[@]}" ${compiled_args[@]+"${compiled_args[@]}"} --out "$out/step_compiled_${gpu}.json" \
    > "$out/bench_step_compiled_${gpu}.log" 2>&1
tail -n 3 "$out/bench_step_compiled_${gpu}.log"

{
    echo "gpu_check on $gpu: $(( SECONDS - start )) s in all (budget $budget s), exit status $status"
    printf '%s\n' "${summary[@]}"
} | tee "$out/gpu_check_${gpu}.txt"
echo "results in $out"
exit "$status"
