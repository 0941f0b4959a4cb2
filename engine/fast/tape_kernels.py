"""The tape's fast kernel set (engine/core/tape.py's TapeKernels), with the readable kernels'
signatures: layer norm, the gated GELU and their backward as Numba kernels (engine/fast/fused.py)
on the fast path's threads, and attention (scores to context, and its backward) one sequence at a
time on those threads. What the trainer uses by default:

    from engine.fast import tape_kernels
    tape = enc.tape(inputs, kernels=tape_kernels.for_encoder(enc))

Each falls back to the readable kernel for anything but float32 NumPy arrays (float64, CuPy), the
attention backward also when the caller records the intermediates' gradients, and for_encoder()
returns the readable set when Numba is missing or the encoder's Settings have fused off. Threads:
engine.fast.threads.default_threads() (the Settings' default thread count, read once).
Numerics: layer norm and its backward in float64 inside (more accurate than the float32
reference); the GEGLU and its backward around NumPy's tanh (engine/fast/fused.py; one tanh per
element: the backward recomputes gelu(x) from the tanh its derivative needs anyway); attention
with the readable kernels' operations in their order (the same forward bits; the mixing weights'
gradients summed per thread). tests/test_backward.py judges the gradients of a tape with this set
against TF and float64 as it does the readable ones.
"""
from __future__ import annotations

import math

import numpy as np

from engine.core import backward as KB
from engine.core import kernels as K
from engine.core import tape as tape_mod
from engine.core.tape import READABLE_KERNELS, TapeKernels
from engine.fast import fused
from engine.fast.elementwise import masked_softmax_in_place
from engine.fast.threads import current_threads, default_threads, parallel_rows, single_threaded_blas

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
    partial_gamma, partial_beta = np.zeros((default_threads(), H)), np.zeros((default_threads(), H))   # float64
    parallel_rows(lambda s, e, w: fused.layer_norm_backward_rows(rows, gamma, float(eps), drows, dx, partial_gamma[w],
                                                                 partial_beta[w], s, e), rows.shape[0], _ROWS)
    return (dx.reshape(x.shape), partial_gamma.sum(axis=0).astype(np.float32),
            partial_beta.sum(axis=0).astype(np.float32))


def _gelu_blocks(flat, finish):
    """Runs finish(start, stop, t, k, c) with t = tanh(k(x + c x^3)) of the block (k, c float32, from
    engine.core.kernels at each call), over cache-sized blocks of the contiguous 1-D `flat`, on the
    threads."""
    scratch = np.empty((default_threads(), _FLAT), np.float32)
    k, c = np.float32(K.SQRT_2_OVER_PI), np.float32(K.GELU_TANH_COEFF)

    def block(s, e, w):
        u = scratch[w][:e - s]
        fused.gelu_argument(flat[s:e], u, k, c)
        np.tanh(u, out=u)                    # NumPy's SIMD tanh (see engine/fast/fused.py)
        finish(s, e, u, k, c)
    parallel_rows(block, flat.size, _FLAT)


def _flat(a):
    return np.ascontiguousarray(a).reshape(-1)


def geglu(x, gate, kind="gelu_tanh"):
    """K.geglu: gelu(x) * gate in one pass (the tanh GELU; the readable kernel for another). [...], [...] -> [...]"""
    if kind != "gelu_tanh" or not _fits(x, gate) or x.shape != gate.shape:
        return K.geglu(x, gate, kind)
    flat, gflat = _flat(x), _flat(gate)
    out = np.empty_like(flat)
    _gelu_blocks(flat, lambda s, e, t, k, c: fused.geglu_finish(flat[s:e], gflat[s:e], t, out[s:e]))
    return out.reshape(x.shape)


def geglu_backward(x, gate, dy, kind="gelu_tanh"):
    """KB.geglu_backward: (dx, dgate) in one pass, gelu(x) recomputed from the same tanh as its
    derivative. [...] -> ([...], [...])"""
    if kind != "gelu_tanh" or not _fits(x, gate, dy) or not x.shape == gate.shape == dy.shape:
        return KB.geglu_backward(x, gate, dy, kind)
    flat, gflat, dflat = _flat(x), _flat(gate), _flat(dy)
    dx, dgate = np.empty_like(flat), np.empty_like(flat)
    _gelu_blocks(flat, lambda s, e, t, k, c: fused.geglu_backward_finish(flat[s:e], gflat[s:e], t, dflat[s:e],
                                                                   dx[s:e], dgate[s:e], k, c))
    return dx.reshape(x.shape), dgate.reshape(x.shape)


def _attention_fits(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder, keep_probs):
    return (_fits(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder)
            and (keep_probs is None or _fits(keep_probs)) and mask_adder.ndim == 4)


def _attention_sizes(q, k, keep_probs, rate):
    """(B, S, N, D, T, the score scale 1/sqrt(D), the dropout scale 1/(1 - rate) or None), float32
    scales as the readable kernels compute them."""
    B, S, N, D = q.shape
    keep_scale = np.float32(1.0 / (1.0 - rate)) if keep_probs is not None else None
    return B, S, N, D, k.shape[1], np.float32(1.0 / math.sqrt(float(D))), keep_scale


def attention(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder, keep_probs, rate, record=None):
    """engine.core.tape.attention one sequence at a time on the fast path's threads (BLAS at one
    thread meanwhile), so that each sequence's [N,S,T] logits stay in cache from the scores to the
    context; the readable kernels' operations in their order. Float32 NumPy only, and nothing
    recorded (else the readable kernel). -> (ctx [B,S,N,D], probs [B,N,S,T], dropped_probs [B,N,S,T])"""
    if record is not None or not _attention_fits(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder,
                                                  keep_probs):
        return tape_mod.attention(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder, keep_probs, rate,
                                  record)
    B, S, N, D, T, scale, keep_scale = _attention_sizes(q, k, keep_probs, rate)
    f32 = np.float32
    pre_t, post_t = pre_softmax_weight.T, post_softmax_weight.T                   # [N,N] (F order)
    ctx, probs, dropped = np.empty((B, S, N, D), f32), np.empty((B, N, S, T), f32), np.empty((B, N, S, T), f32)
    scratch = np.empty((default_threads(), N, S, T), f32)

    def sequences(lo, hi, w):
        scores = scratch[w]
        for b in range(lo, hi):
            np.matmul(q[b].transpose(1, 0, 2), k[b].transpose(1, 2, 0), out=scores)   # [N,S,D] @ [N,D,T] -> [N,S,T]
            np.multiply(scores, scale, out=scores)
            p = probs[b]
            np.matmul(pre_t, scores.reshape(N, S * T), out=p.reshape(N, S * T))     # pre-softmax mix
            masked_softmax_in_place(p, mask_adder[b, 0, 0], use_fused=False)        # the readable order
            m = dropped[b]
            np.matmul(post_t, p.reshape(N, S * T), out=m.reshape(N, S * T))         # post-softmax mix
            if keep_probs is not None:
                np.multiply(keep_probs[b], keep_scale, out=scores)
                np.multiply(m, scores, out=m)
            np.matmul(m, v[b].transpose(1, 0, 2), out=ctx[b].transpose(1, 0, 2))    # [N,S,T] @ [N,T,D] -> [N,S,D]

    with single_threaded_blas():
        parallel_rows(sequences, B, 1)
    return ctx, probs, dropped


def attention_backward(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder, keep_probs, rate,
                       probs, dropped_probs, dctx, record=None):
    """engine.core.tape.attention_backward one sequence at a time on the fast path's threads, the
    mixing weights' gradients summed per thread, then over the threads. The readable kernel when
    `record` asks for the intermediates' gradients, or for anything but float32 NumPy.
    -> (dq, dk, dv [B,S,N,D], dpre_softmax_weight, dpost_softmax_weight [N,N])"""
    if record is not None or not _attention_fits(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder,
                                                  keep_probs) or not _fits(dctx):
        return tape_mod.attention_backward(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder, keep_probs,
                                           rate, probs, dropped_probs, dctx, record)
    B, S, N, D, T, scale, keep_scale = _attention_sizes(q, k, keep_probs, rate)
    f32 = np.float32
    dq, dk, dv = np.empty((B, S, N, D), f32), np.empty((B, T, N, D), f32), np.empty((B, T, N, D), f32)
    threads = current_threads()
    dpre, dpost = np.zeros((threads, N, N), f32), np.zeros((threads, N, N), f32)
    scratch = np.empty((threads, 3, N, S, T), f32)

    def sequences(lo, hi, w):
        scores, d_mixed, d_probs = scratch[w]
        rows = lambda a: a.reshape(N, S * T)  # noqa: E731  [N,S,T] -> [N,S*T] view
        for b in range(lo, hi):
            qb, kb, vb = q[b].transpose(1, 0, 2), k[b].transpose(1, 0, 2), v[b].transpose(1, 0, 2)   # [N,S|T,D]
            dctx_b = dctx[b].transpose(1, 0, 2)                                      # [N,S,D]
            np.matmul(dctx_b, vb.transpose(0, 2, 1), out=d_mixed)                   # d dropped [N,S,T]
            np.matmul(dropped_probs[b].transpose(0, 2, 1), dctx_b, out=dv[b].transpose(1, 0, 2))   # [N,T,D]
            if keep_probs is not None:
                np.multiply(keep_probs[b], keep_scale, out=scores)
                np.multiply(d_mixed, scores, out=d_mixed)                            # d mixed_probs
            p = probs[b]
            dpost[w] += rows(p) @ rows(d_mixed).T                                    # [N,S*T] @ [S*T,N] -> [N,N]
            np.matmul(post_softmax_weight, rows(d_mixed), out=rows(d_probs))        # d probs
            np.multiply(p, d_probs, out=d_mixed)                                     # softmax backward
            np.subtract(d_probs, d_mixed.sum(axis=-1, keepdims=True), out=d_probs)
            np.multiply(p, d_probs, out=d_probs)                                     # d masked = d mixed
            np.matmul(qb, kb.transpose(0, 2, 1), out=scores)                         # scores, recomputed
            np.multiply(scores, scale, out=scores)
            dpre[w] += rows(scores) @ rows(d_probs).T
            np.matmul(pre_softmax_weight, rows(d_probs), out=rows(d_mixed))         # d scaled scores
            np.multiply(d_mixed, scale, out=d_mixed)                                 # d raw scores
            np.matmul(d_mixed, kb, out=dq[b].transpose(1, 0, 2))                     # [N,S,T] @ [N,T,D] -> [N,S,D]
            np.matmul(d_mixed.transpose(0, 2, 1), qb, out=dk[b].transpose(1, 0, 2))  # [N,T,S] @ [N,S,D] -> [N,T,D]

    with single_threaded_blas():
        parallel_rows(sequences, B, 1)
    return dq, dk, dv, dpre.sum(axis=0), dpost.sum(axis=0)


FUSED_KERNELS = TapeKernels(layer_norm=layer_norm, geglu=geglu, layer_norm_backward=layer_norm_backward,
                            geglu_backward=geglu_backward, attention=attention, attention_backward=attention_backward)


def for_encoder(enc) -> TapeKernels:
    """The fused set for a float32 NumPy encoder when Numba runs and its Settings (enc.settings,
    when it has them) have fused on; the readable set otherwise."""
    settings = getattr(enc, "settings", None)
    wanted = settings is None or settings.fused
    if wanted and fused.enabled() and enc.xp is np and np.dtype(enc.dtype) == np.float32:
        return FUSED_KERNELS
    return READABLE_KERNELS
