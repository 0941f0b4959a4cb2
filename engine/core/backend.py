"""The backend switch: one array module `xp`, NumPy on the CPU or CuPy on the GPU.

Every kernel is written once against `xp`. Pick the backend with `engine.load(..., backend=...)`,
else the environment variable TALKHEADS_BACKEND ("numpy", the default, or "cupy"; read by
engine.core.settings). CuPy is optional and imported only when asked for.
"""

from __future__ import annotations

import numpy

from engine.core.settings import resolve_setting

DTYPES = ("float32", "float64")


class BackendError(RuntimeError):
    """The requested backend cannot be used here (CuPy or a GPU missing)."""


def resolve_name(name: str | None) -> str:
    """The backend's name: the argument, else $TALKHEADS_BACKEND, else "numpy" (an unknown name
    fails with engine.core.settings.SettingError)."""
    return resolve_setting("backend", name)


def get_xp(name: str | None = None):
    """Returns the array module (numpy or cupy) for a backend name."""
    name = resolve_name(name)
    if name == "numpy":
        return numpy
    try:
        import cupy
    except ImportError as e:
        raise BackendError(f"backend 'cupy' needs CuPy: pip install '.[gpu]' ({e})") from e
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise BackendError("backend 'cupy': CuPy found no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise BackendError(f"backend 'cupy': no usable CUDA device ({e})") from e
    return cupy


def array_module(x):
    """The array module an array belongs to (cupy for CuPy arrays, numpy for everything else)."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return numpy


def to_numpy(x):
    """An output of either backend as a NumPy array (lists element-wise, dicts value-wise)."""
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_numpy(v) for v in x)
    if array_module(x) is not numpy:
        return x.get()
    return numpy.asarray(x)


def check_dtype(dtype) -> str:
    name = numpy.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    return name


_MALLOC_TUNED = False


def return_freed_memory() -> bool:
    """Asks glibc's malloc to give the free memory at the top of its heaps back to the OS
    (malloc_trim(0)); returns whether it ran. Why: arrays freed after glibc raised its mmap threshold
    (it does after the first big free) stay in the heap, resident: a fast encoder that lets 340 MB of
    readable matrices go would not shrink without it (measured: 1078 -> 645 MB at base size). A
    no-op elsewhere than Linux/glibc and once reuse_freed_memory asked malloc to keep memory."""
    if _MALLOC_TUNED:
        return False
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) in (0, 1))
    except (OSError, AttributeError):
        return False


def reuse_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed large blocks for reuse instead of returning them to the OS
    (mallopt: M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to 2 GiB - 1, the largest value mallopt's int
    takes), once per process. Returns whether it did. Called only when asked for: the Settings field
    malloc_tuning (engine.load(...) / the Encoder's tape), or by a caller that owns the process.

    Why: by default every array over 32 MiB is a fresh mmap, and its first touch page-faults (slow
    on virtual machines). The backward pass keeps gigabytes of activations alive and allocates
    arrays of tens of MiB for every step, so it spends a large share of its time in page faults:
    measured on the base model at 8x128, the tape's step went from 6.4 s to 5.3 s, the GELU
    backward from 0.46 s to 0.13 s. TensorFlow's and PyTorch's caching allocators avoid the same
    cost. The price: memory freed by the process is kept for reuse (the resident size stays near
    its peak), for the whole process and every library in it. Elsewhere than Linux/glibc a no-op.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        largest = ctypes.c_int(2 ** 31 - 1)
        ok = libc.mallopt(M_MMAP_THRESHOLD, largest) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, largest) == 1 and ok
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok
