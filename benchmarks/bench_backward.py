"""Forward + backward at base size: the engine's tape (engine/core/tape.py; loaded with fast=True,
so its element-wise stages run the fused kernels of engine/fast/tape_kernels.py) against TensorFlow's
GradientTape on the same SavedModel, same inputs, same cotangents.

    .venv/bin/python -m benchmarks.bench_backward [--cases 8x128 32x128] [--rounds 3] [--steps 2]

One step = the forward pass recorded for gradients + the gradient of every trainable weight for
cotangents on sequence_output and pooled_output (what fine-tuning a classifier on pooled_output, or
a token-level head on sequence_output, asks for). Each runner is its own process (peak memory
alone: VmHWM, and the RSS after loading, so the difference is the step's own memory); per round
and case the engine's process runs, then TF's, each a warm-up step and --steps timed ones; the
ratio engine/TF is taken per round (paired) and the median reported. The engine's activation
memory per token is the bytes its tape keeps, divided by B*S. Writes
benchmarks/results/backward_<host>.json. A benchmark, never a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from benchmarks.memory import rss_mb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1", PYTHONUNBUFFERED="1")


def _inputs_and_cotangents(B: int, S: int, hidden: int, vocab: int):
    import numpy as np
    sys.path.insert(0, REPO)
    from engine.tools import parity
    rng = np.random.default_rng(0)
    inputs = parity.random_inputs(rng, B, S, vocab, padding=True, segment_pairs=True)
    cot = {"sequence_output": rng.standard_normal((B, S, hidden)).astype(np.float32),
           "pooled_output": rng.standard_normal((B, hidden)).astype(np.float32)}
    return inputs, cot


def worker(runner: str, case: str, steps: int, savedmodel: str, h5: str) -> dict:
    """One process: load, a warm-up step, `steps` timed steps; JSON on stdout."""
    B, S = (int(v) for v in case.split("x"))
    if runner == "engine":
        import engine
        # the tape then runs the fused element-wise kernels; malloc tuning as the figures were measured
        enc = engine.load(h5, fast=True, malloc_tuning=True)
        inputs, cot = _inputs_and_cotangents(B, S, enc.config.hidden_size, enc.config.vocab_size)
        after_load = rss_mb("VmRSS")

        def step():
            with enc.tape(inputs) as tape:
                grads = tape.gradient(cot)
                kept = tape.saved_bytes()
            return grads, kept
    else:
        import tensorflow as tf
        from engine.tf import gradients
        model = gradients.load(savedmodel)
        variables = list(model.trainable_variables)
        vocab, hidden = (int(d) for d in variables[0].shape)   # word embeddings [V,H]
        inputs, cot = _inputs_and_cotangents(B, S, hidden, vocab)
        tensors = {k: tf.constant(v) for k, v in inputs.items()}
        targets = ("sequence_output", "pooled_output")
        cot_tensors = [tf.constant(cot[k]) for k in targets]
        after_load = rss_mb("VmRSS")

        def step():
            with tf.GradientTape() as tape:
                out = model(tensors)
            grads = tape.gradient([out[k] for k in targets], variables, output_gradients=cot_tensors)
            return [tf.convert_to_tensor(g).numpy() for g in grads], None
    _, kept = step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {"runner": runner, "case": case, "times_s": times, "peak_rss_mb": round(rss_mb("VmHWM"), 1),
           "rss_after_load_mb": round(after_load, 1)}
    if kept is not None:
        out["activation_bytes_per_token"] = kept / (B * S)
    return out


def machine() -> dict:
    """benchmarks/bench_encode.py's description of the machine, plus NumPy and its BLAS."""
    from benchmarks.bench_encode import machine as base_machine
    info = base_machine()
    import numpy
    info["numpy"] = numpy.__version__
    from engine.fast import fused, gemm
    info["engine_fused_kernels"] = fused.status()
    info["engine_packed_gemm"] = gemm.status()
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                        for p in threadpool_info()]
    except ImportError:
        pass
    return info


def run_worker(module: str, *args: str) -> dict:
    """`python -m module args...` in a fresh process (its peak memory its own); its last stdout line, as JSON."""
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_result(name: str, result: dict) -> str:
    """benchmarks/results/<name>_<host>.json, atomically."""
    result["machine"]["loadavg_end"] = os.getloadavg()
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}_{platform.node() or 'host'}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return path


def models() -> tuple[str, str]:
    code = ("from engine.tf import reference, extract; sm = reference.cached('base', seed=0); "
            "print(sm); print(extract.cached_extraction(sm))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
    savedmodel, h5 = out.stdout.strip().splitlines()[-2:]
    return savedmodel, h5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: .venv/bin/python -m benchmarks.bench_backward --cases 8x128 --rounds 3")
    parser.add_argument("--cases", nargs="+", default=["8x128", "32x128"], help="BxS shapes (default: 8x128 32x128)")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per case (default 3)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process after a warm-up (default 2)")
    parser.add_argument("--worker", nargs=4, metavar=("RUNNER", "CASE", "SAVEDMODEL", "H5"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        runner, case, savedmodel, h5 = args.worker
        print(json.dumps(worker(runner, case, args.steps, savedmodel, h5)))
        return 0
    savedmodel, h5 = models()
    result = {"machine": machine(), "model": "base reference (L=12, H=768, N=12, I=3072, V=30522)",
              "step": "forward + gradient of every trainable weight, cotangents on sequence_output and pooled_output",
              "cases": {}}
    for case in args.cases:
        runs = {"engine": [], "tf": []}
        for r in range(args.rounds):
            for runner in ("engine", "tf"):
                runs[runner].append(run_worker("benchmarks.bench_backward", "--steps", str(args.steps),
                                               "--worker", runner, case, savedmodel, h5))
                print(f"{case} round {r + 1} {runner}: {statistics.median(runs[runner][-1]['times_s']):.2f} s/step, "
                      f"peak RSS {runs[runner][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        med = {k: [statistics.median(run["times_s"]) for run in v] for k, v in runs.items()}
        ratios = [e / t for e, t in zip(med["engine"], med["tf"])]
        result["cases"][case] = {
            "engine_s_per_step": statistics.median(med["engine"]), "tf_s_per_step": statistics.median(med["tf"]),
            "engine_over_tf_paired_median": statistics.median(ratios), "paired_ratios": ratios,
            "engine_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["engine"]),
            "tf_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["tf"]),
            "engine_step_memory_mb": max(r["peak_rss_mb"] - r["rss_after_load_mb"] for r in runs["engine"]),
            "tf_step_memory_mb": max(r["peak_rss_mb"] - r["rss_after_load_mb"] for r in runs["tf"]),
            "engine_activation_bytes_per_token": runs["engine"][0]["activation_bytes_per_token"],
            "runs": runs}
        c = result["cases"][case]
        print(f"{case}: engine {c['engine_s_per_step']:.2f} s, TF {c['tf_s_per_step']:.2f} s, engine/TF "
              f"{c['engine_over_tf_paired_median']:.2f} (paired median); peak RSS engine {c['engine_peak_rss_mb']:.0f} MB, "
              f"TF {c['tf_peak_rss_mb']:.0f} MB; engine activations {c['engine_activation_bytes_per_token'] / 1024:.0f} KiB/token")
    write_result("backward", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
