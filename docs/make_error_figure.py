"""The figure "error against float64 by depth" of docs/walkthrough.md: what "as accurate as TF" means.

    .venv/bin/python docs/make_error_figure.py [--size base] [--batch 8 --seq-length 128]

TensorFlow (float32, the SavedModel), the engine's readable path and its fast path (float32), each
against the engine's float64 run on the same inputs and weights, block by block: the RMS and the
median of |error| relative to the RMS of the float64 output, on the reference models with random
and with trained-like weights. Writes docs/error_by_depth.png.
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def errors_by_depth(size: str, conditioning: str, batch: int, seq_length: int) -> dict:
    """{runner: {"rms": [L], "median": [L]}} for TF, readable and fast, against float64."""
    import engine
    from engine.tf import extract, reference
    from engine.tools import parity, verdict

    savedmodel = reference.cached(size, seed=0, conditioning=conditioning)
    h5 = extract.cached_extraction(savedmodel, progress=False)
    inputs = parity.random_inputs(np.random.default_rng(0), batch, seq_length, engine.load(h5).config.vocab_size)
    inputs = {k: v for k, v in inputs.items() if k != "masked_lm_positions"}
    exact = engine.to_numpy(engine.load(h5, dtype="float64")(inputs))["encoder_outputs"]
    runs = {"TensorFlow": reference.run_savedmodel(savedmodel, inputs, mlm=False)["encoder_outputs"],
            "engine (readable)": engine.to_numpy(engine.load(h5)(inputs))["encoder_outputs"],
            "engine (fast)": engine.to_numpy(engine.load(h5, fast=True)(inputs))["encoder_outputs"]}
    out = {}
    for name, outputs in runs.items():
        js = [verdict.judge(f"encoder_outputs[{i}]", o, o, e) for i, (o, e) in enumerate(zip(outputs, exact))]
        out[name] = {s: [j.engine[s] for j in js] for s in ("rms", "median")}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", choices=["tiny", "base"], help="reference model size (default base)")
    parser.add_argument("--batch", type=int, default=8, help="rows (default 8)")
    parser.add_argument("--seq-length", type=int, default=128, help="tokens per row (default 128)")
    parser.add_argument("--out", default=os.path.join(HERE, "error_by_depth.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    styles = {"TensorFlow": dict(color="#d95f02", marker="o"), "engine (readable)": dict(color="#1b9e77", marker="s"),
              "engine (fast)": dict(color="#7570b3", marker="^")}
    for ax, conditioning in zip(axes, ("random", "trained")):
        data = errors_by_depth(args.size, conditioning, args.batch, args.seq_length)
        for name, d in data.items():
            depth = range(len(d["rms"]))
            ax.semilogy(depth, d["rms"], lw=1.4, ms=4, label=f"{name}: RMS", **styles[name])
            ax.semilogy(depth, d["median"], lw=0.8, ms=3, ls="--", label=f"{name}: median", **styles[name])
        label = "random weights" if conditioning == "random" else "trained-like weights"
        ax.set_title(f"{args.size} reference model, {label}, {args.batch}x{args.seq_length}", fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("block (encoder_outputs[i])")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("|float32 - float64| / RMS(float64)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Float32 error against the float64 truth, block by block: the engine's is TensorFlow's size", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
