"""The kernels: one small pure function per operation of the model, NumPy or CuPy alike.

Dimension letters, used on every line:
    B batch   S sequence (query positions)   T sequence (key positions, = S here)
    H hidden  N heads   D head size (H = N*D)   I intermediate (GEGLU width)
    V vocab   P masked positions per sequence   L layers

Each function takes arrays of one backend and returns arrays of the same backend and float dtype
(float32 or float64; the constants are cast to the input's dtype so float32 stays float32). The
array module is taken from the arguments, so the same code runs on NumPy and on CuPy.

These are the readable reference. They follow Model Garden's order of operations (which is what
makes float32 results agree with TensorFlow to a few ulps). engine/core/tape.py composes them into
the model (the block, the MLM head), once; engine/core/backward.py holds each one's backward.
`engine.fast` and `engine.gpu` hold faster variants that the tests keep equal to these.
"""

from __future__ import annotations

import math

from engine.core.backend import array_module

GELU_TANH_COEFF = 0.044715
SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2/pi), the constant in tf.nn.gelu(approximate=True)
SQRT_HALF = 0.7071067811865476       # 1/sqrt(2)
TWO_OVER_SQRT_PI = 1.1283791670955126
ERF_SERIES_BELOW = 1.5    # |x| below: erf by its series; at or above: erfc by its continued fraction
ERF_SERIES_TERMS = 30     # enough below 1.5 for float64 precision (tests/test_kernels.py measures it)
ERFC_FRACTION_DEPTH = 100 # enough at and above 1.5


# ---------------------------------------------------------------------------- elementwise & norms

def gelu_tanh(x):
    """GELU, tanh form (what the Hub model uses): 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))). [...] -> [...]"""
    xp = array_module(x)
    c = x.dtype.type(GELU_TANH_COEFF)
    k = x.dtype.type(SQRT_2_OVER_PI)
    half, one = x.dtype.type(0.5), x.dtype.type(1.0)
    return half * x * (one + xp.tanh(k * (x + c * (x * x * x))))


def _erf_series(a):
    """erf(a) for 0 <= a < 1.5 by the series of all-positive terms (Abramowitz & Stegun 7.1.6):
        erf(a) = 2/sqrt(pi) e^(-a^2) sum_n 2^n a^(2n+1) / (1*3*...*(2n+1)).     float64 [M] -> [M]"""
    xp = array_module(a)
    two_a2 = 2.0 * a * a
    term, total = a.copy(), a.copy()
    for n in range(1, ERF_SERIES_TERMS):
        term *= two_a2
        term *= 1.0 / (2 * n + 1)
        total += term
    return TWO_OVER_SQRT_PI * xp.exp(-0.5 * two_a2) * total


def _erfc_fraction(a):
    """erfc(a) for a >= 1.5 by its continued fraction (A&S 7.1.14), evaluated from the tail:
        erfc(a) = e^(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...))))).   float64 [M] -> [M]"""
    xp = array_module(a)
    fraction = a.copy()
    for k in range(ERFC_FRACTION_DEPTH, 0, -1):
        fraction = a + (0.5 * k) / fraction
    return xp.exp(-a * a) / (math.sqrt(math.pi) * fraction)


def _erf_and_erfc_of_abs(x):
    """(|x| as float64, erf(|x|), erfc(|x|)): each side computed where it has no cancellation, the
    other as 1 minus it; erf to ~1e-15 absolute, erfc to ~1e-14 relative (NumPy has no erf, and the
    core needs no SciPy). [...] -> float64 [...] x3"""
    xp = array_module(x)
    a = xp.abs(xp.asarray(x, dtype=xp.float64))
    erf_a, erfc_a = xp.empty_like(a), xp.empty_like(a)
    near = a < ERF_SERIES_BELOW
    erf_a[near] = _erf_series(a[near])
    erfc_a[~near] = _erfc_fraction(a[~near])
    erfc_a[near] = 1.0 - erf_a[near]
    erf_a[~near] = 1.0 - erfc_a[~near]
    return a, erf_a, erfc_a


def erf(x):
    """The error function, in float64 whatever x's dtype. [...] -> float64 [...]"""
    xp = array_module(x)
    _, erf_a, _ = _erf_and_erfc_of_abs(x)
    return xp.copysign(erf_a, xp.asarray(x, dtype=xp.float64))


def erfc(x):
    """1 - erf(x) without the cancellation: accurate in relative terms where it is tiny (x >> 0).
    float64 whatever x's dtype. [...] -> float64 [...]"""
    xp = array_module(x)
    _, _, erfc_a = _erf_and_erfc_of_abs(x)
    return xp.where(xp.asarray(x) < 0, 2.0 - erfc_a, erfc_a)


def gelu_erf(x):
    """GELU, exact form (BERT's original, Hugging Face's "gelu"): 0.5x(1+erf(x/sqrt(2))), written
    0.5x erfc(-x/sqrt(2)) so that negative x keeps its relative precision; computed in float64 and
    rounded once to x's dtype (float32 results within about half an ulp). [...] -> [...]"""
    x64 = x.astype("float64")
    return (0.5 * x64 * erfc(-x64 * SQRT_HALF)).astype(x.dtype)


GELUS = {"gelu_tanh": gelu_tanh, "gelu_erf": gelu_erf}


def gelu(x, kind="gelu_tanh"):
    """The GELU a config names (ModelConfig.hidden_activation): gelu_tanh or gelu_erf. [...] -> [...]"""
    return GELUS[kind](x)


def geglu(x, gate, kind="gelu_tanh"):
    """The gated GELU of the feed-forward block: gelu(x) * gate (x and gate: the two input
    products, biased). [...], [...] -> [...]"""
    return gelu(x, kind) * gate


def layer_norm(x, gamma, beta, eps):
    """Layer norm over the last axis: (x-mean)/sqrt(biased var + eps)*gamma + beta. [...,H] -> [...,H]

    Two passes (mean, then mean of squared deviations), as tf.nn.moments does.
    """
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)                            # [...,1]
    centered = x - mean                                              # [...,H]
    var = (centered * centered).mean(axis=-1, keepdims=True)         # [...,1]
    inv = x.dtype.type(1.0) / xp.sqrt(var + x.dtype.type(eps))       # [...,1]
    return centered * inv * gamma + beta


def dense(x, kernel, bias):
    """x·W + b over the last axis of x. [...,C] @ [C,F] + [F] -> [...,F]"""
    y = matmul_2d(x, kernel)
    y += bias                                                        # in place: one pass less over [...,F]
    return y


def matmul_2d(x, kernel):
    """x @ W with x's leading axes flattened into one: a single GEMM. [...,C] @ [C,F] -> [...,F]

    NumPy runs a 3-D array times a matrix as one GEMM per leading index (measured 20-40% slower
    at 8x128 and 32x128); TensorFlow's Dense flattens the same way."""
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def dropout(x, keep, rate):
    """Inverted dropout with a given mask, as Keras' Dropout in training: x * keep / (1 - rate).
    keep: 0/1 of x's shape (drawn by the caller from a seed, so the backward pass reuses it).
    [...] -> [...]"""
    if keep is None or rate == 0.0:
        return x
    return x * (keep * x.dtype.type(1.0 / (1.0 - rate)))


# ---------------------------------------------------------------------------- embeddings

def embed(word_ids, type_ids, word_table, position_table, type_table):
    """word[ids] + position[:S] + type[type_ids], added in Model Garden's order. [B,S] -> [B,S,H]"""
    S = word_ids.shape[1]
    return (word_table[word_ids] + position_table[:S]) + type_table[type_ids]


# ---------------------------------------------------------------------------- attention

def qkv_projection(x, kernel, bias):
    """One of the query/key/value projections. [B,S,H] @ [H,N,D] + [N,D] -> [B,S,N,D]"""
    H, N, D = kernel.shape
    y = dense(x, kernel.reshape(H, N * D), bias.reshape(N * D))     # [B,S,N*D]
    return y.reshape(x.shape[0], x.shape[1], N, D)


def raw_attention_scores(q, k):
    """Dot products q·k over D, before any scale. [B,S,N,D], [B,T,N,D] -> [B,N,S,T]"""
    return q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1)       # [B,N,S,D] @ [B,N,D,T] -> [B,N,S,T]


def scale_scores(raw, head_size):
    """The 1/sqrt(D) scale, applied after q·k as TalkingHeadsAttention does. [B,N,S,T] -> [B,N,S,T]"""
    return raw * raw.dtype.type(1.0 / math.sqrt(float(head_size)))


def talking_heads_mix(x, weight):
    """Mixes the heads: out[b,m,s,t] = sum_n x[b,n,s,t] * weight[n,m]. [B,N,S,T] x [N,N] -> [B,N,S,T]

    Applied twice per block: to the logits before the softmax (W_pre) and to the probabilities after
    it (W_post). Axis 0 of the weight is the input head.
    """
    B, N, S, T = x.shape
    # per batch row, W^T @ x[b] with x[b] viewed as [N, S*T]: one GEMM each, contiguous in and out
    # (a transposed layout would make the batched products that follow fall off BLAS)
    mixed = weight.T @ x.reshape(B, N, S * T)                       # [N,N] @ [B,N,S*T] -> [B,N,S*T]
    return mixed.reshape(B, N, S, T)


def attention_mask_adder(input_mask, dtype, constant=-1e9):
    """TF's additive mask: (1 - mask) * constant, in the compute dtype. [B,T] -> [B,1,1,T]

    With constant -1e9 in float32, a row whose keys are all padding gets logits of exactly -1e9
    everywhere (s + -1e9 rounds to -1e9), so its softmax is uniform, never NaN.
    """
    xp = array_module(input_mask)
    mask = input_mask.astype(dtype)
    adder = (xp.asarray(1.0, dtype) - mask) * xp.asarray(constant, dtype)
    return adder[:, None, None, :]


def apply_attention_mask(scores, mask_adder):
    """Adds the mask adder; in float64 the masked logits are then rounded to float32, as the model
    computes them. [B,N,S,T] + [B,1,1,T] -> [B,N,S,T]

    The Hub model adds -1e9 in float32, where s + -1e9 is exactly -1e9 for |s| < 32: a row whose keys
    are all padding attends uniformly. Kept in float64, s - 1e9 would keep the logits' differences and
    such a row would differ from the model by O(1). Rounding the masked entries to float32 makes the
    float64 path compute the model's function there too; on every other row the masked entries weigh
    exp(-1e9) = 0 in either precision, so nothing else changes.
    """
    masked = scores + mask_adder
    if masked.dtype.itemsize > 4:
        xp = array_module(masked)
        masked = xp.where(mask_adder != 0, masked.astype(xp.float32).astype(masked.dtype), masked)
    return masked


def softmax(x):
    """Softmax over the last axis, max-subtracted. [...,T] -> [...,T]"""
    xp = array_module(x)
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def masked_softmax(scores, mask_adder):
    """Softmax of scores plus the additive mask. [B,N,S,T] + [B,1,1,T] -> [B,N,S,T]"""
    return softmax(apply_attention_mask(scores, mask_adder))


def attention_context(probs, v):
    """Weighted sum of values. [B,N,S,T] @ [B,T,N,D] -> [B,S,N,D]"""
    ctx = probs @ v.transpose(0, 2, 1, 3)                            # [B,N,S,T] @ [B,N,T,D] -> [B,N,S,D]
    return ctx.transpose(0, 2, 1, 3)


def attention_output(ctx, kernel, bias):
    """Projects the heads back to the hidden width. [B,S,N,D] @ [N,D,H] + [H] -> [B,S,H]"""
    B, S, N, D = ctx.shape
    return dense(ctx.reshape(B, S, N * D), kernel.reshape(N * D, -1), bias)


# ---------------------------------------------------------------------------- heads

def pooler(sequence_output, kernel, bias):
    """tanh(x[:,0]·Wp + bp), the [CLS] vector. [B,S,H] -> [B,H]"""
    xp = array_module(sequence_output)
    return xp.tanh(dense(sequence_output[:, 0], kernel, bias))


def gather_positions(sequence_output, positions):
    """The vectors at the masked positions of each sequence. [B,S,H], [B,P] -> [B,P,H]"""
    xp = array_module(sequence_output)
    batch = xp.arange(sequence_output.shape[0])[:, None]             # [B,1]
    return sequence_output[batch, positions]
