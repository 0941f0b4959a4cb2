"""The fast forward's element-wise stages, on row blocks small enough to stay in cache, spread over
the threads (BLAS is idle at those moments): as the Numba kernels of engine/fast/fused.py when
`use_fused` (float32 with Numba and the Settings' fused on), else as in-place NumPy ufuncs (which
release the GIL) in the readable kernels' order of operations.

    add_layer_norm(a, bias, residual, gamma, beta, eps, out, threads, use_fused)   # LN(a + bias + residual)
    geglu(hg, bi, bg, out, threads, use_fused)                                     # gelu(h + bi) * (g + bg)
    feedforward_activation(hg, bi, bg, out, kind, threads, use_fused)              # the above, or gelu(h + bi)
    masked_softmax_in_place(logits, adder, use_fused)                              # softmax(logits + adder)

`buffer(name, shape)`, when given, hands out reusable scratch arrays of the inputs' dtype
(engine/fast/forward.py's workspace); without it scratch space is allocated per call. Letters as in engine.core.kernels.
"""

from __future__ import annotations

import numpy as np

from engine.core import kernels as K
from engine.fast import fused
from engine.fast.threads import parallel_rows

# rows per block (kept in L2: 16 x 2I floats for the GEGLU); the fused kernels keep no
# temporaries, so any block size works for them: 64 rows balance the threads
GEGLU_BLOCK = 16
LN_BLOCK = 64
FUSED_BLOCK = 64
_NO_ADDER = np.zeros(0, np.float32)   # the fused softmax's adder argument when there is no mask


def add_layer_norm(a, bias, residual, gamma, beta, eps, out, threads, use_fused, buffer=None):
    """out = LN(a + bias + residual) row-wise (a is scratch: overwritten or not). a [T,H], out [T,H]"""
    T, H = a.shape
    if use_fused:
        eps64 = float(eps)
        parallel_rows(lambda s, e, w: fused.add_layer_norm_rows(a, bias, residual, gamma, beta, eps64, out, s, e),
                      T, FUSED_BLOCK, threads)
        return
    one, eps = a.dtype.type(1.0), a.dtype.type(eps)
    tmp = buffer("ln_tmp", (threads, LN_BLOCK, H)) if buffer else np.empty((threads, LN_BLOCK, H), a.dtype)

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
        inv = np.divide(one, var, out=var)
        o = out[s:e]
        np.multiply(x, inv, out=o)
        np.multiply(o, gamma, out=o)
        np.add(o, beta, out=o)

    parallel_rows(run, T, LN_BLOCK, threads)


def geglu(hg, bi, bg, out, threads, use_fused, buffer=None):
    """out = gelu(h + bi) * (g + bg) with [h|g] = hg (hg is scratch: overwritten or not). hg [T,2I],
    out [T,I]"""
    T, I = out.shape
    if use_fused:
        shape = (threads, GEGLU_BLOCK, I)
        scratch = buffer("geglu_tanh", shape) if buffer else np.empty(shape, np.float32)
        k, coeff = np.float32(K.SQRT_2_OVER_PI), np.float32(K.GELU_TANH_COEFF)

        def fused_block(s, e, w):
            u = scratch[w][:e - s]
            fused.geglu_argument_rows(hg, bi, u, s, e, k, coeff)   # k(x + c x^3)
            np.tanh(u, out=u)                                      # NumPy's SIMD tanh (see fused.py)
            fused.geglu_finish_rows(hg, bi, bg, u, out, s, e)
        parallel_rows(fused_block, T, GEGLU_BLOCK, threads)
        return
    t_ = out.dtype.type
    one, coeff, minus_2k = t_(1.0), t_(K.GELU_TANH_COEFF), t_(-2.0 * K.SQRT_2_OVER_PI)

    def run(s, e, w):
        h, g, t = hg[s:e, :I], hg[s:e, I:], out[s:e]
        np.add(h, bi, out=h)
        np.add(g, bg, out=g)
        # 0.5*x*(1 + tanh(z)) = x / (1 + exp(-2z)), z = k*(x + c*x^3): the same function, a few
        # ulps apart; NumPy's float32 exp is ~3x faster than its tanh.
        np.multiply(h, h, out=t)            # x*x
        np.multiply(t, h, out=t)            # x*x*x
        np.multiply(t, coeff, out=t)        # c*x^3
        np.add(h, t, out=t)                 # x + c*x^3
        np.multiply(t, minus_2k, out=t)     # -2z
        with np.errstate(over="ignore"):    # inf for very negative x is intended: x/inf = -0, no NaN
            np.exp(t, out=t)                # exp(-2z)
        np.add(t, one, out=t)               # 1 + exp(-2z)
        np.divide(h, t, out=t)              # gelu(x)
        np.multiply(t, g, out=t)            # gelu * gate

    parallel_rows(run, T, GEGLU_BLOCK, threads)


def feedforward_activation(hg, bi, bg, out, kind, threads, use_fused, buffer=None):
    """The feed-forward's activation: the GEGLU gelu(h + bi) * (g + bg) of [h|g] = hg [T,2I] when
    bg is given, else a dense layer's gelu(h + bi) of hg [T,I]; kind "gelu_tanh" | "gelu_erf"
    (engine.core.kernels.GELUS). hg is scratch. -> out [T,I]"""
    T, I = out.shape
    if bg is not None and kind == "gelu_tanh":
        geglu(hg, bi, bg, out, threads, use_fused, buffer)
    elif bg is not None:        # a gated erf GELU, a combination no checkpoint uses: the readable kernel
        parallel_rows(lambda s, e, w: np.copyto(out[s:e], K.geglu(hg[s:e, :I] + bi, hg[s:e, I:] + bg, kind)),
                      T, GEGLU_BLOCK, threads)
    elif use_fused and kind == "gelu_erf":
        parallel_rows(lambda s, e, w: fused.gelu_erf_rows(hg, bi, out, s, e, K.SQRT_HALF), T, FUSED_BLOCK, threads)
    elif use_fused:
        scratch = buffer("geglu_tanh", (threads, GEGLU_BLOCK, I)) if buffer else \
            np.empty((threads, GEGLU_BLOCK, I), np.float32)
        k, coeff = np.float32(K.SQRT_2_OVER_PI), np.float32(K.GELU_TANH_COEFF)

        def fused_block(s, e, w):
            u = scratch[w][:e - s]
            fused.geglu_argument_rows(hg, bi, u, s, e, k, coeff)   # k(x + c x^3), x = h + bi
            np.tanh(u, out=u)
            fused.gelu_tanh_finish_rows(hg, bi, u, out, s, e)
        parallel_rows(fused_block, T, GEGLU_BLOCK, threads)
    else:
        parallel_rows(lambda s, e, w: np.copyto(out[s:e], K.gelu(hg[s:e] + bi, kind)), T, GEGLU_BLOCK, threads)


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
