"""The fast CPU path's threads: a pool per thread count, row blocks spread over it, and OpenBLAS held
at one thread while the pool runs the products (the previous count restored after).

    parallel_rows(fn, rows, block, threads)      # fn(start, stop, worker) over row blocks, on the pool
    with single_threaded_blas():                 # OpenBLAS at one thread in the block, restored after
        ...
    packed_product(packed, x, out, bias, threads)   # engine/fast/gemm.py's panels over the pool

Why our own threads: OpenBLAS's threads busy-wait between calls, which collapses when the CPU is
shared with other processes (10-20x slower on a loaded 2-core machine); Python threads waiting on
futures don't, and the element-wise kernels (NumPy ufuncs, Numba's nogil kernels) release the GIL.

The thread count is the caller's: the fast path passes its Settings' threads (engine.core.settings).
Callers given no count (the tape's fused kernels, the optimizer) get default_threads(), the
Settings' default read once per process, capped by threads_capped() while a training step runs.

Small work runs on fewer threads: a thread the OS has descheduled makes every other one wait at
each join, and a small model's step has a hundred-odd joins for little work each; threads_for_work
gives a call one thread per MIN_FLOPS_PER_THREAD of its products (the Settings field adapt_threads,
on by default; measured: benchmarks/results/contention.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.core.settings import resolve_setting

_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()
_BLAS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def default_threads() -> int:
    """Threads for callers given no count: $TALKHEADS_THREADS, else the CPUs this process may run
    on, read once (at the first call)."""
    return resolve_setting("threads")


_CAP = [None]          # threads_capped(n): the cap on default_threads() while a step runs


def current_threads() -> int:
    """default_threads(), capped by threads_capped() while a training step runs: the count for
    callers given none."""
    return default_threads() if _CAP[0] is None else min(default_threads(), _CAP[0])


@contextlib.contextmanager
def threads_capped(n: int):
    """default_threads() callers (the tape's kernels, the optimizer) and OpenBLAS's own threads use at
    most n threads in the block (a training step), restored after."""
    setter = blas_thread_setter()
    previous_cap, _CAP[0] = _CAP[0], max(1, int(n))
    previous_blas = setter(min(blas_threads() or _CAP[0], _CAP[0])) if setter is not None else None
    try:
        yield
    finally:
        _CAP[0] = previous_cap
        if setter is not None:
            setter(previous_blas)


# The least work (FLOPs of the dense products) worth a thread: below it, a call's hundred-odd joins
# of the pool cost more than the thread gains, and on a busy machine far more (measured on 2 cores:
# the small model's 32x64 training step, 1.4e9 FLOPs, ran 567 samples/s on one thread and 485 on
# two on a quiet machine, 299 and 93 with two busy processes beside it). Choosing threads by the
# cores other processes leave free was measured and rejected: the OS shares the CPUs per thread,
# so a base-size call on one thread beside two busy processes ran at 0.26 calls/s, on two 0.34.
MIN_FLOPS_PER_THREAD = 5e9


def threads_for_work(threads: int, flops: float) -> int:
    """min(threads, flops / MIN_FLOPS_PER_THREAD), at least 1: the threads a call of that much
    work gets (the Settings field adapt_threads)."""
    return max(1, min(int(threads), int(flops // MIN_FLOPS_PER_THREAD)))


def thread_pool(threads: int) -> ThreadPoolExecutor | None:
    """The process's pool of `threads` workers (made at the first call for that count, then
    shared), or None for one thread (the caller runs the work itself)."""
    if threads <= 1:
        return None
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="talkheads-fast")
    return pool


def parallel_rows(fn, rows: int, block: int, threads: int | None = None) -> None:
    """Calls fn(start, stop, worker) on row blocks of at most `block` rows covering [0, rows), spread
    over `threads` threads (None: default_threads()); `worker` (0 .. threads-1) indexes per-thread
    scratch space."""
    n = current_threads() if threads is None else threads
    pool = thread_pool(n)
    if pool is None or rows <= block:
        for s in range(0, rows, block):
            fn(s, min(rows, s + block), 0)
        return
    bounds = [rows * i // n for i in range(n + 1)]

    def run(lo, hi, w):
        for s in range(lo, hi, block):
            fn(s, min(hi, s + block), w)

    futures = [pool.submit(run, bounds[i], bounds[i + 1], i) for i in range(n) if bounds[i + 1] > bounds[i]]
    for f in futures:
        f.result()


def packed_product(packed, a, out, bias=None, threads: int | None = None):
    """out = a @ W (+ bias [N]) for W packed by engine/fast/gemm.py: the panels spread over the
    threads (disjoint columns of out; no BLAS runs), then the columns past the last panel."""
    n = current_threads() if threads is None else threads
    P = packed.num_panels
    if P:                                  # none when N < one panel: the tail is the whole product
        parallel_rows(lambda s, e, w: packed.matmul(a, out, s, e, bias), P, -(-P // n), n)
    packed.matmul_tail(a, out, bias)


@functools.lru_cache(maxsize=None)
def _openblas():
    """(set n, get) of the OpenBLAS NumPy uses, or None where they are not found (another BLAS, or a
    NumPy built without its own OpenBLAS)."""
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
                return set_fn, get_fn
    return None


def blas_thread_setter():
    """A function n -> previous count that sets the thread count of the OpenBLAS NumPy uses, or None
    where it is not found."""
    found = _openblas()
    if found is None:
        return None
    set_fn, get_fn = found

    def set_threads(n):
        previous = get_fn()
        set_fn(int(n))
        return previous
    return set_threads


def blas_threads() -> int | None:
    """OpenBLAS's thread count now (None where it is not found)."""
    found = _openblas()
    return None if found is None else found[1]()


@contextlib.contextmanager
def single_threaded_blas():
    """OpenBLAS at one thread for the block, the previous count restored after (one caller at a
    time): the caller splits the work over its own threads. A no-op where NumPy's OpenBLAS setter is
    not found. Process-wide while it lasts: other threads' NumPy products run single-threaded too."""
    setter = blas_thread_setter()
    if setter is None:
        yield
        return
    with _BLAS_LOCK:
        previous = setter(1)
        try:
            yield
        finally:
            setter(previous)
