"""Speed on a busy machine: the engine against TensorFlow, side by side in one run, on a quiet machine
and with one and two competing busy processes (each a Python loop that never sleeps, started before
the measurement and killed after it).

    .venv/bin/python -m benchmarks.bench_contention [--loads 0,1,2] [--workloads ...] [--plot]

Workloads (each runner its own process, engine and TF alternating at every load):
- train-small: fine-tuning steps of the small reference model (L=3 H=48), 32x64, Model Garden's AdamW
  recipe (benchmarks/bench_train.py's worker: the engine's Trainer as `finetune` runs it, TF's
  GradientTape loop), samples/s of the median step;
- train-base: the same on the base model at 8x128;
- infer-1x128, infer-8x128: one base-model call (the engine's fast path, the SavedModel's
  signature), the median of --reps calls after a warm-up;
- encode: texts/s of `python -m engine encode` against benchmarks/tf_encode.py (the Hub
  preprocessor + encoder) on --paragraphs paragraphs, whole processes.
Writes benchmarks/results/contention_<host>.json (and with --plot contention_<host>.png). A
benchmark, never a test.
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

from benchmarks.bench_backward import REPO, machine, run_worker, write_result

WORKLOADS = ("train-small", "train-base", "infer-1x128", "infer-8x128", "encode")
BUSY = "import time\nwhile True:\n    pass\n"


class Busy:
    """`n` processes that keep a core busy each, for the length of a `with` block."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()
        return False


def infer_worker(runner: str, case: str, reps: int) -> dict:
    import numpy as np
    sys.path.insert(0, REPO)
    from engine.tf import extract, reference
    savedmodel = reference.cached("base", seed=0)
    h5 = extract.cached_extraction(savedmodel, progress=False)
    B, S = (int(v) for v in case.split("x"))
    rng = np.random.default_rng(0)
    x = {"input_word_ids": rng.integers(1000, 30000, (B, S)).astype(np.int32),
         "input_mask": np.ones((B, S), np.int32), "input_type_ids": np.zeros((B, S), np.int32)}
    if runner == "engine":
        import engine
        enc = engine.load(h5, fast=True)
        call = lambda: enc(x)  # noqa: E731
    else:
        import tensorflow as tf
        model = tf.saved_model.load(savedmodel)
        feed = {k: tf.constant(v) for k, v in x.items()}
        call = lambda: [v.numpy() for v in tf.nest.flatten(model(feed))]  # noqa: E731
    call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"runner": runner, "case": case, "times_s": times, "median_s": statistics.median(times)}


def encode_run(runner: str, paragraphs: int) -> dict:
    from benchmarks.bench_encode import corpus, models, timed
    texts = corpus(paragraphs)
    tmp = os.path.join(REPO, "benchmarks", "results", "tmp")
    os.makedirs(tmp, exist_ok=True)
    src = os.path.join(tmp, "contention_corpus.txt")
    with open(src, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in texts))
    savedmodel, h5, preprocess = models()
    out = os.path.join(tmp, f"contention_{runner}.npy")
    cmd = ([sys.executable, "-m", "engine", "encode", "--weights", h5, "--input", src, "--force", "--output", out]
           if runner == "engine" else
           [sys.executable, "-m", "benchmarks.tf_encode", "--savedmodel", savedmodel, "--preprocess", preprocess,
            "--input", src, "--output", out])
    seconds, rss, _ = timed(cmd)
    return {"runner": runner, "seconds": seconds, "texts_per_s": len(texts) / seconds, "peak_rss_mb": rss}


def measure(workload: str, runner: str, args) -> dict:
    """One measurement: {"value": higher is better, "unit": ..., "raw": the worker's record}."""
    if workload.startswith("train-"):
        size, case = ("small", "32x64") if workload == "train-small" else ("base", "8x128")
        raw = run_worker("benchmarks.bench_train", "--worker", runner, size, case, "--steps", str(args.steps))
        return {"value": raw["samples_per_s"], "unit": "samples/s", "raw": raw}
    if workload.startswith("infer-"):
        raw = run_worker("benchmarks.bench_contention", "--worker", runner, workload.split("-")[1], str(args.reps))
        return {"value": 1.0 / raw["median_s"], "unit": "calls/s", "raw": raw}
    raw = encode_run(runner, args.paragraphs)
    return {"value": raw["texts_per_s"], "unit": "texts/s", "raw": raw}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workloads = list(result["results"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads), 3.2))
    for ax, w in zip(axes if len(workloads) > 1 else [axes], workloads):
        loads = sorted(result["results"][w], key=int)
        for runner, style in (("engine", "o-"), ("tf", "s--")):
            ax.plot([int(n) for n in loads], [result["results"][w][n][runner]["value"] for n in loads], style, label=runner)
        ax.set_title(w)
        ax.set_xlabel("busy processes")
        ax.set_xticks([int(n) for n in loads])
        ax.set_ylabel(result["results"][w][loads[0]]["engine"]["unit"])
        ax.set_ylim(bottom=0)
    axes[0].legend() if len(workloads) > 1 else axes.legend()
    fig.suptitle(f"{result['machine'].get('cpu_model', '')}, {result['machine']['cpu_count']} CPUs, "
                 f"{result['machine']['date_utc'][:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="0,1,2", help="competing busy processes, comma-separated (default 0,1,2)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per process (default 4)")
    parser.add_argument("--reps", type=int, default=5, help="timed inference calls per process (default 5)")
    parser.add_argument("--paragraphs", type=int, default=128, help="texts for the encode workload (default 128)")
    parser.add_argument("--name", default="contention", help="results file name stem (default contention)")
    parser.add_argument("--plot", action="store_true", help="also draw benchmarks/results/<name>_<host>.png")
    parser.add_argument("--worker", nargs=3, metavar=("RUNNER", "CASE", "REPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(infer_worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return 0
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    result = {"machine": machine(), "command": "python -m benchmarks.bench_contention " + " ".join(argv or sys.argv[1:]),
              "results": {w: {} for w in workloads}}
    for load in (int(n) for n in args.loads.split(",")):
        with Busy(load):
            for w in workloads:
                row = {runner: measure(w, runner, args) for runner in ("engine", "tf")}
                row["engine_over_tf"] = row["engine"]["value"] / row["tf"]["value"]
                result["results"][w][str(load)] = row
                print(f"busy {load}  {w:<12} engine {row['engine']['value']:8.2f}  tf {row['tf']['value']:8.2f} "
                      f"{row['engine']['unit']:<10} ratio {row['engine_over_tf']:.2f}", file=sys.stderr, flush=True)
    path = write_result(args.name, result)
    if args.plot:
        plot(result, path[:-len(".json")] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
