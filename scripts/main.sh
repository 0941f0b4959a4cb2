#!/usr/bin/env bash
# The README's main-job command: sets everything up on a fresh machine, then runs the main job
# on the embedded default (see README). Extra arguments go to `python -m engine`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# TensorFlow's own log below warnings stays quiet; the lines it writes before its logging starts
# (oneDNN, CUDA probing) are held back by the command line (engine/tf/verify.py STARTUP_NOISE).
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2} TF_USE_LEGACY_KERAS=1
exec .venv/bin/python -m engine "$@"
