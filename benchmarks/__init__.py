"""Benchmarks: `bash benchmarks/run_cpu.sh` (CPU); results under benchmarks/results/."""

import os

# TensorFlow's configuration for every benchmark (run as `python -m benchmarks.X`), before any of
# them imports it: Model Garden runs on tf_keras (Keras 2); TF's start-up log lines stay off.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
