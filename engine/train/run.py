"""What a training run (finetune, pretrain) has around its steps: the checks before it starts, the
checkpoint beside the output, the log and its plot.

    checkpoint, log_path = prepare_run("out.h5", resume=False, force=False, learning_rate=2e-5,
                                       warmup_fraction=0.1, dropout=0.1, epochs=3, batch_size=32)
    save_checkpoint(checkpoint, trainer, state);  state = load_checkpoint(checkpoint, trainer)
    plot_log(log_path, "out.loss.png")      # training loss per step, eval metrics per epoch

Files beside OUT: OUT.ckpt.h5 (weights, optimizer moments and step, the dropout generator's state,
the data position; written atomically), OUT.log.jsonl (one line per step, one per evaluation) and
OUT.loss.png (when matplotlib is installed).
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

from weights.write import atomic_output

EVAL_METRICS = ("accuracy", "macro_f1", "mcc", "eval_loss")


class RunError(ValueError):
    """The arguments or files of a training run cannot be used; the message names the option or file."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit); the message says
    which step and what is kept."""


def check_ranges(learning_rate: float | None = None, warmup_fraction: float | None = None,
                 dropout: float | None = None, seq_length: int | None = None, **counts) -> None:
    """Every count (epochs, steps, batch_size, ...) at least 1; seq_length at least 2; the learning
    rate above 0; the warm-up share in [0, 1); dropout in [0, 1). RunError naming the option otherwise."""
    if seq_length is not None and seq_length < 2:
        raise RunError(f"--seq-length must be at least 2 (room for [CLS] and [SEP]), got {seq_length}")
    for name, value in counts.items():
        if value is not None and value < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if learning_rate is not None and not learning_rate > 0:
        raise RunError(f"--learning-rate must be above 0, got {learning_rate:g}")
    if warmup_fraction is not None and not 0 <= warmup_fraction < 1:
        raise RunError(f"--warmup-fraction must be at least 0 and below 1, got {warmup_fraction:g}")
    if dropout is not None and not 0 <= dropout < 1:
        raise RunError(f"--dropout must be at least 0 and below 1, got {dropout:g}")


def prepare_run(output: str, resume: bool, force: bool, **ranges) -> tuple[str, str]:
    """The checks before a training run: the ranges of check_ranges, the output's folder present,
    the output absent (or force), a leftover checkpoint only with resume. Returns the paths of the
    checkpoint and of the log beside the output."""
    check_ranges(**ranges)
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise RunError(f"--output {output}: the folder {folder} does not exist")
    if os.path.isdir(output):
        raise RunError(f"--output {output}: is a folder; give the path of the file to write")
    if os.path.lexists(output) and not force:
        raise FileExistsError(f"--output {output}: exists; pass --force to replace it")
    checkpoint = output + ".ckpt.h5"
    if os.path.exists(checkpoint) and not resume:
        raise FileExistsError(f"--output {output}: an interrupted run left {checkpoint}; pass --resume to "
                              f"continue it, or delete it")
    return checkpoint, output + ".log.jsonl"


# ------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path: str, trainer, state: dict) -> None:
    """Weights, moments, step, the dropout generator and the data position, atomically."""
    with atomic_output(path, force=True) as tmp, h5py.File(tmp, "w") as f:
        for group, arrays in (("params", trainer.params), ("m", trainer.optimizer.m), ("v", trainer.optimizer.v)):
            for name, a in arrays.items():
                f.create_dataset(f"{group}/{name}", data=np.asarray(a))
        f.attrs["iterations"] = trainer.optimizer.iterations
        f.attrs["rng"] = json.dumps(trainer.rng.bit_generator.state)
        f.attrs["state"] = json.dumps(state)


def load_checkpoint(path: str, trainer) -> dict:
    """Restores what save_checkpoint wrote into `trainer`; returns the data position (state)."""
    with h5py.File(path, "r") as f:
        flat = {}
        f["params"].visititems(lambda n, o: flat.__setitem__(n, o) if isinstance(o, h5py.Dataset) else None)
        if set(flat) != set(trainer.params):
            raise TrainingError(f"{path}: the checkpoint's weights do not match this model and head "
                                f"({len(flat)} vs {len(trainer.params)} tensors); delete it or drop --resume")
        for name, a in trainer.params.items():
            a[...] = f["params"][name][()]
        trainer.optimizer.m = {n: np.array(f["m"][n][()]) for n in trainer.params if f"m/{n}" in f}
        trainer.optimizer.v = {n: np.array(f["v"][n][()]) for n in trainer.params if f"v/{n}" in f}
        trainer.optimizer.iterations = int(f.attrs["iterations"])
        trainer.rng.bit_generator.state = json.loads(f.attrs["rng"])
        return json.loads(f.attrs["state"])


# ------------------------------------------------------------------------------------------ log and plot

def read_log(log_path: str) -> list[dict]:
    with open(log_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def log_series(rows: list[dict]) -> dict[str, tuple[list, list]]:
    """{name: (steps, values)}: "training loss" per step, and each eval metric the log holds, at the
    step where it was measured (the end of an epoch, or the start and end of a run)."""
    series = {"training loss": ([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r])}
    for metric in EVAL_METRICS:
        points = [(r["step"], r[metric]) for r in rows if metric in r]
        if points:
            series[f"eval {metric}"] = ([s for s, _ in points], [v for _, v in points])
    return series


def plot_log(log_path: str, png_path: str) -> dict | None:
    """Draws the training loss per step and, on a second axis, every eval metric of the log; the
    series drawn, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = log_series(read_log(log_path))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, loss = series["training loss"]
    ax.plot(steps, loss, lw=1, color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    evals = {k: v for k, v in series.items() if k.startswith("eval ")}
    if evals:
        other = ax.twinx()
        for name, (x, y) in evals.items():
            other.plot(x, y, marker="o", lw=1, label=name)
        other.set_ylabel("eval (per epoch)" if "eval eval_loss" not in evals else "eval")
        lines = ax.get_lines() + other.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize="small")
    fig.tight_layout()
    with atomic_output(png_path, force=True) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return series
