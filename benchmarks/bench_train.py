"""Training throughput: the engine's Trainer (engine/train) against TensorFlow's loop
(engine/tf/training.py: GradientTape over the SavedModel + create_optimizer AdamW), same batches,
classification fine-tuning on pooled_output, dropout off on both sides.

    .venv/bin/python -m benchmarks.bench_train [--cases small:32x64 base:32x128] [--rounds 1] [--steps 3]

Each runner is its own process: load, one warm-up step, --steps timed steps; samples/s from the
median step and peak RSS (VmHWM). Rounds alternate engine and TF; the ratio is taken per round.
Writes benchmarks/results/train_<host>.json. A benchmark, never a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmarks.bench_backward import REPO, machine, run_worker, write_result
from benchmarks.memory import rss_mb


def worker(runner: str, size: str, case: str, steps: int) -> dict:
    import numpy as np
    sys.path.insert(0, REPO)
    from engine.tf import extract, reference   # builds / finds the cached model; TF is imported lazily there
    B, S = (int(v) for v in case.split("x"))
    savedmodel = reference.cached(size, seed=0)
    h5 = extract.cached_extraction(savedmodel, progress=False)
    import weights
    from engine.tools import parity
    from engine.train.trainer import ClassifierHead
    loaded = weights.load(h5)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps + 1):
        b = parity.random_inputs(rng, B, S, loaded.config.vocab_size, padding=True, segment_pairs=True)
        b.pop("masked_lm_positions", None)
        b["labels"] = rng.integers(0, 2, B).astype(np.int32)
        batches.append(b)
    head = ClassifierHead.init(loaded.config.hidden_size, 2, seed=0)
    schedule = dict(init_lr=2e-5, num_train_steps=100, num_warmup_steps=10)
    if runner == "engine":
        import engine
        from engine.train.optimizer import LinearSchedule
        from engine.train.trainer import Trainer
        # malloc tuning as the figures were measured (the benchmark owns its process)
        trainer = Trainer(engine.load(h5, malloc_tuning=True), loaded.sources, LinearSchedule(**schedule), head=head)
        step = trainer.step
    else:
        from engine.tf.training import TFTrainer
        trainer = TFTrainer(savedmodel, head=(head.kernel, head.bias), **schedule)
        step = trainer.step
    after_load = rss_mb("VmRSS")
    step(batches[0])
    times = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
    return {"runner": runner, "size": size, "case": case, "times_s": times, "samples_per_s": B / statistics.median(times),
            "peak_rss_mb": round(rss_mb("VmHWM"), 1), "rss_after_load_mb": round(after_load, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: .venv/bin/python -m benchmarks.bench_train --cases small:32x64")
    parser.add_argument("--cases", nargs="+", default=["small:32x64", "base:32x128"], help="SIZE:BxS (default: small:32x64 base:32x128)")
    parser.add_argument("--rounds", type=int, default=1, help="paired rounds per case (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process after a warm-up (default 3)")
    parser.add_argument("--worker", nargs=3, metavar=("RUNNER", "SIZE", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return 0
    result = {"machine": machine(), "task": "classification fine-tuning step (forward, backward, AdamW), dropout off",
              "cases": {}}
    for spec in args.cases:
        size, case = spec.split(":")
        runs = {"engine": [], "tf": []}
        for _ in range(args.rounds):
            for runner in ("engine", "tf"):
                runs[runner].append(run_worker("benchmarks.bench_train", "--steps", str(args.steps), "--worker",
                                               runner, size, case))
                r = runs[runner][-1]
                print(f"{spec} {runner}: {r['samples_per_s']:.1f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MB",
                      file=sys.stderr, flush=True)
        ratio = [e["samples_per_s"] / t["samples_per_s"] for e, t in zip(runs["engine"], runs["tf"])]
        result["cases"][spec] = {
            "engine_samples_per_s": statistics.median(r["samples_per_s"] for r in runs["engine"]),
            "tf_samples_per_s": statistics.median(r["samples_per_s"] for r in runs["tf"]),
            "engine_over_tf_throughput": statistics.median(ratio),
            "engine_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["engine"]),
            "tf_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["tf"]), "runs": runs}
        c = result["cases"][spec]
        print(f"{spec}: engine {c['engine_samples_per_s']:.1f} samples/s, TF {c['tf_samples_per_s']:.1f} "
              f"({c['engine_over_tf_throughput']:.2f}x); peak RSS engine {c['engine_peak_rss_mb']:.0f} MB, "
              f"TF {c['tf_peak_rss_mb']:.0f} MB ({c['engine_peak_rss_mb'] / c['tf_peak_rss_mb']:.2f}x)")
    write_result("train", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
