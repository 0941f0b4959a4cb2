"""Fused element-wise kernels of the fast path, compiled by Numba (an optional, pinned dependency).

NumPy runs `LN(a + bias + residual)` as ten passes over memory and the GEGLU as eleven; each
kernel here makes one pass (two for layer norm's statistics), vectorized by LLVM, without
temporaries, and releases the GIL so the fast path's thread pool runs row blocks side by side.
Measured on the base model (benchmarks/bench_fused.py): see the README's "CPU floor" section.

    fused.enabled()          # True when Numba imported and TALKHEADS_FUSED is not "0"
    fused.status()           # one line for benchmark records: version, or why the fallback runs

Without Numba (or with TALKHEADS_FUSED=0) engine/fast/forward.py runs its NumPy element-wise code
instead; tests hold the two to each other and both to TensorFlow.

Numerics (float32 only; a float64 fast path uses NumPy):
- layer norm accumulates the mean and the variance in float64 and rounds once at the end: more
  accurate than the two-pass float32 reference, never less.
- tanh in the GELU is the rational approximation TensorFlow itself runs on CPUs (Eigen's
  generic_fast_tanh_float: a degree-13/6 odd rational on [-7.9053, 7.9053], clamped outside,
  measured <= 4.6 ulp from float64 tanh): NumPy's tanh is a library call that LLVM cannot
  vectorize inside a fused loop. The GELU formula and its order are the readable kernel's.
- fastmath is limited to "contract" (FMA) and "reassoc" (vectorized sums): no assumption that
  values are finite, so an inf or NaN propagates as it does in NumPy.
"""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
    _IMPORT_ERROR = None
except Exception as e:   # ImportError, or a Numba built for another NumPy
    numba = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def enabled() -> bool:
    return numba is not None and os.environ.get("TALKHEADS_FUSED", "1") != "0"


def status() -> str:
    if numba is None:
        return f"off: numba not importable ({_IMPORT_ERROR}); NumPy element-wise code runs"
    if not enabled():
        return "off: TALKHEADS_FUSED=0; NumPy element-wise code runs"
    return f"on: numba {numba.__version__} (float32 layer norm and GEGLU fused)"


if numba is not None:
    _FLAGS = dict(nogil=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"})

    @numba.njit(inline="always", **_FLAGS)
    def tanh_f32(x):
        """Eigen's generic_fast_tanh_float, TensorFlow's float32 tanh on CPU. [] -> []"""
        c = np.float32(7.90531110763549805)
        x = min(max(x, -c), c)
        x2 = x * x
        p = np.float32(-2.76076847742355e-16)
        p = p * x2 + np.float32(2.00018790482477e-13)
        p = p * x2 + np.float32(-8.60467152213735e-11)
        p = p * x2 + np.float32(5.12229709037114e-08)
        p = p * x2 + np.float32(1.48572235717979e-05)
        p = p * x2 + np.float32(6.37261928875436e-04)
        p = p * x2 + np.float32(4.89352455891786e-03)
        q = np.float32(1.19825839466702e-06)
        q = q * x2 + np.float32(1.18534705686654e-04)
        q = q * x2 + np.float32(2.26843463243900e-03)
        q = q * x2 + np.float32(4.89352518554385e-03)
        return (p * x) / q

    @numba.njit(**_FLAGS)
    def add_layer_norm_rows(a, bias, residual, gamma, beta, eps, out, start, stop):
        """out[r] = LN(a[r] + bias + residual[r]) for r in [start, stop), the sum, the statistics and
        the normalization in float64 (the sum is recomputed per pass instead of stored in float32),
        rounded once. out may be residual. [T,H] -> [T,H]"""
        H = a.shape[1]
        for r in range(start, stop):
            total = 0.0
            for j in range(H):
                total += np.float64(a[r, j]) + np.float64(bias[j]) + np.float64(residual[r, j])
            mean = total / H
            squares = 0.0
            for j in range(H):
                d = np.float64(a[r, j]) + np.float64(bias[j]) + np.float64(residual[r, j]) - mean
                squares += d * d
            inv = 1.0 / np.sqrt(squares / H + eps)
            for j in range(H):
                d = np.float64(a[r, j]) + np.float64(bias[j]) + np.float64(residual[r, j]) - mean
                out[r, j] = d * inv * np.float64(gamma[j]) + np.float64(beta[j])

    @numba.njit(**_FLAGS)
    def geglu_rows(hg, intermediate_bias, gate_bias, out, start, stop):
        """out[r] = gelu(h[r] + bi) * (g[r] + bg) with [h|g] = hg[r], for r in [start, stop).
        gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). [T,2I] -> [T,I]"""
        I = out.shape[1]
        half, one = np.float32(0.5), np.float32(1.0)
        k, c = np.float32(0.7978845608028654), np.float32(0.044715)
        for r in range(start, stop):
            for j in range(I):
                x = hg[r, j] + intermediate_bias[j]
                g = hg[r, I + j] + gate_bias[j]
                gelu = half * x * (one + tanh_f32(k * (x + c * (x * x * x))))
                out[r, j] = gelu * g

    @numba.njit(**_FLAGS)
    def tanh_array(x, out):
        """out = tanh_f32(x), element-wise over 1-D arrays (for tests and benchmarks). [n] -> [n]"""
        for i in range(x.shape[0]):
            out[i] = tanh_f32(x[i])
