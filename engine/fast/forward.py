"""The fast CPU path: the same model as engine.core.kernels + engine.core.model, arranged for speed (NumPy only).

    enc = engine.load("model.h5", fast=True)
    enc(inputs)                          # same outputs as the readable path, within 1e-5 relative
    enc(inputs, skip_padding=True)       # opt-in: computes the real tokens only (see below)

What differs from the readable path (engine.core.kernels), and why the numbers stay the same:
- Q, K and V are one product x·[Wq|Wk|Wv] ([T,H] @ [H,3*N*D]); the GEGLU's two input products are
  one product x·[Wi|Wg] ([T,H] @ [H,2*I]). The readable path's kernels are rebound to views of
  these fused arrays. The four dense products of a block run the packed-weight kernel of
  engine/fast/gemm.py (float32 with Numba; TALKHEADS_PACKED_GEMM=0 turns it off): each weight is
  packed once, here, into column panels, and the panels are split over the threads; the q/k/v
  bias is added as the tile is stored. That packed copy is the one second copy of the weights the
  fast path holds (about the encoder blocks' size again: +430 MB peak RSS at base size), for 0.79x the
  time at 1x128 and 0.89x at 8x128 (measured, see the README). Otherwise every product is
  np.matmul with `out=` into preallocated buffers, split over the threads (nothing is allocated
  per layer). Like the other derived arrays (qkv_bias, the scaled W_pre), the packed copy does not
  follow in-place changes of the readable weights: reload the weights after training them.
- Attention runs per sequence on strided views of the fused QKV output (no transposes, no copies):
  scores [N,S,T] = q·k^T; talking-heads mixing is one [N,N] @ [N,S*T] product on that contiguous
  layout; the 1/sqrt(D) scale is folded into W_pre (exact for D a power of two); the masked softmax
  is two fused passes around NumPy's exp; the context is written straight into a [S,N,D] buffer
  that is the input of the output projection. Sequences are spread over the threads; with fewer
  sequences than threads (one long text) each sequence's queries are cut into one part per thread.
- Element-wise work (biases, GELU, gate, residuals, layer norms) runs on row blocks small enough
  to stay in cache, spread over a small thread pool (BLAS is idle at those moments): as the fused
  Numba kernels of engine/fast/fused.py (add + layer norm in one pass with float64 statistics; the
  GEGLU around NumPy's tanh; the softmax around NumPy's exp, its row sums in float64) when Numba is
  there and TALKHEADS_FUSED is not 0, else as in-place NumPy ufuncs (which release the GIL) in the
  readable kernels' order of operations.
- float32 (or float64) throughout, as the Encoder's dtype.

skip_padding=True packs the real tokens (input_mask == 1) of all rows into one [tokens,H] matrix,
runs the dense products on it only and attention per row on that row's real tokens only. Real
tokens' outputs equal the dense path's (padded keys get exactly zero probability there, in every
head, before and after the post-softmax mixing), within rounding. Padded positions are NOT
computed: in the returned sequence_output and encoder_outputs they hold zeros, and pooled_output
of a row whose position 0 is padding (an all-padding row, or left padding) is tanh(bias) of the
zero vector, unlike TensorFlow's. Only real tokens (and pooled_output of rows whose position 0 is
real, which is every row the Hub preprocessor makes) match the reference.

Threads: with more than one CPU ($TALKHEADS_THREADS, else the affinity count) the fast path sets
NumPy's OpenBLAS to one thread during a call (restoring it after) and runs the products' row halves,
the sequences' attention and the element-wise blocks on its own pool; TALKHEADS_FAST_BLAS_THREADS=native
keeps OpenBLAS's threading instead. Not thread-safe: one Encoder, one call at a time (the workspace
is reused between calls), and other threads' NumPy products run single-threaded meanwhile.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.core import kernels as K
from engine.fast import fused, gemm

_POOL = None
_POOL_LOCK = threading.Lock()
_BLAS_LOCK = threading.Lock()
_NO_ADDER = np.zeros(0, np.float32)   # the fused softmax's adder argument when there is no mask


def _find_blas_threads():
    """A function n -> previous thread count of the OpenBLAS that NumPy uses, or None.

    The fast path does its own threading: it sets OpenBLAS to one thread for the duration of a call
    and splits the products' rows and the sequences' attention over its own thread pool. OpenBLAS's
    own threads busy-wait between calls, which collapses when the CPU is shared with other
    processes (10-20x slower on a loaded 2-core machine); Python threads waiting on futures don't.
    """
    import ctypes
    import glob
    libs = sorted(glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*.so*")))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter, getter in (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                               ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                               ("openblas_set_num_threads", "openblas_get_num_threads")):
            if hasattr(lib, setter) and hasattr(lib, getter):
                set_fn, get_fn = getattr(lib, setter), getattr(lib, getter)
                set_fn.argtypes, set_fn.restype, get_fn.restype = [ctypes.c_int], None, ctypes.c_int

                def threads(n, set_fn=set_fn, get_fn=get_fn):
                    previous = get_fn()
                    set_fn(int(n))
                    return previous
                return threads
    return None


_blas_threads = None if os.environ.get("TALKHEADS_FAST_BLAS_THREADS") == "native" else _find_blas_threads()


@contextlib.contextmanager
def single_threaded_blas():
    """OpenBLAS at one thread for the block, the previous count restored after (one caller at a
    time): the caller splits the work over the fast path's own threads. A no-op where NumPy's
    OpenBLAS setter was not found or TALKHEADS_FAST_BLAS_THREADS=native."""
    if _blas_threads is None:
        yield
        return
    with _BLAS_LOCK:
        previous = _blas_threads(1)
        try:
            yield
        finally:
            _blas_threads(previous)


def num_threads() -> int:
    """Threads for element-wise work: $TALKHEADS_THREADS, else the CPU count."""
    value = os.environ.get("TALKHEADS_THREADS")
    if value:
        return max(1, int(value))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def _pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None and num_threads() > 1:
            _POOL = ThreadPoolExecutor(max_workers=num_threads(), thread_name_prefix="talkheads-fast")
    return _POOL


def parallel_rows(fn, rows: int, block: int) -> None:
    """Calls fn(start, stop, worker) on row blocks of at most `block` rows covering [0, rows), spread
    over the threads; `worker` (0 .. num_threads()-1) indexes per-thread scratch space."""
    pool = _pool()
    if pool is None or rows <= block:
        for s in range(0, rows, block):
            fn(s, min(rows, s + block), 0)
        return
    n = num_threads()
    bounds = [rows * i // n for i in range(n + 1)]

    def run(lo, hi, w):
        for s in range(lo, hi, block):
            fn(s, min(hi, s + block), w)

    futures = [pool.submit(run, bounds[i], bounds[i + 1], i) for i in range(n) if bounds[i + 1] > bounds[i]]
    for f in futures:
        f.result()


def _return_freed_memory():
    """Hands the heap's free pages back to the OS (glibc's malloc_trim; elsewhere a no-op): the
    weights the fast layout replaced were freed, but glibc keeps freed heap memory for reuse, which
    left the process ~430 MB larger than its live arrays at base size (measured)."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def packed_product(packed, a, out, bias=None):
    """out = a @ W (+ bias [N]) for W packed by engine/fast/gemm.py: the panels spread over the
    threads (disjoint columns of out; no BLAS runs), then the columns past the last panel."""
    P = packed.num_panels
    if P:                                  # none when N < one panel: the tail is the whole product
        parallel_rows(lambda s, e, w: packed.matmul(a, out, s, e, bias), P, -(-P // num_threads()))
    packed.matmul_tail(a, out, bias)


def masked_softmax_in_place(logits, adder, use_fused):
    """logits <- softmax(logits + adder) over the last axis, in place. [N,S,T] (+ [T] or None)

    use_fused (float32 with Numba): two passes around NumPy's exp, mask + max-subtract and normalize
    with the row sum in float64, where NumPy's way is six passes (add, max, subtract, exp, sum,
    divide; benchmarks/bench_fused.py). Without it: engine.core.kernels.masked_softmax's operations
    in its order (the tape's attention relies on that: bit for bit the readable kernel)."""
    if use_fused:
        rows = logits.reshape(-1, logits.shape[-1])
        fused.softmax_shift_rows(rows, _NO_ADDER if adder is None else adder, adder is not None)
        np.exp(rows, out=rows)
        fused.softmax_normalize_rows(rows)
        return
    if adder is not None:
        np.add(logits, adder, out=logits)                                      # + [T] mask adder
        if logits.dtype.itemsize > 4:   # float64: masked logits as float32 has them (see
            cols = adder != 0           # engine.core.kernels.apply_attention_mask)
            logits[:, :, cols] = logits[:, :, cols].astype(np.float32)
    np.subtract(logits, logits.max(axis=-1, keepdims=True), out=logits)
    np.exp(logits, out=logits)
    np.divide(logits, logits.sum(axis=-1, keepdims=True), out=logits)


def _touched_empty(shape, dtype):
    """np.empty whose pages are touched here, by one thread: the block outputs are new memory each
    call (the caller keeps them) written by the pool's threads, and page faults taken by two threads
    at once cost far more than by one (measured at base size: 0.97x the time at 8x512, 0.99x at
    8x128 with the touch). One write per 4 KiB page."""
    out = np.empty(shape, dtype)
    out.reshape(-1)[::4096 // out.itemsize] = 0
    return out


def _transposed_copy(w):
    """w's values as the transpose of a C-order array (Fortran order): the layout the fast path's
    products take their weights in (see _FastBlock)."""
    return np.ascontiguousarray(w.T).T


class _FastBlock:
    """One block's weights in the fast layout."""

    def __init__(self, block, config, dtype):
        a, f = block.attention, block.feedforward
        H, N, D, I = config.hidden_size, config.num_heads, config.head_size, config.intermediate_size
        ND = N * D
        # Every weight matrix is stored transposed ([out,in] in C order, used as its [in,out] view):
        # OpenBLAS multiplies x @ W^T-stored faster for few rows (measured at 128 rows, one thread:
        # 92 vs 75 GFLOP/s for [128,768]x[768,2304], 87 vs 77 for [768,6144]) and as fast for many.
        self.qkv_kernel = np.empty((3 * ND, H), dtype).T                               # [H,3ND] view
        for j, kern in enumerate((a.query_kernel, a.key_kernel, a.value_kernel)):
            self.qkv_kernel[:, j * ND:(j + 1) * ND] = np.asarray(kern).reshape(H, ND)
        self.qkv_bias = np.concatenate([np.asarray(b).reshape(ND) for b in (a.query_bias, a.key_bias, a.value_bias)])
        # rebind the readable weights to views of the fused ones (values unchanged, no copy kept)
        a.query_kernel = self.qkv_kernel[:, :ND].reshape(H, N, D)
        a.key_kernel = self.qkv_kernel[:, ND:2 * ND].reshape(H, N, D)
        a.value_kernel = self.qkv_kernel[:, 2 * ND:].reshape(H, N, D)
        self.output_kernel = _transposed_copy(np.asarray(a.output_kernel).reshape(ND, H))     # [ND,H] view
        a.output_kernel = self.output_kernel.reshape(N, D, H)
        self.output_bias = np.asarray(a.output_bias)
        scale = 1.0 / math.sqrt(float(D))
        # out = W^T @ x over the head axis; the score scale folded into W_pre (exact when D = 4^k).
        # W^T is kept in Fortran order (the transpose of a C-order W): OpenBLAS runs [N,N] @ [N,S*T]
        # about 100x faster with 2 threads that way than with a C-order W^T.
        self.pre_t = np.ascontiguousarray(np.asarray(a.pre_softmax_weight, np.float64) * scale, dtype).T
        self.post_t = np.ascontiguousarray(np.asarray(a.post_softmax_weight), dtype).T
        self.attention_ln = tuple(np.asarray(v) for v in block.attention_ln)
        self.ff_kernel = np.empty((2 * I, H), dtype).T                                 # [H,2I] view
        self.ff_kernel[:, :I] = np.asarray(f.intermediate_kernel)
        self.ff_kernel[:, I:] = np.asarray(f.gate_kernel)
        f.intermediate_kernel = self.ff_kernel[:, :I]
        f.gate_kernel = self.ff_kernel[:, I:]
        self.intermediate_bias = np.asarray(f.intermediate_bias)
        self.gate_bias = np.asarray(f.gate_bias)
        self.out_kernel = f.output_kernel = _transposed_copy(np.asarray(f.output_kernel))    # [I,H] view
        self.out_bias = np.asarray(f.output_bias)
        self.feedforward_ln = tuple(np.asarray(v) for v in block.feedforward_ln)
        # The same four matrices packed for engine/fast/gemm.py (float32 with Numba): a second copy,
        # derived once, like pre_t and qkv_bias (engine.core.model.Encoder.parameters says so).
        self.packed = None
        if dtype == np.float32 and gemm.enabled():
            self.packed = {name: gemm.PackedMatrix(getattr(self, name))
                           for name in ("qkv_kernel", "output_kernel", "ff_kernel", "out_kernel")}


class FastEncoder:
    """The fast forward pass of an engine.core.model.Encoder (NumPy backend). Built by
    engine.Encoder(..., fast=True) / engine.load(..., fast=True)."""

    skips_padding = True     # encode(..., skip_padding=True) packs the real tokens

    # rows per element-wise block (kept in L2: 16 x 2I floats for the GEGLU)
    GEGLU_BLOCK = 16
    LN_BLOCK = 64
    FUSED_BLOCK = 64   # the fused kernels keep no temporaries: any block size; 64 rows balance the threads

    def __init__(self, encoder):
        self.config = cfg = encoder.config
        self.dtype = np.dtype(encoder.dtype)
        self.encoder = encoder
        self.blocks = [_FastBlock(b, cfg, self.dtype) for b in encoder.blocks]
        t = self.dtype.type
        self._c = {"half": t(0.5), "one": t(1.0), "coeff": t(K.GELU_TANH_COEFF), "k": t(K.SQRT_2_OVER_PI), "minus_2k": t(-2.0 * K.SQRT_2_OVER_PI),
                   "eps": t(cfg.layer_norm_epsilon), "mask": t(cfg.attention_mask_constant)}
        self._work = {}
        self._split = False
        _return_freed_memory()
        self.profile = None      # a dict to fill with seconds per kernel class (benchmarks); None: off
        self._last = 0.0

    def _mark(self, kind):
        """Profiling: charges the time since the previous mark to `kind` (no-op unless self.profile)."""
        if self.profile is not None:
            now = time.perf_counter()
            self.profile[kind] = self.profile.get(kind, 0.0) + now - self._last
            self._last = now

    # ------------------------------------------------------------------------ workspace

    def _buffer(self, name, shape):
        """A reusable scratch buffer of at least `shape` (contents undefined)."""
        size = int(np.prod(shape))
        buf = self._work.get(name)
        if buf is None or buf.size < size:
            buf = np.empty(size, self.dtype)
            self._work[name] = buf
        return buf[:size].reshape(shape)

    # ------------------------------------------------------------------------ element-wise stages

    def _fused(self) -> bool:
        """The Numba kernels of engine/fast/fused.py run the element-wise stages (float32)."""
        return self.dtype == np.float32 and fused.enabled()

    def _add_layer_norm(self, a, bias, residual, gamma, beta, out):
        """out = LN(a + bias + residual) row-wise (a is scratch: overwritten or not); a [T,H], out [T,H]."""
        eps = self._c["eps"]
        H = a.shape[1]
        if self._fused():
            eps64 = float(eps)
            parallel_rows(lambda s, e, w: fused.add_layer_norm_rows(a, bias, residual, gamma, beta, eps64, out, s, e),
                          a.shape[0], self.FUSED_BLOCK)
            return
        tmp = self._buffer("ln_tmp", (num_threads(), self.LN_BLOCK, H))

        def run(s, e, w):
            x = a[s:e]
            np.add(x, bias, out=x)
            np.add(x, residual[s:e], out=x)
            mean = x.mean(axis=-1, keepdims=True)
            np.subtract(x, mean, out=x)
            t = tmp[w][:e - s]
            np.multiply(x, x, out=t)
            var = t.mean(axis=-1, keepdims=True)
            np.add(var, eps, out=var)
            np.sqrt(var, out=var)
            inv = np.divide(self._c["one"], var, out=var)
            o = out[s:e]
            np.multiply(x, inv, out=o)
            np.multiply(o, gamma, out=o)
            np.add(o, beta, out=o)

        parallel_rows(run, a.shape[0], self.LN_BLOCK)

    def _geglu(self, hg, bi, bg, out):
        """out = gelu(h + bi) * (g + bg) with [h|g] = hg [T,2I]; out [T,I]."""
        I = out.shape[1]
        c = self._c
        if self._fused():
            scratch = self._buffer("geglu_tanh", (num_threads(), self.GEGLU_BLOCK, I))
            k, coeff = np.float32(K.SQRT_2_OVER_PI), np.float32(K.GELU_TANH_COEFF)

            def fused_block(s, e, w):
                u = scratch[w][:e - s]
                fused.geglu_argument_rows(hg, bi, u, s, e, k, coeff)   # k(x + c x^3)
                np.tanh(u, out=u)                              # NumPy's SIMD tanh (see fused.py)
                fused.geglu_finish_rows(hg, bi, bg, u, out, s, e)
            parallel_rows(fused_block, hg.shape[0], self.GEGLU_BLOCK)
            return

        def run(s, e, w):
            h, g, t = hg[s:e, :I], hg[s:e, I:], out[s:e]
            np.add(h, bi, out=h)
            np.add(g, bg, out=g)
            # 0.5*x*(1 + tanh(z)) = x / (1 + exp(-2z)), z = k*(x + c*x^3): the same function, a few
            # ulps apart; NumPy's float32 exp is ~3x faster than its tanh.
            np.multiply(h, h, out=t)            # x*x
            np.multiply(t, h, out=t)            # x*x*x
            np.multiply(t, c["coeff"], out=t)   # c*x^3
            np.add(h, t, out=t)                 # x + c*x^3
            np.multiply(t, c["minus_2k"], out=t)  # -2z
            with np.errstate(over="ignore"):    # inf for very negative x is intended: x/inf = -0, no NaN
                np.exp(t, out=t)                # exp(-2z)
            np.add(t, c["one"], out=t)          # 1 + exp(-2z)
            np.divide(h, t, out=t)              # gelu(x)
            np.multiply(t, g, out=t)            # gelu * gate

        parallel_rows(run, hg.shape[0], self.GEGLU_BLOCK)

    # ------------------------------------------------------------------------ attention

    def _attention(self, blk, qkv, ctx, spans, adders, first_query_only=False):
        """Per sequence: ctx[rows] = attention of qkv[rows]. qkv [T,3ND] (biased), ctx [T,ND].
        first_query_only: sequence i's first query alone, into ctx[i] (ctx [len(spans),ND]): for
        pooled_output alone the last block is needed at the [CLS] token only.

        Work units are (sequence, query rows) spread over the threads, costliest first, to the least
        loaded thread: whole sequences, or with fewer sequences than threads each sequence's queries
        cut into one part per thread (a query's scores, mixing, softmax and context depend on its
        own row of logits and on all keys and values: the parts are independent)."""
        N, D = self.config.num_heads, self.config.head_size
        ND = N * D
        n = num_threads() if self._split else 1
        lengths = [(i, e - s) for i, (s, e) in enumerate(spans) if e > s]
        if first_query_only:
            units = [(i, 0, 1, L) for i, L in lengths]                          # (seq, q0, q1, cost)
        else:
            parts = n if len(lengths) < n else 1
            units = [(i, L * j // parts, L * (j + 1) // parts, (L * (j + 1) // parts - L * j // parts) * L)
                     for i, L in lengths for j in range(parts) if L * (j + 1) // parts > L * j // parts]
        groups, load = [[] for _ in range(n)], [0] * n
        for unit in sorted(units, key=lambda u: -u[3]):
            w = load.index(min(load))
            groups[w].append(unit)
            load[w] += unit[3]
        longest = max((L for _, L in lengths), default=0)
        most_queries = max((q1 - q0 for _, q0, q1, _ in units), default=0)
        profiles = [dict() for _ in range(n)]
        use_fused = self._fused()

        def run(w):
            sbuf = self._buffer(f"scores{w}", (N * most_queries * longest,))
            mbuf = self._buffer(f"mixed{w}", (N * most_queries * longest,))
            prof = profiles[w] if self.profile is not None else None
            last = time.perf_counter()

            def mark(kind):
                nonlocal last
                if prof is not None:
                    now = time.perf_counter()
                    prof[kind] = prof.get(kind, 0.0) + now - last
                    last = now

            for i, q0, q1, _ in groups[w]:
                s, e = spans[i]
                adder = adders[i]
                L = e - s
                Q = q1 - q0                                                       # queries
                rows = qkv[s:e]
                q = rows[q0:q1, :ND].reshape(Q, N, D).transpose(1, 0, 2)          # [N,S,D] view
                k = rows[:, ND:2 * ND].reshape(L, N, D).transpose(1, 2, 0)        # [N,D,T] view
                v = rows[:, 2 * ND:].reshape(L, N, D).transpose(1, 0, 2)          # [N,T,D] view
                scores = sbuf[:N * Q * L].reshape(N, Q, L)
                mark("other")
                np.matmul(q, k, out=scores)                                       # [N,S,T] (unscaled)
                mark("products")
                mixed = mbuf[:N * Q * L].reshape(N, Q, L)
                np.matmul(blk.pre_t, scores.reshape(N, Q * L), out=mixed.reshape(N, Q * L))  # scale*W_pre mix
                mark("talking-heads mixing")
                masked_softmax_in_place(mixed, adder, use_fused)
                mark("softmax")
                np.matmul(blk.post_t, mixed.reshape(N, Q * L), out=scores.reshape(N, Q * L))  # W_post mix
                mark("talking-heads mixing")
                dest = ctx[i:i + 1] if first_query_only else ctx[s + q0:s + q1]
                out = dest.reshape(Q, N, D).transpose(1, 0, 2)                    # [N,S,D] view of [S,N,D]
                np.matmul(scores, v, out=out)
                mark("products")

        self._mark("other")
        t0 = time.perf_counter()
        busy = [w for w in range(n) if groups[w]]
        if len(busy) > 1:
            for f in [_pool().submit(run, w) for w in busy]:
                f.result()
        elif busy:
            run(busy[0])
        if self.profile is not None:   # the phase's wall time, shared out as the threads spent it
            wall = time.perf_counter() - t0
            total = {}
            for prof in profiles:
                for kind, sec in prof.items():
                    total[kind] = total.get(kind, 0.0) + sec
            whole = sum(total.values()) or 1.0
            for kind, sec in total.items():
                self.profile[kind] = self.profile.get(kind, 0.0) + wall * sec / whole
            self._last = time.perf_counter()

    def _product(self, a, blk, name, out, bias=None):
        """out = a @ blk.<name> (+ bias [N], when given): the packed kernel of engine/fast/gemm.py
        when the block has its packed copy, else np.matmul (_matmul) and a bias add."""
        packed = blk.packed[name] if blk.packed is not None and gemm.enabled() else None
        if packed is None:
            self._matmul(a, getattr(blk, name), out)
            if bias is not None:
                parallel_rows(lambda s, e, w: np.add(out[s:e], bias, out=out[s:e]), out.shape[0], 256)
            return
        packed_product(packed, a, out, bias)

    def _matmul(self, a, b, out):
        """out = a @ b split over the threads (BLAS single-threaded in each) when splitting: by rows of
        a for many rows, else by columns of b (each thread then packs only its half of the weights)."""
        rows, cols = a.shape[0], b.shape[1]
        n = num_threads()
        if not self._split or rows < 2 * n or cols < 2 * n:
            np.matmul(a, b, out=out)
            return
        if rows > 512:
            bounds = [rows * i // n for i in range(n + 1)]
            parts = [(a[bounds[i]:bounds[i + 1]], b, out[bounds[i]:bounds[i + 1]]) for i in range(n)]
        else:
            bounds = [cols * i // n for i in range(n + 1)]
            parts = [(a, b[:, bounds[i]:bounds[i + 1]], out[:, bounds[i]:bounds[i + 1]]) for i in range(n)]
        futures = [_pool().submit(np.matmul, x, w, out=o) for x, w, o in parts]
        for f in futures:
            f.result()

    # ------------------------------------------------------------------------ forward

    def encode(self, ids, mask, types, skip_padding=False, keep="all"):
        """Returns (encoder_outputs, pooled [B,H]), like Encoder._encode: encoder_outputs holds the L
        block outputs [B,S,H] (keep="all"), the last one only ("last"), or none ("pooled")."""
        self._split = num_threads() > 1 and _blas_threads is not None
        if not self._split:
            return self._encode(ids, mask, types, skip_padding, keep)
        with single_threaded_blas():
            return self._encode(ids, mask, types, skip_padding, keep)

    def _encode(self, ids, mask, types, skip_padding, keep="all"):
        cfg, enc, dt = self.config, self.encoder, self.dtype
        self._last = time.perf_counter()
        B, S = ids.shape
        H, I, ND = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_size
        nL = len(self.blocks)
        mask = np.asarray(mask)
        if keep not in ("all", "last", "pooled"):
            raise ValueError(f"keep={keep!r}: all, last or pooled")
        kept = {"all": nL, "last": 1, "pooled": 0}[keep]
        outputs = np.zeros((kept, B, S, H), dt) if skip_padding else _touched_empty((kept, B, S, H), dt)
        if skip_padding:
            flat = np.flatnonzero(mask.reshape(-1))                          # real tokens, row-major
            lengths = np.count_nonzero(mask, axis=1)
            ends = np.cumsum(lengths)
            spans = [(int(e - n), int(e)) for n, e in zip(lengths, ends)]
            adders = [None] * B
            tok_ids, tok_types, tok_pos = ids.reshape(-1)[flat], types.reshape(-1)[flat], flat % S
        else:
            flat = None
            spans = [(b * S, (b + 1) * S) for b in range(B)]
            adders = []
            for b in range(B):
                if np.all(mask[b] == 1):
                    adders.append(None)                                        # adding -0.0 changes nothing
                else:
                    adders.append((self._c["one"] - mask[b].astype(dt)) * self._c["mask"])   # [T]
            tok_ids, tok_types = ids.reshape(-1), types.reshape(-1)
            tok_pos = np.tile(np.arange(S), B)
        T = len(tok_ids)
        self._mark("other")
        # embeddings: (word[ids] + position) + type, then LN
        x0 = self._buffer("x0", (T, H))
        np.take(enc.word_table, tok_ids, axis=0, out=x0)
        e = self._buffer("a", (T, H))
        np.take(enc.position_table, tok_pos, axis=0, out=e)
        np.add(x0, e, out=x0)
        np.take(enc.type_table, tok_types, axis=0, out=e)
        self._mark("gather")
        zero = self._buffer("zero_h", (H,))
        zero[:] = 0
        # the block outputs go to two alternating buffers, copied (scattered with skip_padding) into
        # `outputs` for the blocks kept; without skip_padding and with every block kept they are
        # computed in place in `outputs`
        in_place = not skip_padding and keep == "all"
        xs = None if in_place else self._buffer("xpack", (2, T, H))
        x = x0 if in_place else xs[0]
        self._add_layer_norm(x0, zero, e, *enc.embedding_ln, out=x)
        self._mark("layer norm")
        qkv = self._buffer("qkv", (T, 3 * ND))
        ctx = self._buffer("ctx", (T, ND))
        a = self._buffer("a", (T, H))
        hg = self._buffer("hg", (T, 2 * I))
        hid = self._buffer("hid", (T, I))
        f = self._buffer("f", (T, H))
        for li, blk in enumerate(self.blocks):
            self._product(x, blk, "qkv_kernel", qkv, blk.qkv_bias)             # [T,3ND] (+ bias)
            self._mark("products")
            if keep == "pooled" and li == nL - 1:
                return [], self._pooled_from_last_block(blk, x, qkv, spans, adders, mask, skip_padding)
            self._attention(blk, qkv, ctx, spans, adders)                     # [T,ND]
            self._product(ctx, blk, "output_kernel", a)                        # [T,H]
            self._mark("products")
            x1 = self._buffer("x1", (T, H))
            self._add_layer_norm(a, blk.output_bias, x, *blk.attention_ln, out=x1)
            self._mark("layer norm")
            self._product(x1, blk, "ff_kernel", hg)                            # [T,2I]
            self._mark("products")
            self._geglu(hg, blk.intermediate_bias, blk.gate_bias, hid)        # [T,I]
            self._mark("gelu")
            self._product(hid, blk, "out_kernel", f)                           # [T,H]
            self._mark("products")
            x = outputs[li].reshape(B * S, H) if in_place else xs[(li + 1) % 2]
            self._add_layer_norm(f, blk.out_bias, x1, *blk.feedforward_ln, out=x)
            self._mark("layer norm")
            slot = li - (nL - kept)                                            # this block's place in outputs
            if not in_place and slot >= 0:
                if skip_padding:
                    outputs[slot].reshape(B * S, H)[flat] = x
                else:
                    outputs[slot].reshape(B * S, H)[...] = x
                self._mark("other")
        return list(outputs), self._pooler(x, spans, mask, skip_padding)

    def _pooler(self, x, spans, mask, skip_padding):
        """tanh(x[:,0]·Wp + bp) from the last block's output x [T,H] (packed with skip_padding)."""
        enc, dt = self.encoder, self.dtype
        B, S = mask.shape
        H = x.shape[1]
        if skip_padding:                                                       # [CLS] rows: position 0 of each row
            cls = np.zeros((B, H), dt)
            first_real = mask[:, 0] == 1
            cls[first_real] = x[np.asarray([s for s, _ in spans])[first_real]]
        else:
            cls = x.reshape(B, S, H)[:, 0]
        pooled = K.dense(cls, enc.pooler_kernel, enc.pooler_bias)                     # [B,H]
        self._mark("products")
        np.tanh(pooled, out=pooled)
        self._mark("other")
        return pooled

    def _pooled_from_last_block(self, blk, x, qkv, spans, adders, mask, skip_padding):
        """pooled_output when nothing else is asked for: the last block at the [CLS] tokens only
        (rows whose position 0 is padding get the zero vector with skip_padding, as in the full call)."""
        B = mask.shape[0]
        which = [b for b in range(B) if mask[b, 0] == 1] if skip_padding else list(range(B))
        first = np.asarray([spans[b][0] for b in which], dtype=np.intp)
        ctx = np.empty((len(which), self.config.num_heads * self.config.head_size), self.dtype)   # [B',ND]
        self._attention(blk, qkv, ctx, [spans[b] for b in which], [adders[b] for b in which], first_query_only=True)
        self._mark("softmax")
        a = ctx @ blk.output_kernel                                            # [B',H]
        x1 = np.empty_like(a)
        self._mark("products")
        self._add_layer_norm(a, blk.output_bias, x[first], *blk.attention_ln, out=x1)
        hg = x1 @ blk.ff_kernel                                                # [B',2I]
        hid = np.empty((len(which), self.config.intermediate_size), self.dtype)
        self._geglu(hg, blk.intermediate_bias, blk.gate_bias, hid)
        f = hid @ blk.out_kernel                                               # [B',H]
        self._mark("products")
        y = np.empty_like(f)
        self._add_layer_norm(f, blk.out_bias, x1, *blk.feedforward_ln, out=y)
        cls = np.zeros((B, y.shape[1]), self.dtype)
        cls[which] = y
        pooled = K.dense(cls, self.encoder.pooler_kernel, self.encoder.pooler_bias)   # [B,H]
        np.tanh(pooled, out=pooled)
        self._mark("other")
        return pooled

