"""The runners of the CPU benchmark (benchmarks/run_cpu.py) and how a round of them is timed.

- Floor: the model's matrix products alone with the case's shapes, plain NumPy, split over the fast
  path's thread pool, or with the packed kernel of engine/fast/gemm.py;
- tf_runner, onnx_session / onnx_runner: TensorFlow's SavedModel and ONNX Runtime as callables on
  the case's inputs (onnx_path exports the graph once per weights file);
- settle, interleaved: one call per runner per round, each after the previous runner's threads
  went idle.
"""

from __future__ import annotations

import os
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONNX_DIR = os.path.join(REPO, ".cache", "onnx")


# ------------------------------------------------------------------------------------------ runners

class Floor:
    """The model's matrix products alone (NumPy, contiguous operands, outputs preallocated)."""

    def __init__(self, cfg, lengths, seq):
        H, N, D, I, L = cfg.hidden_size, cfg.num_heads, cfg.head_size, cfg.intermediate_size, cfg.num_layers
        rng = np.random.default_rng(0)
        r = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
        self.L = L
        T = int(sum(lengths))
        self.x, self.hid = r(T, H), r(T, I)
        self.w_h, self.w_i, self.w_o = r(H, H), r(H, I), r(I, H)
        self.out_h, self.out_i = np.empty((T, H), np.float32), np.empty((T, I), np.float32)
        self.pool_in, self.pool_out = r(len(lengths), H), np.empty((len(lengths), H), np.float32)
        # attention operands per distinct length (rows of equal length batched together)
        self.att = []
        for n in sorted(set(int(v) for v in lengths if v)):
            count = int(sum(1 for v in lengths if v == n))
            for part in [count // 2, count - count // 2] if count > 1 else [count]:
                q, kt, v = r(part, N, n, D), r(part, N, D, n), r(part, N, n, D)
                self.att.append((q, kt, v, np.empty((part, N, n, n), np.float32),
                                 np.empty((part, N, n, D), np.float32)))

    def __call__(self):
        """Plain NumPy: np.matmul with NumPy's OpenBLAS threading."""
        self._products(lambda a, b, out: np.matmul(a, b, out=out), lambda f, items: [f(i) for i in items])

    def split(self):
        """The same products with OpenBLAS set to one thread and rows (and sequences) split over a pool
        of threads (engine.fast.threads.default_threads()), as engine/fast/forward.py runs np.matmul."""
        from engine.fast.threads import default_threads, thread_pool
        n = default_threads()
        pool = thread_pool(n)

        def mm(a, b, out):
            rows = a.shape[0]
            if pool is None or rows < 2 * n:
                np.matmul(a, b, out=out)
                return
            bounds = [rows * i // n for i in range(n + 1)]
            for f in [pool.submit(np.matmul, a[bounds[i]:bounds[i + 1]], b, out=out[bounds[i]:bounds[i + 1]])
                      for i in range(n)]:
                f.result()
        self._on_pool(mm)

    def kernel(self):
        """The same products as the fast path runs them by default: the dense ones with the packed
        kernel of engine/fast/gemm.py (weights packed once, panels split over the pool), the attention
        ones as in split(). None where the kernel is off (no Numba)."""
        from engine.fast import gemm
        from engine.fast.threads import packed_product
        if not gemm.enabled():
            return None
        if not hasattr(self, "_packed"):
            self._packed = {id(w): gemm.PackedMatrix(w) for w in (self.w_h, self.w_i, self.w_o)}
        self._on_pool(lambda a, b, out: packed_product(self._packed[id(b)], a, out))

    def _on_pool(self, mm):
        """The products with `mm` for the dense ones, OpenBLAS at one thread, sequences over the pool."""
        from engine.fast.threads import default_threads, single_threaded_blas, thread_pool
        pool = thread_pool(default_threads())
        with single_threaded_blas():
            self._products(mm, lambda f, items: [f(i) for i in items] if pool is None else
                           [r.result() for r in [pool.submit(f, i) for i in items]])

    def _products(self, mm, each):
        def attention(item):
            q, kt, v, s, c = item
            np.matmul(q, kt, out=s)                                   # scores
            np.matmul(s, v, out=c)                                    # context
        for _ in range(self.L):
            for _ in range(4):                                        # q, k, v, o projections
                mm(self.x, self.w_h, self.out_h)
            each(attention, self.att)
            mm(self.x, self.w_i, self.out_i)                          # GEGLU: gelu branch
            mm(self.x, self.w_i, self.out_i)                          # gate
            mm(self.hid, self.w_o, self.out_h)                        # output
        mm(self.pool_in, self.w_h, self.pool_out)                     # pooler


def best_floor(med: dict, packed_tokens: bool) -> float:
    """The fastest way measured to run the case's products: plain, split, or with the packed kernel
    (the skip path's: the same with only the real tokens)."""
    prefix = "floor-packed" if packed_tokens else "floor"
    return min(med[k] for k in (prefix, f"{prefix}-split", f"{prefix}-kernel") if k in med)


def tf_runner(model):
    import tensorflow as tf

    def run(inputs):
        out = model({k: tf.constant(v) for k, v in inputs.items()})
        return {"sequence_output": out["sequence_output"].numpy(), "pooled_output": out["pooled_output"].numpy()}
    return run


def onnx_path(h5: str) -> str:
    """The encoder graph of `h5` (weights/export_onnx.py), exported once per weights file."""
    out = os.path.join(ONNX_DIR, os.path.splitext(os.path.basename(h5))[0] + ".onnx")
    if not os.path.isfile(out):
        from weights.export_onnx import export_onnx
        print(f"[bench] exporting {h5} -> {out}", flush=True)
        export_onnx(h5, out)
    return out


def onnx_session(path: str, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_runner(session):
    names = ["sequence_output", "pooled_output"]

    def run(inputs):
        return dict(zip(names, session.run(names, inputs)))
    return run


# ------------------------------------------------------------------------------------------ measuring

def settle(window_s=0.05, idle_cores=0.05, limit_s=2.0) -> float:
    """Waits until this process's threads are idle; returns the seconds waited.

    A runner's threads keep spinning after its call returns (measured: after a native np.matmul one
    OpenBLAS worker keeps a core busy for about 0.1 s), and on a 2-core machine that steals a core
    from whichever runner comes next in the round: the next runner would be timed alongside the last
    one's leftovers. Waits in windows of window_s until one uses under idle_cores of CPU (this
    process only: other processes' load is the machine's noise, not the previous runner's)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        t0, c0 = time.perf_counter(), sum(os.times()[:2])
        time.sleep(window_s)
        if (sum(os.times()[:2]) - c0) / (time.perf_counter() - t0) < idle_cores:
            break
    return time.perf_counter() - start


def interleaved(runners: dict, inputs: dict, reps: int, slow_reps: dict, waits: dict = None) -> dict:
    """{name: [seconds]}: one warm-up call each, then rounds of one call per runner, each call after
    the previous runner's threads went idle (settle; the waits go to `waits` when given)."""
    times = {name: [] for name in runners}
    for name, fn in runners.items():
        fn(inputs)
    for rep in range(reps):
        for name, fn in runners.items():
            if rep >= slow_reps.get(name, reps):
                continue
            waited = settle()
            if waits is not None:
                waits.setdefault(name, []).append(waited)
            t0 = time.perf_counter()
            fn(inputs)
            times[name].append(time.perf_counter() - t0)
    return times
