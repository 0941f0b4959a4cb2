"""End to end: text in, pooled embeddings out, each pipeline as a whole process, on real prose.

    .venv/bin/python -m benchmarks.bench_encode [--paragraphs 512] [--reps 1]

The corpus: paragraphs of the Python Language Reference as CPython ships it (pydoc_data.topics),
40 to 1500 characters, prose only: real English that no one here wrote. Runners, each a fresh
process timed from start to exit (imports and model loading included), interleaved per rep:

- engine:      python -m engine encode --weights H5 --input corpus --output out.npy   (its defaults:
               the fast path, padding skipped, texts truncated at the model's 512 positions)
- engine-128:  the same with --seq-length 128 (the work TF's pipeline does)
- tf:          benchmarks/tf_encode.py: the TF-Text preprocessing SavedModel and the encoder
               SavedModel, batches of 32 at seq_length 128, as the Hub snippets use them

on the base reference model (L=12 H=768, full vocab). Reports texts/s (medians over reps) and peak
RSS (ru_maxrss of each child via wait4; this driver stays small until the timings are done), then
checks engine-128's embeddings against TF's with the noise verdict (engine float64 as the truth).
Writes benchmarks/results/encode_<host>.json and encode_<host>.png. Timings are benchmarks, never
tests: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1", PYTHONUNBUFFERED="1")


def corpus(n: int) -> list[str]:
    """The first n prose paragraphs (40-1500 characters) of the Python Language Reference topics."""
    import pydoc_data.topics
    out = []
    for name in sorted(pydoc_data.topics.topics):
        for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            text = " ".join(para.split())
            if not 40 <= len(text) <= 1500 or para.lstrip()[:1] in (">", "*", "-", "=", "+", "|"):
                continue
            if sum(c.isalpha() or c == " " for c in text) < 0.85 * len(text):   # code and tables
                continue
            out.append(text)
            if len(out) == n:
                return out
    return out


def models() -> tuple[str, str, str]:
    """(encoder SavedModel, its HDF5, preprocessing SavedModel), built once in a child process so that
    this driver never imports TensorFlow."""
    code = ("from engine.tf import reference, extract; sm = reference.cached('base', seed=0); "
            "print(sm); print(extract.cached_extraction(sm)); print(reference.cached_preprocessing())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
    return tuple(out.stdout.strip().splitlines()[-3:])


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stderr) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, err


def machine() -> dict:
    info = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["openblas_env"] = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    return info


def check_embeddings(h5: str, texts: list[str], ours_path: str, tf_path: str) -> dict:
    """engine-128 vs TF with the noise verdict: the engine's float64 run on the same tokens is the truth."""
    import numpy as np

    import engine
    from engine.text.preprocess import Preprocessor
    from engine.tools import verdict
    enc64 = engine.load(h5, dtype="float64")
    prep = Preprocessor.from_weights(enc64)
    exact = np.concatenate([enc64(prep(texts[i:i + 32], seq_length=128))["pooled_output"]
                            for i in range(0, len(texts), 32)])
    readable = engine.load(h5)
    noise = np.concatenate([readable(prep(texts[i:i + 32], seq_length=128))["pooled_output"]
                            for i in range(0, len(texts), 32)])
    j = verdict.judge("pooled_output", np.load(ours_path), np.load(tf_path), exact, others=[noise])
    return j.as_dict()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paragraphs", type=int, default=512, help="texts in the corpus (default 512)")
    parser.add_argument("--reps", type=int, default=1, help="timed runs of each pipeline (default 1)")
    args = parser.parse_args(argv)
    texts = corpus(args.paragraphs)
    tmp = os.path.join(RESULTS, "tmp")
    os.makedirs(tmp, exist_ok=True)
    src = os.path.join(tmp, "encode_corpus.txt")
    with open(src, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in texts))
    savedmodel, h5, preprocess = models()
    out = {name: os.path.join(tmp, f"encode_{name}.npy") for name in ("engine", "engine-128", "tf")}
    engine_cmd = [sys.executable, "-m", "engine", "encode", "--weights", h5, "--input", src, "--force"]
    runners = {
        "engine": engine_cmd + ["--output", out["engine"]],
        "engine-128": engine_cmd + ["--output", out["engine-128"], "--seq-length", "128"],
        "tf": [sys.executable, "-m", "benchmarks.tf_encode", "--savedmodel", savedmodel, "--preprocess", preprocess,
               "--input", src, "--output", out["tf"]],
    }
    info = machine()
    runs = {name: [] for name in runners}
    for rep in range(args.reps):
        for name, cmd in runners.items():
            seconds, rss, err = timed(cmd)
            runs[name].append({"seconds": seconds, "peak_rss_mb": rss})
            print(f"rep {rep + 1}/{args.reps} {name:<11} {seconds:7.1f}s  {len(texts) / seconds:6.1f} texts/s  "
                  f"peak RSS {rss:6.0f} MB", file=sys.stderr, flush=True)
    info["loadavg_end"] = os.getloadavg()
    summary = {}
    for name, rs in runs.items():
        s = statistics.median(r["seconds"] for r in rs)
        summary[name] = {"median_seconds": s, "texts_per_second": len(texts) / s,
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "runs": rs}
    tf_rate, tf_rss = summary["tf"]["texts_per_second"], summary["tf"]["peak_rss_mb"]
    for name in ("engine", "engine-128"):
        summary[name]["speed_vs_tf"] = summary[name]["texts_per_second"] / tf_rate
        summary[name]["rss_vs_tf"] = summary[name]["peak_rss_mb"] / tf_rss
    check = check_embeddings(h5, texts, out["engine-128"], out["tf"])
    chars = [len(t) for t in texts]
    result = {"machine": info, "corpus": {"source": "pydoc_data.topics (the Python Language Reference, CPython "
                                                    f"{platform.python_version()})", "texts": len(texts),
                                          "chars_min": min(chars), "chars_median": statistics.median(chars),
                                          "chars_max": max(chars)},
              "model": "base reference (L=12 H=768 N=12 I=3072 V=30522, 512 positions)", "reps": args.reps,
              "runners": summary, "engine_128_vs_tf_verdict": check}
    host = platform.node() or "host"
    path = os.path.join(RESULTS, f"encode_{host}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    plot(result, os.path.join(RESULTS, f"encode_{host}.png"))
    for name in ("engine", "engine-128"):
        r = summary[name]
        print(f"{name}: {r['texts_per_second']:.1f} texts/s = {r['speed_vs_tf']:.2f}x TF's {tf_rate:.1f}; peak RSS "
              f"{r['peak_rss_mb']:.0f} MB = {r['rss_vs_tf']:.2f}x TF's {tf_rss:.0f} MB")
    print(f"engine-128 vs TF embeddings: {check['status']} {check['detail']}")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["engine", "engine-128", "tf"]
    r = result["runners"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = ["#1f77b4", "#17becf", "#ff7f0e"]
    axes[0].bar(names, [r[n]["texts_per_second"] for n in names], color=colors)
    axes[0].set_ylabel("texts / s (whole process)")
    axes[1].bar(names, [r[n]["peak_rss_mb"] for n in names], color=colors)
    axes[1].set_ylabel("peak RSS (MB)")
    m = result["machine"]
    fig.suptitle(f"encode {result['corpus']['texts']} paragraphs, base model; {m.get('cpu_model', '?')}, "
                 f"{m.get('cpu_count')} cores, {m['date_utc'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
