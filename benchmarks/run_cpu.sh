#!/usr/bin/env bash
# The CPU benchmark: engine vs TensorFlow vs ONNX Runtime on the base reference model.
#   bash benchmarks/run_cpu.sh [--reps 5] [--quick] [--cases 1x128,8x128,32x128,8x512,text] [--no-onnx]
# 1. scripts/setup.sh (the project's .venv, ONNX Runtime included); 2. python -m benchmarks.run_cpu,
# which exports the ONNX graph from the HDF5 file once (weights/export_onnx.py, .cache/onnx/).
# OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are cleared for the benchmark only: some machines here set
# them, which forces old OpenBLAS kernels on new CPUs (measured on an AVX-512 machine: NumPy's sgemm
# 235 instead of 402 GFLOP/s). The results record what was cleared; tests and CI leave them as set.
# Results: benchmarks/results/cpu.json, cpu.csv, cpu_times.png, cpu_breakdown.png.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then   # the usage, without setting anything up
    sed -n '2,9p' benchmarks/run_cpu.sh | sed 's/^# \{0,1\}//'
    if [ -x .venv/bin/python ]; then exec .venv/bin/python -m benchmarks.run_cpu --help; fi
    exit 0
fi
bash scripts/setup.sh
cleared=()
for v in OPENBLAS_CORETYPE OPENBLAS_L2_SIZE; do
    if [ -n "${!v:-}" ]; then cleared+=("$v=${!v}"); unset "$v"; fi
done
export BENCH_CLEARED_ENV="${cleared[*]:-none set}"
echo "run_cpu: cleared for this run: $BENCH_CLEARED_ENV" >&2
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2
mkdir -p benchmarks/results .cache/onnx
exec .venv/bin/python -m benchmarks.run_cpu "$@"
