"""Peak memory of one base-model run, one runner per process (called by benchmarks/run_cpu.py).

    python -m benchmarks.memory engine-fast|engine-fast-skip|engine-readable|tf|onnxruntime --case 8x128

Loads the model, runs the case twice (warm-up + one call), prints one JSON line (the engine and
ONNX Runtime are asked for sequence_output and pooled_output; TF's SavedModel returns every output):
{"runner", "case", "peak_rss_mb" (VmHWM of this process), "rss_after_load_mb"}. VmHWM, not
ru_maxrss: on Linux ru_maxrss survives fork+exec, so a child of a big parent reports the parent's peak.
The engine runners never import TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_paths():
    """(base SavedModel dir, its HDF5 extraction), building / extracting them once (cached)."""
    from engine.tf import extract, reference
    savedmodel = reference.cached("base", seed=0)
    return savedmodel, extract.cached_extraction(savedmodel)


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident size (VmRSS) or its peak (VmHWM), MB, from /proc/self/status (NaN elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("runner")
    ap.add_argument("--case", default="8x128")
    ap.add_argument("--h5")
    ap.add_argument("--savedmodel")
    ap.add_argument("--onnx")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    import numpy as np
    B, S = (int(v) for v in args.case.split("x"))
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (B, S)).astype(np.int32)
    inputs = {"input_word_ids": ids, "input_mask": np.ones((B, S), np.int32),
              "input_type_ids": np.zeros((B, S), np.int32)}
    if args.runner.startswith("engine"):
        import engine
        enc = engine.load(args.h5, fast=args.runner != "engine-readable")
        # the outputs ONNX Runtime is asked for below (TF's SavedModel returns all of them)
        wanted = ("sequence_output", "pooled_output")
        run = lambda x: enc(x, skip_padding=args.runner == "engine-fast-skip", outputs=wanted)  # noqa: E731
    elif args.runner == "tf":
        import tensorflow as tf
        model = tf.saved_model.load(args.savedmodel)
        run = lambda x: {k: v.numpy() for k, v in model({k: tf.constant(v) for k, v in x.items()}).items()  # noqa: E731
                         if not isinstance(v, list)}
    elif args.runner == "onnxruntime":
        from benchmarks.cpu_runners import onnx_session
        from engine.fast.threads import default_threads
        session = onnx_session(args.onnx, default_threads())
        run = lambda x: session.run(["sequence_output", "pooled_output"], x)  # noqa: E731
    else:
        raise SystemExit(f"unknown runner {args.runner}")
    after_load = rss_mb()
    run(inputs)
    out = run(inputs)
    del out
    peak = rss_mb("VmHWM")
    print(json.dumps({"runner": args.runner, "case": args.case, "peak_rss_mb": round(peak, 1),
                      "rss_after_load_mb": round(after_load, 1)}))


if __name__ == "__main__":
    main()
