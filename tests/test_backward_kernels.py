"""Every backward kernel (engine/core/backward.py) against finite differences of its forward kernel
(engine/core/kernels.py) in float64, on shapes and values drawn by hypothesis (derandomized).

For a kernel y = f(a, b, ...) and a random cotangent dy, the backward gives da, db, ...; for a random
direction d of each differentiable argument, <da, d> must equal the central difference
(<dy, f(a + h d)> - <dy, f(a - h d)>) / 2h. Tolerance: 1e-6 relative to the larger of the two sides
and the sum of |terms| (h = 1e-6: truncation ~h^2, rounding ~1e-16/h), floored by the difference quotient's rounding.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core import backward as KB
from engine.core import kernels as K

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-6
H = 1e-6


def _check(forward, args, wrt, grads, seed):
    """forward(*args) -> y; grads: the backward's gradients for the argument indices in `wrt`."""
    rng = np.random.default_rng(seed)
    y = forward(*args)
    dy = rng.standard_normal(np.shape(y))
    grads = grads(dy)
    for index, grad in zip(wrt, grads, strict=True):
        d = rng.standard_normal(np.shape(args[index]))
        plus = list(args)
        minus = list(args)
        plus[index] = args[index] + H * d
        minus[index] = args[index] - H * d
        fd = (np.sum(dy * forward(*plus)) - np.sum(dy * forward(*minus))) / (2 * H)
        analytic = np.sum(grad * d)
        # the difference quotient's own rounding, ~1e-16 x sum|dy*y| / h, floors the scale (a gradient
        # that is zero in exact arithmetic, e.g. layer norm over 2 features, is compared with it)
        rounding = 1e-9 * float(np.sum(np.abs(dy * y)))
        scale = max(abs(fd), abs(analytic), float(np.sum(np.abs(grad * d))))
        assert abs(fd - analytic) <= RTOL * scale + rounding, (forward.__name__, index, fd, analytic)


shape = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6))
seeds = st.integers(0, 2**31)


@SETTINGS
@given(shape, seeds)
def test_gelu_tanh(s, seed):
    x = np.random.default_rng(seed).standard_normal(s) * 3
    _check(K.gelu_tanh, [x], [0], lambda dy: [KB.gelu_tanh_backward(x, dy)], seed)


@SETTINGS
@given(shape, seeds)
def test_gelu_erf(s, seed):
    x = np.random.default_rng(seed).standard_normal(s) * 3
    _check(K.gelu_erf, [x], [0], lambda dy: [KB.gelu_erf_backward(x, dy)], seed)


@SETTINGS
@given(shape, seeds, st.sampled_from(["gelu_tanh", "gelu_erf"]))
def test_geglu(s, seed, kind):
    rng = np.random.default_rng(seed)
    x, gate = rng.standard_normal(s) * 3, rng.standard_normal(s)
    _check(lambda x, g: K.geglu(x, g, kind), [x, gate], [0, 1],
           lambda dy: list(KB.geglu_backward(x, gate, dy, kind)), seed)


@SETTINGS
@given(shape, seeds)
def test_layer_norm(s, seed):
    rng = np.random.default_rng(seed)
    s = s[:-1] + (max(s[-1], 3),)   # over 2 features LN is sign(x1 - x2): degenerate
    x, gamma, beta = rng.standard_normal(s) * 2 + 1, rng.standard_normal(s[-1]), rng.standard_normal(s[-1])
    _check(lambda x, g, b: K.layer_norm(x, g, b, 1e-12), [x, gamma, beta], [0, 1, 2],
           lambda dy: KB.layer_norm_backward(x, gamma, beta, 1e-12, dy), seed)


@SETTINGS
@given(shape, st.integers(1, 6), seeds)
def test_dense(s, f, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(s), rng.standard_normal((s[-1], f)), rng.standard_normal(f)
    _check(K.dense, [x, w, b], [0, 1, 2], lambda dy: KB.dense_backward(x, w, b, dy), seed)


@SETTINGS
@given(shape, st.sampled_from([0.0, 0.1, 0.5]), seeds)
def test_dropout(s, rate, seed):
    rng = np.random.default_rng(seed)
    x, keep = rng.standard_normal(s), (rng.random(s) >= rate).astype(np.float64)
    _check(lambda x: K.dropout(x, keep, rate), [x], [0], lambda dy: [KB.dropout_backward(x, keep, rate, dy)], seed)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 7), seeds)
def test_embed(B, S, V, seed):
    rng = np.random.default_rng(seed)
    Hd = 4
    ids, types = rng.integers(0, V, (B, S)), rng.integers(0, 2, (B, S))      # repeated ids: rows add up
    word, pos, typ = rng.standard_normal((V, Hd)), rng.standard_normal((S + 2, Hd)), rng.standard_normal((2, Hd))
    _check(lambda w, p, t: K.embed(ids, types, w, p, t), [word, pos, typ], [0, 1, 2],
           lambda dy: KB.embed_backward(ids, types, word, pos, typ, dy), seed)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 3), st.integers(1, 4), seeds)
def test_qkv_projection(B, S, N, D, seed):
    rng = np.random.default_rng(seed)
    Hd = N * D + 1
    x, w, b = rng.standard_normal((B, S, Hd)), rng.standard_normal((Hd, N, D)), rng.standard_normal((N, D))
    _check(K.qkv_projection, [x, w, b], [0, 1, 2], lambda dy: KB.qkv_projection_backward(x, w, b, dy), seed)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 3), st.integers(1, 4), seeds)
def test_raw_attention_scores_and_scale(B, S, N, D, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((B, S, N, D)), rng.standard_normal((B, S, N, D))
    _check(K.raw_attention_scores, [q, k], [0, 1], lambda dy: KB.raw_attention_scores_backward(q, k, dy), seed)
    raw = rng.standard_normal((B, N, S, S))
    _check(lambda r: K.scale_scores(r, D), [raw], [0], lambda dy: [KB.scale_scores_backward(raw, D, dy)], seed)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), seeds)
def test_talking_heads_mix(B, N, S, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((B, N, S, S)), rng.standard_normal((N, N))
    _check(K.talking_heads_mix, [x, w], [0, 1], lambda dy: KB.talking_heads_mix_backward(x, w, dy), seed)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), seeds)
def test_masked_softmax(B, N, S, seed):
    """softmax after the mask adder, rows with at least one real key (on an all-padding row the float64
    forward rounds to float32 and is locally constant: see apply_attention_mask_backward)."""
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, S)) < 0.7).astype(np.int32)
    mask[:, 0] = 1
    adder = K.attention_mask_adder(mask, np.float64)
    x = rng.standard_normal((B, N, S, S)) * 3
    _check(lambda x: K.masked_softmax(x, adder), [x], [0],
           lambda dy: [KB.apply_attention_mask_backward(x, adder, KB.softmax_backward(K.masked_softmax(x, adder), dy))],
           seed)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 3), st.integers(1, 4), seeds)
def test_attention_context_and_output(B, S, N, D, seed):
    rng = np.random.default_rng(seed)
    p, v = rng.random((B, N, S, S)), rng.standard_normal((B, S, N, D))
    _check(K.attention_context, [p, v], [0, 1], lambda dy: KB.attention_context_backward(p, v, dy), seed)
    ctx, w, b = rng.standard_normal((B, S, N, D)), rng.standard_normal((N, D, 5)), rng.standard_normal(5)
    _check(K.attention_output, [ctx, w, b], [0, 1, 2], lambda dy: KB.attention_output_backward(ctx, w, b, dy), seed)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), seeds)
def test_pooler(B, S, Hd, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((B, S, Hd)), rng.standard_normal((Hd, Hd)), rng.standard_normal(Hd)
    _check(K.pooler, [x, w, b], [0, 1, 2], lambda dy: KB.pooler_backward(x, w, b, K.pooler(x, w, b), dy), seed)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), seeds)
def test_gather_positions(B, S, P, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, S, 3))
    positions = rng.integers(0, S, (B, P))
    positions[:, -1] = 0                    # zero-padded positions repeat position 0: their rows add up
    _check(lambda x: K.gather_positions(x, positions), [x], [0],
           lambda dy: [KB.gather_positions_backward(x, positions, dy)], seed)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 4), st.integers(3, 6), st.integers(2, 9), seeds)
def test_mlm_head(B, P, Hd, V, seed):
    """The MLM head of engine/core/tape.py (kernels composed, the word table tied) and its backward."""
    from engine.core import tape as T
    rng = np.random.default_rng(seed)
    args = [rng.standard_normal((B, P, Hd)), rng.standard_normal((Hd, Hd)), rng.standard_normal(Hd),
            rng.standard_normal(Hd) + 1, rng.standard_normal(Hd), rng.standard_normal((V, Hd)), rng.standard_normal(V)]
    forward = lambda g, wk, wb, gam, bet, word, ob: T.mlm_head(g, wk, wb, gam, bet, word, ob, 1e-12)  # noqa: E731
    order = ("mlm/transform/kernel", "mlm/transform/bias", "mlm/layer_norm/gamma", "mlm/layer_norm/beta")

    def grads(dy):
        saved = {}
        T.mlm_head(*args, 1e-12, saved=saved)
        dg, dword, g = T.mlm_head_backward(saved, *args[1:], 1e-12, dy)
        return [dg] + [g[name] for name in order] + [dword, g["mlm/output_bias"]]
    _check(forward, args, list(range(7)), grads, seed)


# ---------------------------------------------------------------------------- the tape's fused set

def test_fused_tape_kernels_against_float64():
    """engine/fast/tape_kernels.py, kernel by kernel, against the readable kernels run in float64:
    layer norm and its backward at least as accurate as the readable float32 kernels (statistics in
    float64), the GEGLU and its backward within 1.5x of them (the same formula around NumPy's tanh);
    float64 arrays fall back to the readable kernels themselves."""
    from engine.fast import fused, tape_kernels as TK
    if not fused.enabled():
        pytest.skip(f"fused kernels {fused.status()}")
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x, gamma, beta, dy = f32(3, 70, 96) * 4 + 3, f32(96), f32(96), f32(3, 70, 96)
    gate = f32(3, 70, 96)
    d64 = lambda *arrays: [a.astype(np.float64) for a in arrays]  # noqa: E731

    def err(got, want):
        return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
    pairs = [
        ("layer_norm", TK.layer_norm(x, gamma, beta, 1e-12), K.layer_norm(x, gamma, beta, 1e-12),
         K.layer_norm(*d64(x, gamma, beta), 1e-12), 1.0),
        ("geglu", TK.geglu(x, gate), K.geglu(x, gate), K.geglu(*d64(x, gate)), 1.5),
    ]
    fused_geglu = TK.geglu_backward(x, gate, dy)
    readable_geglu = KB.geglu_backward(x, gate, dy)
    exact_geglu = KB.geglu_backward(*d64(x, gate, dy))
    for i, name in enumerate(("dx", "dgate")):
        pairs.append((f"geglu_backward {name}", fused_geglu[i], readable_geglu[i], exact_geglu[i], 1.5))
    fused_ln = TK.layer_norm_backward(x, gamma, beta, 1e-12, dy)
    readable_ln = KB.layer_norm_backward(x, gamma, beta, 1e-12, dy)
    exact_ln = KB.layer_norm_backward(*d64(x, gamma, beta), 1e-12, *d64(dy))
    for i, name in enumerate(("dx", "dgamma", "dbeta")):
        pairs.append((f"layer_norm_backward {name}", fused_ln[i], readable_ln[i], exact_ln[i], 1.0))
    for name, got, readable, exact, factor in pairs:
        e_fused, e_readable = err(got, exact), err(readable, exact)
        print(f"{name}: fused {e_fused:.2e}, readable float32 {e_readable:.2e}")
        assert got.dtype == np.float32 and got.shape == readable.shape
        assert e_fused <= factor * e_readable + 1e-9, name
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(TK.geglu(x64, x64), K.geglu(x64, x64))
