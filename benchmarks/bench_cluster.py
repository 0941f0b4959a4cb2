"""encode --cluster against the single-process encode on one machine: throughput, where the time
goes as workers are added, Dask's cost per partition, and a projection to 10 and 100 machines.

    .venv/bin/python -m benchmarks.bench_cluster [--paragraphs 2000] [--partition-lines 100] [--reps 1]
    .venv/bin/python -m benchmarks.bench_cluster --quick      # a smoke run: tiny model, 64 paragraphs

Runners, each a fresh process timed from start to exit (imports, cluster start and model loading
included), interleaved per rep, on the base reference model and bench_encode's corpus (prose
paragraphs of the Python Language Reference):

- single:      python -m engine encode --weights H5 --input corpus --output out.npy (2 threads)
- local-2x1:   ... --cluster local:2 --threads-per-worker 1 --output out/    (2 workers, 1 thread each)
- local-1x2:   ... --cluster local:1 --threads-per-worker 2 --output out/    (1 worker, 2 threads)

From each cluster run's manifest (its `summary`): cluster start (the process's time before the
encode began), model load per worker, the plan's scan, and the workers' time summed per stage
(check, read, encode, write), so the idle time per partition is workers x encode phase - busy
time, over partitions. Separately, Dask's own cost per task: a LocalCluster of 2 workers running
2000 empty tasks. Checks every cluster output against the single-process rows (bit-equal, or the
largest difference). Writes benchmarks/results/cluster_<host>.json (the --quick run:
benchmarks/results/tmp/cluster_quick.json). Timings are benchmarks, never tests: run it on an
otherwise idle machine.

The projection (printed, and in the JSON): T(M machines) = start + load + scan + rows / (M x rate) +
one partition (the tail), with `rate` the best local runner's rows/s over its encode phase (a
machine like this one), the scan at the measured bytes/s over the whole corpus, and the needs it
puts on the rest: scheduler tasks/s against the measured empty-task rate, and the shared file
system's read and write bandwidth.
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

import numpy as np

from benchmarks.bench_encode import ENV, REPO, RESULTS, corpus, machine, timed

CORPUS_ROWS = 10_000_000          # the projection's corpus: ten million paragraphs
MACHINES = (1, 10, 100)


def model_file(model: str) -> str:
    """The HDF5 of the base (or tiny) reference model, built once in a child process (TensorFlow)."""
    code = (f"from engine.tf import reference, extract; sm = reference.cached({model!r}, seed=0); "
            "print(extract.cached_extraction(sm))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def runners(h5: str, src: str, tmp: str, partition_lines: int) -> dict:
    base = [sys.executable, "-m", "engine", "encode", "--weights", h5, "--input", src, "--force"]
    cluster = ["--partition-lines", str(partition_lines)]
    return {
        "single": (base + ["--output", os.path.join(tmp, "cluster_single.npy")], {"TALKHEADS_THREADS": "2"}),
        "local-2x1": (base + ["--output", os.path.join(tmp, "cluster_2x1"), "--cluster", "local:2",
                              "--threads-per-worker", "1"] + cluster, {}),
        "local-1x2": (base + ["--output", os.path.join(tmp, "cluster_1x2"), "--cluster", "local:1",
                              "--threads-per-worker", "2"] + cluster, {}),
    }


def breakdown(seconds: float, summary: dict) -> dict:
    """Where a cluster run's time went, from its manifest's summary."""
    workers, parts = summary["workers"], summary["partitions"]
    busy = sum(summary["stage_seconds"].values())
    return {"seconds": seconds, "start_seconds": seconds - summary["seconds"],
            "load_seconds_per_worker": sorted(summary["load_seconds"].values()),
            "plan_seconds": summary["plan_seconds"], "encode_phase_seconds": summary["run_seconds"],
            "stage_seconds": summary["stage_seconds"],
            "idle_ms_per_partition": 1e3 * (workers * summary["run_seconds"] - busy) / parts,
            "rows_per_second_encode_phase": summary["rows"] / summary["run_seconds"],
            "workers": workers, "partitions": parts, "retried": summary["retried"]}


def task_overhead(tasks: int = 2000) -> dict:
    """Dask's own cost per task: empty tasks on a LocalCluster of 2 single-threaded workers."""
    code = ("import json, time\nfrom distributed import Client, LocalCluster\n"
            "def noop(i):\n    return i\n"
            "if __name__ == '__main__':\n"
            "    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=':0') as c, Client(c) as cl:\n"
            "        cl.gather(cl.map(noop, range(50), key=[f'warm-{i}' for i in range(50)]))\n"
            f"        t = time.perf_counter(); cl.gather(cl.map(noop, range({tasks}))); s = time.perf_counter() - t\n"
            f"        print(json.dumps({{'tasks': {tasks}, 'seconds': s}}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(tasks_per_second=result["tasks"] / result["seconds"],
                  ms_per_task_per_worker=1e3 * 2 * result["seconds"] / result["tasks"])
    return result


def compare(single: np.ndarray, folder: str) -> dict:
    import engine
    rows = np.asarray(engine.read_embeddings(folder, verify=True))
    return {"bit_equal": bool(np.array_equal(rows, single)), "max_abs_diff": float(np.abs(rows - single).max()),
            "max_abs": float(np.abs(single).max())}


def scan_rate(src: str, megabytes: int) -> float:
    """Bytes/s of the plan's pass (engine/cluster/plan.py) over the corpus repeated to `megabytes` MB."""
    from engine.cluster.plan import scan_file
    with open(src, "rb") as f:
        text = f.read()
    big = src + ".big"
    with open(big, "wb") as f:
        for _ in range(max(1, megabytes * 1_000_000 // len(text))):
            f.write(text)
    try:
        t = time.perf_counter()
        scan_file(big, 1000)
        return os.path.getsize(big) / (time.perf_counter() - t)
    finally:
        os.unlink(big)


def projection(best: dict, corpus_bytes: int, rows: int, overhead: dict, partition_lines: int,
               scan_bytes_per_second: float) -> dict:
    """Hours for CORPUS_ROWS paragraphs on M machines like this one, and what that asks of the rest."""
    rate = best["rows_per_second_encode_phase"]                       # rows/s of one machine
    bytes_per_row = corpus_bytes / rows
    scan_rate = scan_bytes_per_second
    fixed = best["start_seconds"] + max(best["load_seconds_per_worker"]) + CORPUS_ROWS * bytes_per_row / scan_rate
    partition_seconds = partition_lines * best["workers"] / rate     # one partition on one worker
    out = {"corpus_rows": CORPUS_ROWS, "rows_per_second_per_machine": rate, "scan_bytes_per_second": scan_rate,
           "fixed_seconds": fixed, "partition_seconds": partition_seconds, "machines": {}}
    for m in MACHINES:
        seconds = fixed + CORPUS_ROWS / (m * rate) + partition_seconds
        out["machines"][m] = {"hours": seconds / 3600, "tasks_per_second_needed": m * rate / partition_lines,
                              "scheduler_headroom": overhead["tasks_per_second"] / (m * rate / partition_lines),
                              "read_mb_per_second": m * rate * bytes_per_row / 1e6,
                              "write_mb_per_second": m * rate * best["row_bytes"] / 1e6}
    return out


def formats(rows: int = 1000, hidden: int = 768, parts: int = 16) -> dict:
    """The shard format's measurement: .npy shards (written as encode --cluster writes them) against
    Zarr chunks (when zarr is importable; it is not a dependency): write, read all, 1000 random rows."""
    import tempfile

    from engine.embeddings import read_embeddings, write_manifest, write_shard
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((rows, hidden)).astype(np.float32) for _ in range(parts)]
    picks = rng.integers(0, rows * parts, 1000)
    out = {}
    with tempfile.TemporaryDirectory(dir=os.path.join(RESULTS, "tmp")) as folder:
        t = time.perf_counter()
        records = [write_shard(folder, i, a, {}) for i, a in enumerate(data)]
        write_seconds = time.perf_counter() - t
        write_manifest(folder, {"status": "complete", "dtype": "<f4", "row_shape": [hidden], "partitions": records})
        t = time.perf_counter()
        whole = np.asarray(read_embeddings(folder))
        read_seconds = time.perf_counter() - t
        vectors = read_embeddings(folder)
        t = time.perf_counter()
        vectors[picks]
        out["npy"] = {"write_ms_per_partition": 1e3 * write_seconds / parts, "read_all_ms": 1e3 * read_seconds,
                      "random_1000_rows_ms": 1e3 * (time.perf_counter() - t), "bytes": sum(r["bytes"] for r in records),
                      "note": "sha256 and fsync included"}
        assert whole.shape == (rows * parts, hidden)
    try:
        import zarr
    except ImportError:
        out["zarr"] = "not installed (pip install zarr in a scratch venv to measure it)"
        return out
    for name, kw in (("zarr-zstd", {}), ("zarr-raw", {"compressors": None})):
        with tempfile.TemporaryDirectory(dir=os.path.join(RESULTS, "tmp")) as folder:
            z = zarr.create_array(store=folder, shape=(rows * parts, hidden), chunks=(rows, hidden), dtype="float32", **kw)
            t = time.perf_counter()
            for i, a in enumerate(data):
                z[i * rows:(i + 1) * rows] = a
            write_seconds = time.perf_counter() - t
            t = time.perf_counter()
            z[:]
            read_seconds = time.perf_counter() - t
            t = time.perf_counter()
            for j in picks:
                z[int(j)]
            out[name] = {"write_ms_per_partition": 1e3 * write_seconds / parts, "read_all_ms": 1e3 * read_seconds,
                         "random_1000_rows_ms": 1e3 * (time.perf_counter() - t), "version": zarr.__version__,
                         "bytes": sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs),
                         "note": "no sha256, no fsync"}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paragraphs", type=int, default=2000, help="texts in the corpus (default 2000)")
    parser.add_argument("--partition-lines", type=int, default=100, help="lines per partition (default 100)")
    parser.add_argument("--reps", type=int, default=1, help="timed runs of each runner (default 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny model, 64 paragraphs")
    args = parser.parse_args(argv)
    if args.quick:
        args.paragraphs, args.partition_lines, args.reps = 64, 16, 1
    texts = corpus(args.paragraphs)
    tmp = os.path.join(RESULTS, "tmp")
    os.makedirs(tmp, exist_ok=True)
    src = os.path.join(tmp, "cluster_corpus.txt")
    with open(src, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in texts))
    h5 = model_file("tiny" if args.quick else "base")
    info = machine()
    plan = runners(h5, src, tmp, args.partition_lines)
    runs = {name: [] for name in plan}
    for rep in range(args.reps):
        for name, (cmd, env) in plan.items():
            ENV.update(env)                            # the children's environment (bench_encode.timed's)
            try:
                seconds, _, _ = timed(cmd)
            finally:
                for k in env:
                    ENV.pop(k, None)
            run = {"seconds": seconds}
            if name != "single":
                with open(os.path.join(cmd[cmd.index("--output") + 1], "manifest.json")) as f:
                    run.update(breakdown(seconds, json.load(f)["summary"]))
            runs[name].append(run)
            print(f"rep {rep + 1}/{args.reps} {name:<10} {seconds:7.1f}s  {len(texts) / seconds:6.1f} texts/s",
                  file=sys.stderr, flush=True)
    info["loadavg_end"] = os.getloadavg()
    single = np.load(plan["single"][0][plan["single"][0].index("--output") + 1])
    summary = {}
    for name, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        summary[name] = dict(best, median_seconds=statistics.median(r["seconds"] for r in rs),
                             texts_per_second=len(texts) / statistics.median(r["seconds"] for r in rs), runs=rs)
        if name != "single":
            summary[name]["vs_single"] = compare(single, plan[name][0][plan[name][0].index("--output") + 1])
            summary[name]["row_bytes"] = single[0].nbytes
    overhead = task_overhead()
    best = max((summary[n] for n in ("local-2x1", "local-1x2")), key=lambda r: r["rows_per_second_encode_phase"])
    result = {"machine": info, "model": "tiny reference" if args.quick else "base reference (L=12 H=768)",
              "corpus": {"texts": len(texts), "bytes": os.path.getsize(src)}, "partition_lines": args.partition_lines,
              "reps": args.reps, "runners": summary, "dask_empty_tasks": overhead,
              "projection": projection(best, os.path.getsize(src), len(texts), overhead, 1000,
                                       scan_rate(src, 16 if args.quick else 256)),
              "formats": formats(parts=4 if args.quick else 16)}
    path = os.path.join(tmp if args.quick else RESULTS, f"cluster_{'quick' if args.quick else platform.node() or 'host'}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    report(result)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def report(result: dict) -> None:
    r = result["runners"]
    for name, x in r.items():
        line = f"{name:<10} {x['median_seconds']:7.1f}s  {x['texts_per_second']:6.1f} texts/s"
        if name != "single":
            v = x["vs_single"]
            line += (f"  start {x['start_seconds']:.1f}s, load {max(x['load_seconds_per_worker']):.1f}s, plan "
                     f"{x['plan_seconds']:.2f}s, encode phase {x['encode_phase_seconds']:.1f}s "
                     f"({x['rows_per_second_encode_phase']:.1f} rows/s), idle {x['idle_ms_per_partition']:.0f} ms/"
                     f"partition; stages {', '.join(f'{k} {s:.2f}s' for k, s in x['stage_seconds'].items())}; "
                     f"vs single: {'bit-equal' if v['bit_equal'] else 'max |diff| %.2g' % v['max_abs_diff']}")
        print(line)
    o = result["dask_empty_tasks"]
    print(f"dask: {o['tasks_per_second']:.0f} empty tasks/s on 2 workers = {o['ms_per_task_per_worker']:.2f} ms per "
          f"task per worker")
    p = result["projection"]
    for m, x in p["machines"].items():
        print(f"projection: {p['corpus_rows']:,} paragraphs on {m} machine{'s' if int(m) > 1 else ''}: "
              f"{x['hours']:.1f} h; {x['tasks_per_second_needed']:.2f} tasks/s ({x['scheduler_headroom']:.0f}x "
              f"headroom), reads {x['read_mb_per_second']:.2f} MB/s, writes {x['write_mb_per_second']:.2f} MB/s")
    for name, x in result["formats"].items():
        print(f"format {name}: {x if isinstance(x, str) else ', '.join(f'{k} {v:.1f}' if isinstance(v, float) else f'{k} {v}' for k, v in x.items())}")


if __name__ == "__main__":
    sys.exit(main())
