#!/usr/bin/env bash
# The CPU benchmark (issue 7): engine vs TensorFlow (vs ONNX Runtime) on the base reference model.
#   bash benchmarks/run_cpu.sh [--reps 5] [--quick] [--cases 1x128,8x128,32x128,8x512,text]
# 1. scripts/setup.sh (the project's .venv); 2. only with BENCH_ONNX=1: benchmarks/setup_onnx.sh (an
# overlay venv with the pinned tf2onnx/onnx/onnxruntime of requirements/bench.txt) and the SavedModel
# -> .cache/onnx/base.onnx with tf2onnx (once). Off by default: converting the base model did not
# finish here (stopped after 12 min at 13 GB RSS on a shared 24 GB machine; the tiny model converts
# in 15 s); without it the ONNX peer is reported as not run, with that reason;
# 3. python -m benchmarks.run_cpu (with the overlay venv's Python when the ONNX peer is on).
# Results: benchmarks/results/cpu.json, cpu.csv, cpu_times.png, cpu_breakdown.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2
py=.venv/bin/python
mkdir -p benchmarks/results .cache/onnx
if [ "${BENCH_ONNX:-0}" != 1 ]; then
    echo "run_cpu: ONNX peer off (BENCH_ONNX=1 to try it; see README, Benchmarks (CPU))" >&2
elif bash benchmarks/setup_onnx.sh >benchmarks/results/onnx_setup.log 2>&1; then
    py=.cache/onnx-venv/bin/python
    sm=$($py -c 'from benchmarks.memory import model_paths; print(model_paths()[0])' | tail -1)
    if [ ! -f .cache/onnx/base.onnx ]; then
        echo "run_cpu: converting $sm to ONNX with tf2onnx (once, a few minutes)" >&2
        if ! $py -m tf2onnx.convert --saved-model "$sm" --output .cache/onnx/base.onnx.tmp --opset 17 \
                >benchmarks/results/onnx_convert.log 2>&1; then
            echo "run_cpu: tf2onnx conversion failed, see benchmarks/results/onnx_convert.log" >&2
        else
            mv .cache/onnx/base.onnx.tmp .cache/onnx/base.onnx
        fi
    fi
else
    echo "run_cpu: ONNX peer unavailable (benchmarks/results/onnx_setup.log)" >&2
fi
exec $py -m benchmarks.run_cpu "$@"
