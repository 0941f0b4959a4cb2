"""The base model's dense products, each way the fast path could run them: the comparison behind
engine/fast/gemm.py.

    .venv/bin/python -m benchmarks.bench_gemm [--rows 128,1024] [--reps 7] [--vector-bits 256|512]

Per layer: x [T,768] @ [768,2304] (q|k|v), ctx [T,768] @ [768,768] (output), x1 [T,768] @ [768,6144]
(GEGLU in), hid [T,3072] @ [3072,768] (GEGLU out); 12 layers of distinct random weights, so the
weights are cold (340 MB > L3) as in the model. T = 128 is one 128-token text, 1024 an 8x128 batch.
Ways, each at 1 thread and at engine.fast.threads.default_threads() threads:
- openblas: np.matmul(x, W) with W stored transposed (the fast path's layout), OpenBLAS's own threads;
- openblas-split: OpenBLAS at one thread, split over the pool as the fast path runs its products
  when packed=False (columns for T <= 512, rows above);
- packed: engine/fast/gemm.py, weights packed once, panels split over the pool.
Medians of --reps passes over the 12 layers, with GFLOP/s, and the tile's ceiling (a [256,256] product
warm in L2, one thread); writes
benchmarks/results/gemm_<host>.json. --vector-bits 256 measures the AVX2 geometry on any CPU
(gemm_256bit_<host>.json; with OPENBLAS_CORETYPE=Haswell, OpenBLAS's AVX2 kernels beside it).
A benchmark, never a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from benchmarks.bench_backward import REPO, machine, write_result
from benchmarks.cpu_runners import settle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: .venv/bin/python -m benchmarks.bench_gemm --rows 128")
    parser.add_argument("--rows", default="128,1024", help="T values, comma-separated (default 128,1024)")
    parser.add_argument("--reps", type=int, default=7, help="timed passes per way (default 7)")
    parser.add_argument("--vector-bits", type=int, choices=(256, 512), default=None,
                        help="the packed kernel's geometry (default: the CPU's, 512 with AVX-512)")
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    from threadpoolctl import threadpool_limits
    from engine.fast import gemm
    from engine.fast.threads import default_threads, thread_pool
    wide = None if args.vector_bits is None else args.vector_bits == 512
    if not gemm.enabled():
        raise SystemExit(f"the packed kernel is off here ({gemm.status()}): nothing to compare")
    H, I, L = 768, 3072, 12
    shapes = [(H, 3 * H), (H, H), (H, 2 * I), (I, H)]
    rng = np.random.default_rng(0)
    stored = [[np.ascontiguousarray(rng.standard_normal((n, k), dtype=np.float32)).T for k, n in shapes]
              for _ in range(L)]                                              # [K,N] views of [N,K] arrays
    packed = [[gemm.PackedMatrix(w, wide=wide) for w in layer] for layer in stored]
    n_threads = default_threads()
    pool = thread_pool(n_threads)
    result = {"machine": machine(), "gemm": gemm.status(wide), "threads": n_threads, "reps": args.reps, "cases": []}

    def split(run, parts):
        if pool is None or parts == 1:
            run(0, 1)
            return
        for f in [pool.submit(run, i, parts) for i in range(parts)]:
            f.result()

    for T in [int(v) for v in args.rows.split(",")]:
        xs = {k: rng.standard_normal((T, k), dtype=np.float32) for k in (H, I)}
        outs = {n: np.empty((T, n), np.float32) for _, n in shapes}
        flops = 2 * T * sum(k * n for k, n in shapes) * L

        def openblas():
            for layer in stored:
                for w in layer:
                    np.matmul(xs[w.shape[0]], w, out=outs[w.shape[1]])

        def openblas_split(parts):
            def one(i, n, w):
                x, out = xs[w.shape[0]], outs[w.shape[1]]
                if T > 512:
                    a, b = T * i // n, T * (i + 1) // n
                    np.matmul(x[a:b], w, out=out[a:b])
                else:
                    a, b = w.shape[1] * i // n, w.shape[1] * (i + 1) // n
                    np.matmul(x, w[:, a:b], out=out[:, a:b])
            for layer in stored:
                for w in layer:
                    split(lambda i, n: one(i, n, w), parts)

        def packed_run(parts):
            def one(i, n, p):
                P = p.num_panels
                p.matmul(xs[p.shape[0]], outs[p.shape[1]], P * i // n, P * (i + 1) // n)
            for layer in packed:
                for p in layer:
                    split(lambda i, n: one(i, n, p), parts)

        for threads in sorted({1, n_threads}):
            ways = {"openblas": lambda: openblas(),
                    "openblas-split": lambda: openblas_split(threads),
                    "packed": lambda: packed_run(threads)}
            times = {k: [] for k in ways}
            with threadpool_limits(threads):
                for fn in ways.values():
                    fn()
            for _ in range(args.reps):
                for name, fn in ways.items():
                    with threadpool_limits(threads if name == "openblas" else 1):
                        settle()
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            case = {"rows": T, "threads": threads, "median_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
                    "gflops": {k: round(flops / v / 1e9, 1) for k, v in med.items()},
                    "packed / openblas": round(med["packed"] / med["openblas"], 3),
                    "packed / openblas-split": round(med["packed"] / med["openblas-split"], 3)}
            result["cases"].append(case)
            print(f"T={T:5d} threads={threads}: " + "  ".join(f"{k} {med[k] * 1e3:8.1f} ms {case['gflops'][k]:6.1f} GF/s"
                                                            for k in ways), flush=True)
    # the tile's own ceiling: one [256,256] x [256,256] product, everything warm in L2, one thread
    x, w = rng.standard_normal((256, 256), dtype=np.float32), rng.standard_normal((256, 256), dtype=np.float32)
    p, out = gemm.PackedMatrix(w, wide=wide), np.empty((256, 256), np.float32)
    p.matmul(x, out, 0, p.num_panels)
    t0 = time.perf_counter()
    for _ in range(2000):
        p.matmul(x, out, 0, p.num_panels)
    result["packed_warm_one_thread_gflops"] = round(2 * 256 ** 3 * 2000 / (time.perf_counter() - t0) / 1e9, 1)
    print(f"packed, warm in L2, one thread: {result['packed_warm_one_thread_gflops']} GF/s", flush=True)
    bits = args.vector_bits
    result["forced"] = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE",) if k in os.environ}
    if bits:
        result["forced"]["vector_bits"] = bits
    write_result(f"gemm_{bits}bit" if bits else "gemm", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
