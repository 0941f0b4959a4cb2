"""Fused element-wise kernels of the fast path, compiled by Numba (an optional, pinned dependency).

NumPy runs `LN(a + bias + residual)` as ten passes over memory and the GEGLU as eleven; each
kernel here makes one pass (two for layer norm's statistics), vectorized by LLVM, without
temporaries, and releases the GIL so the fast path's thread pool runs row blocks side by side.
Measured on the base model: benchmarks/bench_fused.py, benchmarks/results/fused.md.

    fused.enabled()          # True when Numba imports (the kernels can run)
    fused.status()           # one line for benchmark records: version, or why the fallback runs

Whether they run is the Settings field `fused` (engine.core.settings; engine.load(..., fused=False)).
Without Numba, or with fused=False, engine/fast/forward.py runs its NumPy element-wise code
instead; tests hold the two to each other and both to TensorFlow. (The optimizer's fused AdamW step
is engine/fast/adamw.py.)

Numerics (float32 only; a float64 fast path uses NumPy):
- layer norm accumulates the mean and the variance in float64 and rounds once at the end: more
  accurate than the two-pass float32 reference, never less.
- the GELU runs in three passes over a cache-sized block: its argument (Numba), NumPy's tanh in
  place (SIMD, about 1 ulp), and the rest (Numba). A tanh inside the fused loop would have to be an
  approximation LLVM can vectorize: Eigen's old rational (4.5 ulp measured) made the GEGLU's
  weight gradients 13x less accurate than TensorFlow's on trained-like weights, so it is not used.
  The formula and its order are the readable kernel's.
- the GELU's constants come from engine.core.kernels at each call, so every path computes the
  same formula (a changed constant there reaches the fused kernels too).
- the attention softmax runs as two Numba passes around NumPy's exp: mask and max-subtract, then
  normalize with the row sum accumulated in float64 (the fast forward only; the tape's attention
  stays bit-identical to the readable kernels).
- fastmath is limited to "contract" (FMA) and "reassoc" (vectorized sums): no assumption that
  values are finite, so an inf or NaN propagates as it does in NumPy.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
    _IMPORT_ERROR = None
except Exception as e:   # ImportError, or a Numba built for another NumPy
    numba = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def enabled() -> bool:
    """Numba imports: the kernels here can run (the Settings field `fused` says whether they do)."""
    return numba is not None


def status() -> str:
    if numba is None:
        return f"off: numba not importable ({_IMPORT_ERROR}); NumPy element-wise code runs"
    return f"available: numba {numba.__version__} (float32 layer norm, GEGLU, GELU, softmax, AdamW fused)"


if numba is not None:
    _FLAGS = dict(nogil=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"})

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


    # ---- the fast forward's softmax in two passes around NumPy's exp (SIMD, about 1 ulp) on one
    # sequence's [N*S,T] logits, where NumPy takes six (add mask, max, subtract, exp, sum, divide)

    @numba.njit(**_FLAGS)
    def softmax_shift_rows(x, adder, add_mask):
        """x[r] <- x[r] + adder - max(x[r] + adder), in place, the adder [T] added only if add_mask
        (the order of engine.core.kernels.masked_softmax). [R,T] -> [R,T]"""
        R, T = x.shape
        for r in range(R):
            if add_mask:
                for t in range(T):
                    x[r, t] += adder[t]
            top = x[r, 0]
            for t in range(1, T):
                top = max(top, x[r, t])
            for t in range(T):
                x[r, t] -= top

    @numba.njit(**_FLAGS)
    def softmax_normalize_rows(e):
        """e[r] <- e[r] / sum(e[r]), in place, the sum accumulated in float64 and rounded once (NumPy
        sums in float32 pairwise: this is as accurate or more). [R,T] -> [R,T]"""
        R, T = e.shape
        for r in range(R):
            total = 0.0
            for t in range(T):
                total += np.float64(e[r, t])
            total32 = np.float32(total)
            for t in range(T):
                e[r, t] = e[r, t] / total32

    # ---- the tape's element-wise stages (engine/fast/tape_kernels.py): forward and backward

    @numba.njit(inline="always", **_FLAGS)
    def _row_mean_inv(x, r, eps):
        """(mean, 1/sqrt(var + eps)) of row r of x, two passes in float64."""
        H = x.shape[1]
        total = 0.0
        for j in range(H):
            total += np.float64(x[r, j])
        mean = total / H
        squares = 0.0
        for j in range(H):
            d = np.float64(x[r, j]) - mean
            squares += d * d
        return mean, 1.0 / np.sqrt(squares / H + eps)

    @numba.njit(**_FLAGS)
    def layer_norm_rows(x, gamma, beta, eps, out, start, stop):
        """out[r] = LN(x[r]) for r in [start, stop), statistics in float64. [T,H] -> [T,H]"""
        H = x.shape[1]
        for r in range(start, stop):
            mean, inv = _row_mean_inv(x, r, eps)
            for j in range(H):
                out[r, j] = (np.float64(x[r, j]) - mean) * inv * np.float64(gamma[j]) + np.float64(beta[j])

    @numba.njit(**_FLAGS)
    def layer_norm_backward_rows(x, gamma, eps, dy, dx, dgamma, dbeta, start, stop):
        """engine.core.backward.layer_norm_backward for rows [start, stop), in float64: dx[r], and
        this thread's partial sums dgamma += dy*xhat, dbeta += dy ([H] float64). [T,H] -> [T,H]"""
        H = x.shape[1]
        for r in range(start, stop):
            mean, inv = _row_mean_inv(x, r, eps)
            sum_g = 0.0
            sum_gx = 0.0
            for j in range(H):
                xhat = (np.float64(x[r, j]) - mean) * inv
                d = np.float64(dy[r, j])
                g = d * np.float64(gamma[j])
                sum_g += g
                sum_gx += g * xhat
                dgamma[j] += d * xhat
                dbeta[j] += d
            mean_g = sum_g / H
            mean_gx = sum_gx / H
            for j in range(H):
                xhat = (np.float64(x[r, j]) - mean) * inv
                g = np.float64(dy[r, j]) * np.float64(gamma[j])
                dx[r, j] = inv * (g - mean_g - xhat * mean_gx)

    # ---- GELU in two passes around NumPy's tanh: u = k(x + c x^3), t = np.tanh(u) (SIMD, ~1 ulp),
    # then the rest. The callers run the three on a cache-sized block before the next block.

    @numba.njit(**_FLAGS)
    def geglu_argument_rows(hg, intermediate_bias, u, start, stop, k, c):
        """u[r - start] = k (x + c x^3), x = h[r] + bi, for r in [start, stop); [h|g] = hg; k, c float32
        (sqrt(2/pi) and 0.044715, passed in from engine.core.kernels). [T,2I] -> [R,I]"""
        I = u.shape[1]
        for r in range(start, stop):
            for j in range(I):
                x = hg[r, j] + intermediate_bias[j]
                u[r - start, j] = k * (x + c * (x * x * x))

    @numba.njit(**_FLAGS)
    def geglu_finish_rows(hg, intermediate_bias, gate_bias, t, out, start, stop):
        """out[r] = 0.5 x (1 + t) * (g[r] + bg), x = h[r] + bi, t = tanh(u) from the block. -> [T,I]"""
        I = out.shape[1]
        half, one = np.float32(0.5), np.float32(1.0)
        for r in range(start, stop):
            for j in range(I):
                x = hg[r, j] + intermediate_bias[j]
                g = hg[r, I + j] + gate_bias[j]
                out[r, j] = half * x * (one + t[r - start, j]) * g

    @numba.njit(**_FLAGS)
    def gelu_tanh_finish_rows(h, intermediate_bias, t, out, start, stop):
        """out[r] = 0.5 x (1 + t), x = h[r] + bi, t = tanh(u) from the block (a dense feed-forward's
        GELU: geglu_argument_rows computes u on h [T,I]). -> [T,I]"""
        I = out.shape[1]
        half, one = np.float32(0.5), np.float32(1.0)
        for r in range(start, stop):
            for j in range(I):
                x = h[r, j] + intermediate_bias[j]
                out[r, j] = half * x * (one + t[r - start, j])

    @numba.njit(**_FLAGS)
    def gelu_erf_rows(h, intermediate_bias, out, start, stop, sqrt_half):
        """out[r] = 0.5 x erfc(-x/sqrt2), x = h[r] + bi, in float64 rounded once (the C library's
        erfc; engine.core.kernels.gelu_erf's formula and precision). [T,I] -> [T,I]"""
        I = out.shape[1]
        for r in range(start, stop):
            for j in range(I):
                x = np.float64(h[r, j] + intermediate_bias[j])
                out[r, j] = np.float32(0.5 * x * math.erfc(-x * sqrt_half))

    @numba.njit(**_FLAGS)
    def gelu_argument(x, u, k, c):
        """u = k (x + c x^3); k, c float32. [n] -> [n]"""
        for i in range(x.shape[0]):
            v = x[i]
            u[i] = k * (v + c * (v * v * v))

    @numba.njit(**_FLAGS)
    def geglu_finish(x, gate, t, out):
        """out = 0.5 x (1 + t) * gate, t = tanh(k (x + c x^3)): engine.core.kernels.geglu's order.
        [n] -> [n]"""
        half, one = np.float32(0.5), np.float32(1.0)
        for i in range(x.shape[0]):
            out[i] = half * x[i] * (one + t[i]) * gate[i]

    @numba.njit(**_FLAGS)
    def geglu_backward_finish(x, gate, t, dy, dx, dgate, k, c):
        """engine.core.backward.geglu_backward from t = tanh(k (x + c x^3)) (k, c float32):
        dgate = dy * 0.5 x (1 + t), dx = (0.5(1+t) + 0.5x(1-t^2) k(1+3c x^2)) * (dy * gate),
        the readable kernels' operations in their order. [n] -> ([n], [n])"""
        half, one, three = np.float32(0.5), np.float32(1.0), np.float32(3.0)
        for i in range(x.shape[0]):
            v, ti, d = x[i], t[i], dy[i]
            dgate[i] = d * (half * v * (one + ti))
            dx[i] = (half * (one + ti) + half * v * (one - ti * ti) * k * (one + three * c * v * v)) * (d * gate[i])
