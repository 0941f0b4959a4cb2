"""The engine's settings: one frozen object, resolved once when a model is loaded.

    settings = Settings.resolve(threads=2, fused=None)   # None: the environment's default, else the built-in one
    enc = engine.load("model.h5", fast=True, threads=2)  # engine.load resolves them; kept as enc.settings

The paths read their switches from the Settings they were built with (engine/fast/forward.py's
FastEncoder keeps it as .settings, engine/gpu/forward.py's GpuForward takes its fields), never from
the environment during a call: changing the environment after a load changes nothing for that
model. A bad value fails at load with one line naming the setting and where the value came from.

    field          values                                   default      environment default
    backend        "numpy" | "cupy"                         "numpy"      TALKHEADS_BACKEND
    threads        whole number >= 1                        CPUs usable  TALKHEADS_THREADS
    adapt_threads  True | False                             True         -
    fused          True | False                             True         -
    packed         True | False                             True         -
    blas           "pool" | "native"                        "pool"       -
    gpu_path       "fused" | "plain"                        "fused"      -
    precision      "float32" | "tf32" | "float16" |         "float32"    -
                   "bfloat16"
    cuda_graphs    True | False                             False        -
    malloc_tuning  True | False                             False        -

- threads: the fast CPU path's thread pool (products split over it, attention per sequence, the
  element-wise row blocks); "CPUs usable" is this process's CPU affinity count.
- adapt_threads: each fast call and each training step runs on one thread per 5 GFLOP of its
  dense products (engine.fast.threads.threads_for_work), at most `threads`: a small model's call
  gains less from a second thread than its joins cost, most of all on a busy machine; False:
  always `threads`.
- fused: engine/fast/fused.py's Numba kernels run the fast path's element-wise stages and the
  tape's layer norms, GEGLU and attention (float32, when Numba imports; else NumPy code runs).
- packed: engine/fast/gemm.py's packed-weight products run the fast path's four dense products
  (float32, when Numba imports; else np.matmul).
- blas "pool": during a fast call OpenBLAS runs at one thread and the path splits the work over
  its own pool (OpenBLAS's threads busy-wait, which collapses on a shared CPU); the previous
  OpenBLAS thread count is restored after each call. "native": OpenBLAS's own threads.
- gpu_path, precision, cuda_graphs: the cupy backend's fused path (engine/gpu/forward.py).
- malloc_tuning: engine.core.backend.reuse_freed_memory before a tape (glibc keeps freed blocks
  for reuse: fewer page faults in the backward pass, a resident size near its peak). Opt-in: it
  changes the whole process's allocator.

The environment variables the project reads, all of them (each only as a default):

    variable                read by                                   what
    TALKHEADS_BACKEND       Settings.resolve (engine.load, the CLI)   the backend when none is given
    TALKHEADS_THREADS       Settings.resolve, and                     the thread count when none is given
                            engine.fast.threads.default_threads
    TALKHEADS_CACHE         engine/tools/cache.py (the tests,         the folder of built reference models
                            benchmarks and extract commands)          and extractions; default
                                                                      ~/.cache/talkheads-ggelu-engine
    TALKHEADS_TEST_REPORTS  tests/isolated.py                         internal: set by the test process for
                                                                      a base-size test's own process
    TALKHEADS_EXHAUSTIVE    tests/conftest.py                         1: the test suite also runs the
                                                                      base-size variants marked exhaustive
"""

from __future__ import annotations

import dataclasses
import operator
import os

BACKENDS = ("numpy", "cupy")
BLAS_MODES = ("pool", "native")
GPU_PATHS = ("fused", "plain")
PRECISIONS = ("float32", "tf32", "float16", "bfloat16")
ENVIRONMENT = {"backend": "TALKHEADS_BACKEND", "threads": "TALKHEADS_THREADS"}


class SettingError(ValueError):
    """A setting's value is not one it takes (the message names the setting and its source)."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # pragma: no cover  (no sched_getaffinity: macOS, Windows)
        return max(1, os.cpu_count() or 1)


def _choice(choices):
    def check(value, where):
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise SettingError(f"{where} = {value!r}: choose one of {', '.join(choices)}")
        return text
    return check


def _flag(value, where):
    if not isinstance(value, bool):
        raise SettingError(f"{where} = {value!r}: True or False")
    return value


def _count(value, where):
    """A whole number >= 1: an int (NumPy's too) or its digits as text, not a bool."""
    try:
        number = int(value.strip()) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        number = None
    if isinstance(value, bool) or number is None or number < 1:
        raise SettingError(f"{where} = {value!r}: a whole number >= 1")
    return number


_CHECKS = {"backend": _choice(BACKENDS), "threads": _count, "adapt_threads": _flag, "fused": _flag, "packed": _flag,
           "blas": _choice(BLAS_MODES), "gpu_path": _choice(GPU_PATHS), "precision": _choice(PRECISIONS),
           "cuda_graphs": _flag, "malloc_tuning": _flag}
_BUILT_IN = {"backend": "numpy", "threads": usable_cpus, "adapt_threads": True, "fused": True, "packed": True,
             "blas": "pool",
             "gpu_path": "fused", "precision": "float32", "cuda_graphs": False, "malloc_tuning": False}


def check_setting(name: str, value):
    """A given value of one setting, checked (and normalized: "TF32" -> "tf32")."""
    if name not in _CHECKS:
        raise TypeError(f"unknown setting {name!r}: the settings are {', '.join(_CHECKS)}")
    return _CHECKS[name](value, f"setting {name}")


def resolve_setting(name: str, value=None):
    """One setting's value: `value` checked, or when None the environment's default (for the fields
    that have one), else the built-in default."""
    if value is not None or name not in _CHECKS:
        return check_setting(name, value)
    variable = ENVIRONMENT.get(name)
    if variable and os.environ.get(variable, "").strip():
        return _CHECKS[name](os.environ[variable], f"setting {name} (from ${variable})")
    default = _BUILT_IN[name]
    return default() if callable(default) else default


@dataclasses.dataclass(frozen=True)
class Settings:
    """The engine's settings (the module docstring's table). Settings.resolve() takes the
    environment's defaults; Settings(...) the built-in ones. Every field is checked either way."""

    backend: str = "numpy"
    threads: int = dataclasses.field(default_factory=usable_cpus)
    adapt_threads: bool = True
    fused: bool = True
    packed: bool = True
    blas: str = "pool"
    gpu_path: str = "fused"
    precision: str = "float32"
    cuda_graphs: bool = False
    malloc_tuning: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))

    @classmethod
    def resolve(cls, **given) -> Settings:
        """Settings from keyword values; a value left out or None takes its environment default,
        else its built-in one. Fails with one line naming a bad setting."""
        names = [f.name for f in dataclasses.fields(cls)]
        for name in given:
            if name not in names:
                raise TypeError(f"unknown setting {name!r}: the settings are {', '.join(names)}")
        return cls(**{name: resolve_setting(name, given.get(name)) for name in names})

