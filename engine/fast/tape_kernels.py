"""Fused element-wise kernels for the backward pass's tape (engine/core/tape.py): layer norm, its
backward, GELU and its backward, with the readable kernels' signatures, run as Numba kernels
(engine/fast/fused.py) on the fast path's threads. What the trainer uses by default:

    from engine.fast import tape_kernels
    tape = enc.tape(inputs, kernels=tape_kernels.for_encoder(enc))

Each falls back to the readable kernel for anything but contiguous float32 NumPy arrays (float64,
CuPy), and for_encoder() returns the readable set when Numba is missing or TALKHEADS_FUSED=0.
Numerics: layer norm and its backward in float64 inside (more accurate than the float32
reference); GELU and its derivative around NumPy's tanh (engine/fast/fused.py). tests/test_backward.py
judges the gradients of a tape with these kernels against TF and float64 as it does the readable
ones.
"""

from __future__ import annotations

import numpy as np

from engine.core import backward as KB
from engine.core import kernels as K
from engine.core.tape import READABLE_KERNELS, TapeKernels
from engine.fast import fused
from engine.fast.forward import num_threads, parallel_rows

_ROWS = 64          # rows per block of the row kernels
_FLAT = 1 << 15     # elements per block of the flat kernels


def _fits(*arrays) -> bool:
    return all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays)


def layer_norm(x, gamma, beta, eps):
    """K.layer_norm. [...,H] -> [...,H]"""
    if not _fits(x, gamma, beta):
        return K.layer_norm(x, gamma, beta, eps)
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    parallel_rows(lambda s, e, w: fused.layer_norm_rows(rows, gamma, beta, float(eps), out, s, e), rows.shape[0], _ROWS)
    return out.reshape(x.shape)


def layer_norm_backward(x, gamma, beta, eps, dy):
    """KB.layer_norm_backward. [...,H] -> ([...,H], [H], [H])"""
    if not _fits(x, gamma, beta, dy):
        return KB.layer_norm_backward(x, gamma, beta, eps, dy)
    H = x.shape[-1]
    rows, drows = np.ascontiguousarray(x).reshape(-1, H), np.ascontiguousarray(dy).reshape(-1, H)
    dx = np.empty_like(rows)
    partial_gamma, partial_beta = np.zeros((num_threads(), H)), np.zeros((num_threads(), H))   # float64
    parallel_rows(lambda s, e, w: fused.layer_norm_backward_rows(rows, gamma, float(eps), drows, dx, partial_gamma[w],
                                                                 partial_beta[w], s, e), rows.shape[0], _ROWS)
    return (dx.reshape(x.shape), partial_gamma.sum(axis=0).astype(np.float32),
            partial_beta.sum(axis=0).astype(np.float32))


def _gelu_blocks(flat, finish):
    """Runs finish(start, stop, tanh(k(x + c x^3)) of the block, out block) over cache-sized blocks
    of the contiguous 1-D `flat`; returns out."""
    out = np.empty_like(flat)
    scratch = np.empty((num_threads(), _FLAT), np.float32)
    k, c = np.float32(K.SQRT_2_OVER_PI), np.float32(K.GELU_TANH_COEFF)

    def block(s, e, w):
        u = scratch[w][:e - s]
        fused.gelu_argument(flat[s:e], u, k, c)
        np.tanh(u, out=u)                    # NumPy's SIMD tanh (see engine/fast/fused.py)
        finish(s, e, u, out[s:e])
    parallel_rows(block, flat.size, _FLAT)
    return out


def gelu_tanh(x):
    """K.gelu_tanh. [...] -> [...]"""
    if not _fits(x):
        return K.gelu_tanh(x)
    flat = np.ascontiguousarray(x).reshape(-1)
    out = _gelu_blocks(flat, lambda s, e, t, o: fused.gelu_finish(flat[s:e], t, o))
    return out.reshape(x.shape)


def gelu_tanh_backward(x, dy):
    """KB.gelu_tanh_backward. [...] -> [...]"""
    if not _fits(x, dy):
        return KB.gelu_tanh_backward(x, dy)
    flat, dflat = np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(dy).reshape(-1)
    k, c = np.float32(K.SQRT_2_OVER_PI), np.float32(K.GELU_TANH_COEFF)
    out = _gelu_blocks(flat, lambda s, e, t, o: fused.gelu_backward_finish(flat[s:e], t, dflat[s:e], o, k, c))
    return out.reshape(x.shape)


FUSED_KERNELS = TapeKernels(layer_norm=layer_norm, gelu_tanh=gelu_tanh, layer_norm_backward=layer_norm_backward,
                            gelu_tanh_backward=gelu_tanh_backward)


def for_encoder(enc) -> TapeKernels:
    """The fused set for a float32 NumPy encoder when Numba runs; the readable set otherwise."""
    if fused.enabled() and enc.xp is np and np.dtype(enc.dtype) == np.float32:
        return FUSED_KERNELS
    return READABLE_KERNELS
