"""PNG plots of benchmarks/results/cpu.json (matplotlib, Agg backend).

    python -m benchmarks.plots [results_dir]
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNNER_ORDER = ("engine-fast", "engine-fast-skip", "tf", "onnxruntime", "floor", "floor-split", "floor-kernel",
                "floor-packed", "floor-packed-split", "floor-packed-kernel", "engine-readable")
COLORS = {"engine-fast": "#1f77b4", "engine-fast-skip": "#17becf", "tf": "#ff7f0e", "onnxruntime": "#2ca02c",
          "floor": "#7f7f7f", "floor-split": "#555555", "floor-packed": "#c7c7c7",
          "floor-packed-split": "#aaaaaa", "floor-kernel": "#3a3a3a",
          "floor-packed-kernel": "#8c8c8c", "engine-readable": "#d62728"}
KERNEL_COLORS = {"products": "#1f77b4", "layer norm": "#ff7f0e", "softmax": "#2ca02c",
                 "talking-heads mixing": "#d62728", "gelu": "#9467bd", "gather": "#8c564b", "other": "#7f7f7f"}


def plot(results: dict, out: str) -> None:
    cases = results["cases"]
    m = results["machine"]
    title = (f"{m.get('cpu_model', '?')}, {m.get('cpu_count')} cores; numpy {m.get('numpy')}, "
             f"TF {m.get('tensorflow')}; {m.get('date_utc', '')[:10]}")
    # 1. medians per case and runner, relative to TF (log-free bars, seconds annotated)
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(RUNNER_ORDER)
    for i, runner in enumerate(RUNNER_ORDER):
        xs, ys, labels = [], [], []
        for j, case in enumerate(cases):
            med = case["median_s"]
            if runner in med:
                xs.append(j + (i - len(RUNNER_ORDER) / 2 + 0.5) * width)
                ys.append(med[runner] / med["tf"])
                labels.append(f"{med[runner]:.2f}s")
        if xs:
            bars = ax.bar(xs, ys, width, label=runner, color=COLORS[runner])
            for b, lab in zip(bars, labels):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(), lab, ha="center", va="bottom",
                        fontsize=6, rotation=90)
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c["case"] for c in cases])
    ax.set_ylabel("median time / TensorFlow's median")
    ax.set_title(f"Base model forward pass (CPU), lower is better\n{title}", fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    ax.set_ylim(0, max(2.0, ax.get_ylim()[1] * 1.1))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cpu_times.png"), dpi=120)
    plt.close(fig)

    # 2. per-kernel breakdown of the fast path, against the matmul floor and TF
    from benchmarks.cpu_runners import best_floor
    rows = []
    for case in cases:
        for runner, br in case.get("breakdown_s", {}).items():
            med = case["median_s"]
            floor = best_floor(med, runner == "engine-fast-skip")
            rows.append((f"{case['case']}\n{runner}", br, floor, case["median_s"]["tf"], med.get("onnxruntime")))
    fig, ax = plt.subplots(figsize=(12, 5))
    for i, (label, br, floor, tf_time, ort_time) in enumerate(rows):
        bottom = 0.0
        for k, color in KERNEL_COLORS.items():
            share = br.get(k, 0.0) / tf_time
            ax.bar(i, share, 0.6, bottom=bottom, color=color, label=k if i == 0 else None)
            bottom += share
        ax.plot([i - 0.35, i + 0.35], [floor / tf_time] * 2, color="k", lw=2,
                label="matmul floor (best of plain / split / packed kernel)" if i == 0 else None)
        if ort_time is not None:
            ax.plot([i - 0.35, i + 0.35], [ort_time / tf_time] * 2, color=COLORS["onnxruntime"], lw=2, ls=":",
                    label="ONNX Runtime" if i == 0 else None)
    ax.axhline(1.0, color="#ff7f0e", lw=1, ls="--", label="TensorFlow")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r[0] for r in rows], fontsize=7)
    ax.set_ylabel("time / TensorFlow's median")
    ax.set_title(f"Where the fast path's time goes (engine/fast/forward.py profile marks)\n{title}", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cpu_breakdown.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out, "cpu.json")) as f:
        plot(json.load(f), out)
