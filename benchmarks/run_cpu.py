"""CPU benchmark: the engine against TensorFlow (and ONNX Runtime) on the base reference model.

    bash benchmarks/run_cpu.sh            # the documented command (sets up the ONNX peer, converts, runs this)
    python -m benchmarks.run_cpu [--reps 5] [--quick] [--cases 8x128,text]

Writes benchmarks/results/cpu.json, cpu.csv, cpu_times.png, cpu_breakdown.png.

Every case runs each runner on the same inputs, interleaved (runner A, B, C, A, B, C, ...), after one
warm-up call each, and reports medians. Before each timed call the harness waits until the process's
threads are idle (settle(): the previous runner's thread pool spins after it returns, e.g. OpenBLAS's
worker for about 0.1 s, which would take a core from the next runner); the median waits are recorded
per runner. Runners (benchmarks/cpu_runners.py):
- engine-fast: engine.load(h5, fast=True), dense (every position computed);
- engine-fast-skip: the same with skip_padding=True (only real tokens; realistic text case);
- engine-readable: the readable reference path (engine/core/kernels.py), small cases only;
- tf: tf.saved_model.load(savedmodel) then model(inputs), as Hub users call it;
- onnxruntime: ONNX Runtime on the graph `python -m engine export-onnx` writes from the same HDF5
  file (weights/export_onnx.py; cached in .cache/onnx/), all graph optimizations on, intra-op
  threads = the engine's thread count, one inter-op thread;
- floor: the model's matrix products alone in NumPy with the same shapes (q, k, v, o
  projections, scores and context batched matmuls, the three GEGLU products, pooler), on
  contiguous preallocated operands; for the skip path, with the packed shapes.
Peak memory: each runner in its own subprocess (benchmarks/memory.py), ru_maxrss after a call.
Each case also reports the fast path's share of time in GEMM ("products") against the rest, so the
floor ratio explains itself, and the machine block names the BLAS library, its kernel type and
thread count (threadpoolctl) for NumPy, and the environment run_cpu.sh cleared
(OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE force old kernels on new CPUs).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.cpu_runners import (Floor, best_floor, interleaved, onnx_path, onnx_runner, onnx_session,
                                    tf_runner)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
KERNEL_CLASSES = ("products", "layer norm", "softmax", "talking-heads mixing", "gelu", "gather", "other")

FULL_CASES = [(1, 128), (8, 128), (32, 128), (8, 512)]
TEXT_BATCH, TEXT_SEQ = 32, 128


# ------------------------------------------------------------------------------------------ inputs

def full_inputs(batch, seq, vocab_size, seed=0):
    """Every token real: [CLS] random ids [SEP], one segment."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab_size, (batch, seq)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_word_ids": ids, "input_mask": np.ones((batch, seq), np.int32),
            "input_type_ids": np.zeros((batch, seq), np.int32)}


def text_lines():
    """Real English text shipped on this machine: the English originals of the gettext catalogs
    (engine/text/corpus.py, the corpus of the preprocessor tests); CLDR names from babel when the
    machine has no catalogs."""
    from engine.text import corpus as text_corpus
    lines = text_corpus.gettext_lines()
    if len(lines) >= 3000:
        return "gettext English msgids (/usr/share/locale, engine.text.corpus.gettext_lines)", lines[-3000:]
    return "CLDR names (babel, engine.text.corpus.cldr_lines)", text_corpus.cldr_lines()


def text_inputs(vocab, batch=TEXT_BATCH, seq=TEXT_SEQ, seed=0):
    """`batch` texts of 1 to 6 consecutive lines of real text through engine.text.preprocess, padded to `seq`."""
    from engine.text.preprocess import Preprocessor
    source, lines = text_lines()
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(batch):
        k = int(rng.integers(1, 7))
        start = int(rng.integers(0, len(lines) - k))
        texts.append(" ".join(lines[start:start + k]))
    prep = Preprocessor(vocab, lower_case=True)
    inputs = {k: np.asarray(v, np.int32) for k, v in prep(texts, seq_length=seq).items()}
    return source, texts, inputs


def breakdown(enc, inputs, skip_padding, reps=3):
    """Median seconds per kernel class of the fast path (engine/fast/forward.py profile marks)."""
    runs = []
    for _ in range(reps):
        enc.fast_forward.profile = {}
        t0 = time.perf_counter()
        enc(inputs, skip_padding=skip_padding)
        total = time.perf_counter() - t0
        prof = enc.fast_forward.profile
        enc.fast_forward.profile = None
        prof["total"] = total
        runs.append(prof)
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in KERNEL_CLASSES + ("total",)}


def rel_diff(a, b, mask=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.abs(a - b).max() / np.abs(b).max())


def parity_figures(enc, tf_run, ort_run, inputs, skip):
    """Max |x - TF| / max |TF| for sequence_output and pooled_output (real tokens only for skip)."""
    theirs = tf_run(inputs)
    real = inputs["input_mask"].astype(bool)
    out = {}
    ours = enc(inputs)
    out["engine-fast"] = {"sequence_output": rel_diff(ours["sequence_output"], theirs["sequence_output"]),
                          "pooled_output": rel_diff(ours["pooled_output"], theirs["pooled_output"])}
    if skip:
        ours = enc(inputs, skip_padding=True)
        first = real[:, 0]
        out["engine-fast-skip"] = {
            "sequence_output (real tokens)": rel_diff(ours["sequence_output"], theirs["sequence_output"], real),
            "pooled_output (rows with real position 0)": rel_diff(ours["pooled_output"][first],
                                                                  theirs["pooled_output"][first])}
    if ort_run is not None:
        res = ort_run(inputs)
        best = {}
        for key, want in theirs.items():
            cands = [rel_diff(v, want) for v in res.values() if np.shape(v) == want.shape]
            best[key] = min(cands) if cands else None
        out["onnxruntime"] = best
    return out


def machine_info():
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_total"] = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    info["numpy"] = np.__version__
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')} ({blas.get('openblas configuration', '')})"
        info["numpy_simd_found"] = cfg["SIMD Extensions"].get("found")
    except Exception as e:  # pragma: no cover
        info["numpy_blas"] = f"unknown ({e})"
    from engine.fast import gemm
    from engine.fast.threads import default_threads
    info["engine_elementwise_threads"] = default_threads()
    info["engine_packed_gemm"] = gemm.status()
    info["env_threads"] = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                          "TALKHEADS_THREADS") if os.environ.get(k)}
    info["env_cleared_by_run_cpu_sh"] = os.environ.get("BENCH_CLEARED_ENV", "none (run without run_cpu.sh)")
    info["env_openblas_kernel_overrides"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                                             if os.environ.get(k)}
    try:
        from threadpoolctl import threadpool_info
        info["blas_threadpools"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                                            "threading_layer", "filepath")} for p in threadpool_info()]
    except ImportError as e:  # pragma: no cover - threadpoolctl is in requirements/lock.txt
        info["blas_threadpools"] = f"unknown ({e})"
    try:
        from engine.fast import fused
        info["engine_fused_kernels"] = fused.status()
    except ImportError:
        pass
    return info


def peak_memory(case, h5, savedmodel, onnx_ok):
    """Peak RSS (VmHWM) of one run per runner, each in a fresh subprocess."""
    res = {}
    runners = ["engine-fast", "engine-fast-skip", "engine-readable", "tf"] + (["onnxruntime"] if onnx_ok else [])
    for runner in runners:
        cmd = [sys.executable, "-m", "benchmarks.memory", runner, "--case", case, "--h5", h5,
               "--savedmodel", savedmodel, "--onnx", onnx_path(h5)]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if p.returncode != 0:
            res[runner] = {"error": p.stderr.strip().splitlines()[-1:] or [f"rc {p.returncode}"]}
        else:
            res[runner] = json.loads(p.stdout.strip().splitlines()[-1])
    return res


# ------------------------------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="measured calls per runner and case (after 1 warm-up)")
    ap.add_argument("--cases", default="1x128,8x128,32x128,8x512,text", help="comma-separated")
    ap.add_argument("--quick", action="store_true", help="2 reps, for trying the harness")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--memory-only", action="store_true", help="redo only the peak-memory part of an existing cpu.json")
    args = ap.parse_args(argv)
    reps = 2 if args.quick else args.reps
    if args.memory_only:
        from benchmarks import memory as memory_mod
        savedmodel, h5 = memory_mod.model_paths()
        with open(os.path.join(args.out, "cpu.json")) as f:
            results = json.load(f)
        onnx_ok = not args.no_onnx
        results["peak_memory_8x128"] = peak_memory("8x128", h5, savedmodel, onnx_ok)
        results["machine"]["memory_measured_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        print(f"[bench]   {json.dumps(results['peak_memory_8x128'])}", flush=True)
        _write(results, args.out)
        return 0
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, REPO)

    import engine
    from benchmarks import memory as memory_mod
    from engine.fast import gemm
    from weights.format import FORMAT_VERSION
    savedmodel, h5 = memory_mod.model_paths()
    print(f"[bench] SavedModel {savedmodel}\n[bench] HDF5 {h5}", flush=True)

    import tensorflow as tf
    info = machine_info()
    info["tensorflow"] = tf.__version__
    info["tf_intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)"
    info["tf_inter_op_threads"] = tf.config.threading.get_inter_op_parallelism_threads() or "default"
    info["load_average_before"] = os.getloadavg()
    info["weights_format_version"] = FORMAT_VERSION

    fast = engine.load(h5, fast=True)
    readable = engine.load(h5)
    cfg = fast.config
    tf_model = tf.saved_model.load(savedmodel)
    tf_run = tf_runner(tf_model)

    ort_run, onnx_status = None, None
    if args.no_onnx:
        onnx_status = "skipped (--no-onnx)"
    else:
        try:
            import onnxruntime as ort
            threads = fast.settings.threads
            session = onnx_session(onnx_path(h5), threads)
            ort_run = onnx_runner(session)
            info["onnxruntime"] = ort.__version__
            info["onnxruntime_threads"] = {"intra_op": threads, "inter_op": 1, "graph_optimization": "ORT_ENABLE_ALL"}
            info["onnx_graph"] = "weights/export_onnx.py (opset 17), exported from the benchmark's HDF5 file"
            onnx_status = "ok"
        except Exception as e:
            onnx_status = f"not run: {type(e).__name__}: {e}"
    info["onnx_status"] = onnx_status
    print(f"[bench] onnxruntime: {onnx_status}", flush=True)
    print(f"[bench] {json.dumps(info)}", flush=True)

    results = {"machine": info, "reps": reps, "cases": []}
    wanted = args.cases.split(",")
    for name in wanted:
        if name == "text":
            source, texts, inputs = text_inputs(fast.vocab)
            lengths = inputs["input_mask"].sum(axis=1)
            case = {"case": f"text {TEXT_BATCH}x{TEXT_SEQ}", "batch": TEXT_BATCH, "seq_length": TEXT_SEQ,
                    "text_source": source, "real_tokens": int(lengths.sum()),
                    "fill": float(lengths.sum() / lengths.size / TEXT_SEQ),
                    "lengths": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                                "max": int(lengths.max())}, "example_texts": texts[:3]}
            skip = True
        else:
            B, S = (int(v) for v in name.split("x"))
            inputs = full_inputs(B, S, cfg.vocab_size)
            lengths = inputs["input_mask"].sum(axis=1)
            case = {"case": f"{B}x{S} full", "batch": B, "seq_length": S, "real_tokens": int(lengths.sum()),
                    "fill": 1.0}
            skip = False
        B, S = inputs["input_word_ids"].shape
        runners = {"engine-fast": lambda x: fast(x)}
        if skip:
            runners["engine-fast-skip"] = lambda x: fast(x, skip_padding=True)
        runners["tf"] = tf_run
        if ort_run is not None:
            runners["onnxruntime"] = ort_run
        floor = Floor(cfg, [S] * B, S)
        runners["floor"] = lambda x, f=floor: f()
        runners["floor-split"] = lambda x, f=floor: f.split()
        with_kernel = gemm.enabled()
        if with_kernel:
            runners["floor-kernel"] = lambda x, f=floor: f.kernel()
        if skip:
            floor_packed = Floor(cfg, [int(v) for v in lengths], S)
            runners["floor-packed"] = lambda x, f=floor_packed: f()
            runners["floor-packed-split"] = lambda x, f=floor_packed: f.split()
            if with_kernel:
                runners["floor-packed-kernel"] = lambda x, f=floor_packed: f.kernel()
        slow = {}
        if B * S <= 1024:
            runners["engine-readable"] = lambda x: readable(x)
            slow["engine-readable"] = min(reps, 3)
        print(f"[bench] case {case['case']}: {', '.join(runners)} x {reps}", flush=True)
        t0 = time.perf_counter()
        waits = {}
        times = interleaved(runners, inputs, reps, slow, waits)
        med = {k: statistics.median(v) for k, v in times.items() if v}
        case["times_s"] = times
        case["settle_before_s"] = {k: statistics.median(v) for k, v in waits.items()}   # see settle()
        case["median_s"] = med
        ratios = {"engine-fast / tf": med["engine-fast"] / med["tf"],
                  "engine-fast / floor": med["engine-fast"] / med["floor"],
                  "engine-fast / floor-split": med["engine-fast"] / med["floor-split"],
                  "engine-fast / best floor": med["engine-fast"] / best_floor(med, False)}
        if "floor-kernel" in med:
            ratios["engine-fast / floor-kernel"] = med["engine-fast"] / med["floor-kernel"]
        if "onnxruntime" in med:
            ratios["engine-fast / onnxruntime"] = med["engine-fast"] / med["onnxruntime"]
        if skip:
            ratios["engine-fast-skip / tf"] = med["engine-fast-skip"] / med["tf"]
            ratios["tf / engine-fast-skip (speed-up)"] = med["tf"] / med["engine-fast-skip"]
            ratios["engine-fast-skip / best floor-packed"] = med["engine-fast-skip"] / best_floor(med, True)
            if "onnxruntime" in med:
                ratios["engine-fast-skip / onnxruntime"] = med["engine-fast-skip"] / med["onnxruntime"]
        if "engine-readable" in med:
            ratios["engine-readable / tf"] = med["engine-readable"] / med["tf"]
        case["ratios"] = ratios
        case["breakdown_s"] = {"engine-fast": breakdown(fast, inputs, False)}
        if skip:
            case["breakdown_s"]["engine-fast-skip"] = breakdown(fast, inputs, True)
        # the share of the fast path's time in GEMM: time above the floor is the rest (or slower GEMMs)
        case["gemm_share"] = {k: b["products"] / b["total"] for k, b in case["breakdown_s"].items()}
        case["parity_vs_tf"] = parity_figures(fast, tf_run, ort_run, inputs, skip)
        case["load_average"] = os.getloadavg()
        print(f"[bench]   {time.perf_counter() - t0:.0f}s  medians " +
              ", ".join(f"{k} {v:.3f}s" for k, v in med.items()) + "\n[bench]   ratios " +
              ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()) + "\n[bench]   GEMM share " +
              ", ".join(f"{k} {v:.0%}" for k, v in case["gemm_share"].items()), flush=True)
        results["cases"].append(case)
        _write(results, args.out)

    if not args.no_memory:
        print("[bench] peak memory (subprocesses), case 8x128", flush=True)
        results["peak_memory_8x128"] = peak_memory("8x128", h5, savedmodel, ort_run is not None)
        print(f"[bench]   {json.dumps(results['peak_memory_8x128'])}", flush=True)
    info["load_average_after"] = os.getloadavg()
    _write(results, args.out)
    from benchmarks import plots
    plots.plot(results, args.out)
    print(f"[bench] wrote {args.out}/cpu.json, cpu.csv, cpu_times.png, cpu_breakdown.png", flush=True)
    return 0


def _write(results, out):
    with open(os.path.join(out, "cpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "cpu.csv"), "w", newline="") as f:
        w = csv.writer(f)
        m = results["machine"]
        w.writerow(["case", "runner", "median_s", "min_s", "max_s", "n", "vs_tf", "vs_best_floor", "cpu_model",
                    "cpu_count", "numpy", "blas", "tensorflow", "onnxruntime", "engine_threads", "date_utc",
                    "load_average_before"])
        for case in results["cases"]:
            med = case["median_s"]
            for runner, ts in case["times_s"].items():
                if not ts:
                    continue
                floor = best_floor(med, runner == "engine-fast-skip")
                w.writerow([case["case"], runner, f"{med[runner]:.4f}", f"{min(ts):.4f}", f"{max(ts):.4f}",
                            len(ts), f"{med[runner] / med['tf']:.3f}", f"{med[runner] / floor:.3f}",
                            m.get("cpu_model"), m.get("cpu_count"), m.get("numpy"), m.get("numpy_blas"),
                            m.get("tensorflow"), m.get("onnxruntime", m.get("onnx_status")),
                            m.get("engine_elementwise_threads"), m.get("date_utc"),
                            " ".join(f"{v:.2f}" for v in m.get("load_average_before", ()))])


if __name__ == "__main__":
    sys.exit(main())
