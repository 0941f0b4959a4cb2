"""The teeth of the verdicts: the smallest change of each kind of weight that each verdict detects.

    .venv/bin/python docs/make_sensitivity_table.py [--sizes tiny,base] [--conditioning trained]

For each kind of tensor (in the middle block for per-block tensors), the engine's copy of the weights
is changed by delta x RMS(tensor) x s, with s a fixed random +-1 pattern, while TensorFlow keeps the
SavedModel's: what `verify` sees when a weights file differs from its SavedModel. delta runs over a
grid from 1e-8 to 1e-1 (steps of sqrt(10)); the table gives the smallest delta on that grid that
FAILs, found by bisection (detection grows with delta). Verdicts: the noise verdict of
engine.tools.verdict (the default of `verify`), and the fixed tolerance max|diff| <= 1e-5 x max|TF|
(`verify --rtol 1e-5`). Inputs: random ids, batch 4 x 64 tokens with padding and 32 MLM positions per
row. Writes docs/sensitivity.md and benchmarks/results/sensitivity.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GRID = [10.0 ** (e / 2) for e in range(-16, -1)]       # 1e-8 ... 1e-1, steps of sqrt(10)


def kinds(num_layers: int) -> dict:
    """{label: dataset} of the weights to perturb, per-block ones in the middle block."""
    m = num_layers // 2
    b = f"layers/{m}/"
    return {
        "word embeddings": "embeddings/word", "position embeddings": "embeddings/position",
        "type embeddings": "embeddings/type", "embedding LN gamma": "embeddings/layer_norm/gamma",
        "embedding LN beta": "embeddings/layer_norm/beta",
        "query kernel": b + "attention/query/kernel", "query bias": b + "attention/query/bias",
        "key kernel": b + "attention/key/kernel", "value kernel": b + "attention/value/kernel",
        "value bias": b + "attention/value/bias",
        "pre-softmax mixing": b + "attention/pre_softmax_weight", "post-softmax mixing": b + "attention/post_softmax_weight",
        "attention output kernel": b + "attention/output/kernel", "attention LN gamma": b + "attention_layer_norm/gamma",
        "attention LN beta": b + "attention_layer_norm/beta",
        "GEGLU GELU kernel": b + "feedforward/intermediate/kernel", "GEGLU gate kernel": b + "feedforward/gate/kernel",
        "GEGLU gate bias": b + "feedforward/gate/bias", "feed-forward output kernel": b + "feedforward/output/kernel",
        "feed-forward LN beta": b + "feedforward_layer_norm/beta",
        "pooler kernel": "pooler/kernel", "MLM transform kernel": "mlm/transform/kernel",
        "MLM LN gamma": "mlm/layer_norm/gamma", "MLM output bias": "mlm/output_bias",
    }


def _smallest_failing(fails):
    """Bisection over GRID for the smallest delta where fails(delta) is True (None: none fails;
    0.0: the unchanged weights already fail, i.e. the verdict cries wolf)."""
    if fails(0.0):
        return 0.0
    lo, hi = -1, len(GRID) - 1
    if not fails(GRID[hi]):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(GRID[mid]):
            hi = mid
        else:
            lo = mid
    return GRID[hi]


def measure(size: str, conditioning: str, seed: int = 0) -> list[dict]:
    import engine
    import weights
    from engine.tf import extract, reference
    from engine.tools import parity, verdict

    savedmodel = reference.cached(size, seed=seed, conditioning=conditioning)
    loaded = weights.load(extract.cached_extraction(savedmodel, progress=False))
    cfg = loaded.config
    inputs = parity.random_inputs(np.random.default_rng(1), 4, 64, cfg.vocab_size, num_positions=32)
    theirs = parity.flatten_outputs(reference.run_savedmodel(savedmodel, inputs))
    rows = []
    for label, name in kinds(cfg.num_layers).items():
        original = loaded.tensors[name]
        pattern = np.random.default_rng(2).choice([-1.0, 1.0], original.shape)
        rms = float(np.sqrt(np.mean(np.square(original, dtype=np.float64))))
        cache = {}

        def outputs(delta):
            if delta not in cache:
                tensors = dict(loaded.tensors)
                tensors[name] = (original + delta * rms * pattern).astype(np.float32)
                ours = engine.Encoder(cfg, tensors, fast=True)
                readable = engine.Encoder(cfg, tensors)
                exact = engine.Encoder(cfg, tensors, dtype="float64")
                cache[delta] = tuple(parity.flatten_outputs(engine.to_numpy(e.mlm(inputs))) for e in (ours, exact, readable))
            return cache[delta]

        def noise_fails(delta):
            ours, exact, readable = outputs(delta)
            return not all(j.ok for j in verdict.judge_all(ours, theirs, exact, others=[readable]))

        def fixed_fails(delta):
            return not all(d.ok for d in parity.compare(outputs(delta)[0], theirs, 1e-5))

        t0 = time.perf_counter()
        row = {"kind": label, "dataset": name, "rms": rms,
               "noise_verdict": _smallest_failing(noise_fails), "fixed_1e-5": _smallest_failing(fixed_fails)}
        rows.append(row)
        print(f"{size} {conditioning} {label:<28} noise {row['noise_verdict']}, fixed {row['fixed_1e-5']} "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    return rows


def _fmt(delta, rms):
    if delta is None:
        return "not detected up to 1e-1"
    if delta == 0.0:
        return "FAILS the unchanged weights"
    return f"{delta:.0e} ({delta * rms:.1e} abs)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,base", help="comma-separated reference sizes (default tiny,base)")
    parser.add_argument("--conditioning", default="trained", choices=["random", "trained"],
                        help="reference weights' conditioning (default trained)")
    args = parser.parse_args()
    results = {size: measure(size, args.conditioning) for size in args.sizes.split(",")}
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "sensitivity.json"), "w") as f:
        json.dump({"created": stamp, "machine": machine, "conditioning": args.conditioning, "grid": GRID,
                   "results": results}, f, indent=1)
    sizes = list(results)
    lines = [f"# What the verdicts detect\n",
             f"Generated by `docs/make_sensitivity_table.py` ({stamp}, {machine}), reference models with "
             f"{args.conditioning}-like conditioning. Each weight (per-block ones in the middle block) is changed "
             "in the engine's copy by delta x RMS(tensor) x a fixed random +-1 pattern; TensorFlow keeps the "
             "SavedModel's. The cell is the smallest delta on a grid of steps of sqrt(10) from 1e-8 that FAILs "
             "(with the absolute size of each change in parentheses); \"FAILS the unchanged weights\" means the verdict "
             "calls a correct engine wrong on these inputs. Inputs: 4 x 64 random ids with padding, "
             "32 MLM positions per row.\n",
             "| tensor | " + " | ".join(f"{s}: noise verdict | {s}: fixed 1e-5" for s in sizes) + " |",
             "|---|" + "---|---|" * len(sizes)]
    for i, row in enumerate(results[sizes[0]]):
        cells = []
        for s in sizes:
            r = results[s][i]
            cells += [_fmt(r["noise_verdict"], r["rms"]), _fmt(r["fixed_1e-5"], r["rms"])]
        lines.append(f"| {row['kind']} | " + " | ".join(cells) + " |")
    with open(os.path.join(ROOT, "docs", "sensitivity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote docs/sensitivity.md and benchmarks/results/sensitivity.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
