"""Each kernel, and each sublayer of the model's forward (engine/core/tape.py: the block's attention
and feed-forward, the MLM head), against the TensorFlow / Model Garden layer it reimplements, with
stated tolerances.

Tolerances are relative to the largest magnitude of the TF result: float32 kernels that follow the
same order of operations agree to a few ulps, so 1e-6 (x max|TF|) is the bound unless stated.
Each test prints its measured maximum difference (run pytest -s to see them).
"""

import math

import numpy as np
import pytest

from engine.core import kernels as K
from engine.core import tape as T
from engine.core.model import AttentionWeights, FeedForwardWeights

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")
layers = pytest.importorskip("official.nlp.modeling.layers")

RTOL = 1e-6


def report_close(name, ours, theirs, rtol=RTOL):
    theirs = np.asarray(theirs)
    diff = float(np.abs(np.asarray(ours, np.float64) - theirs).max())
    scale = float(np.abs(theirs).max())
    print(f"{name}: max|engine-TF| = {diff:.3e}, max|TF| = {scale:.3e}, bound {rtol:.0e} x max|TF|")
    assert ours.shape == theirs.shape
    assert diff <= rtol * scale, f"{name}: {diff} > {rtol} * {scale}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_gelu_tanh_matches_tf(rng):
    x = np.concatenate([rng.normal(0, 3, 10000), np.linspace(-12, 12, 2001), [0.0, -0.0, 1e-30, -50, 50]])
    x = x.astype(np.float32)
    ours = K.gelu_tanh(x)
    assert ours.dtype == np.float32
    theirs = tf.nn.gelu(tf.constant(x), approximate=True).numpy()
    # Elementwise bound: 2 ulps of the result, plus |x| ulp(1) for the cancellation in 1 + tanh(z)
    # when x is very negative (both implementations lose the same relative accuracy there).
    diff = np.abs(ours.astype(np.float64) - theirs)
    bound = 2 * np.spacing(np.abs(theirs)) + np.abs(x) * np.finfo(np.float32).eps
    print(f"gelu_tanh: max|engine-TF| = {diff.max():.3e}, max of diff/bound = {(diff / bound).max():.2f}")
    assert np.all(diff <= bound)


def test_erf_matches_the_platform_libm_to_float64_precision(rng):
    """K.erf (series and continued fraction, NumPy only) against Python's math.erf (the C library's)."""
    x = np.concatenate([np.linspace(-7, 7, 40001), rng.normal(0, 2, 20000), [0.0, -0.0, 1e-300, 1.5, -1.5,
                                                                             np.nextafter(1.5, 0), 30, -30]])
    ours = K.erf(x)
    theirs = np.array([math.erf(v) for v in x])
    ulps = np.abs(ours - theirs) / np.spacing(np.maximum(np.abs(theirs), np.finfo(np.float64).tiny))
    print(f"erf: max |engine - libm| = {np.abs(ours - theirs).max():.3e}, max {ulps.max():.1f} ulp of the value")
    assert ulps.max() <= 16                      # float64 precision: ~1e-15 relative, far below float32's 6e-8
    assert np.array_equal(np.signbit(ours), np.signbit(theirs))
    assert K.erf(np.float32(0.5)).dtype == np.float64
    ours_c = K.erfc(x)
    theirs_c = np.array([math.erfc(v) for v in x])
    relative = np.abs(ours_c - theirs_c) / np.maximum(theirs_c, np.finfo(np.float64).tiny)
    print(f"erfc: max relative difference from libm = {relative.max():.3e}")
    assert relative.max() <= 1e-13                # relative precision where erfc is tiny (x up to 7: 4e-23)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_erf_matches_tf(rng, dtype):
    x = np.concatenate([rng.normal(0, 3, 10000), np.linspace(-12, 12, 2001), [0.0, -0.0, 1e-30, -50, 50]]).astype(dtype)
    ours = K.gelu_erf(x)
    assert ours.dtype == dtype
    theirs = tf.nn.gelu(tf.constant(x), approximate=False).numpy()
    exact = 0.5 * x.astype(np.float64) * np.array([math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    ours_error, tf_error = np.abs(ours - exact), np.abs(theirs - exact)
    # float32: 2 ulps of the result plus |x| ulp(1), as gelu_tanh; float64 (the truth of the verdicts):
    # 1e-13 relative, a million times below float32's rounding
    bound = (2 * np.spacing(np.abs(exact).astype(dtype)) + np.abs(x) * np.finfo(dtype).eps if dtype == np.float32
             else 1e-13 * np.abs(exact))
    print(f"gelu_erf {np.dtype(dtype).name}: max|engine-exact| = {ours_error.max():.3e}, "
          f"max|TF-exact| = {tf_error.max():.3e}, max|engine-TF| = {np.abs(ours - theirs).max():.3e}")
    assert np.all(ours_error <= bound)
    assert ours_error.max() <= tf_error.max() * 1.01 + np.finfo(dtype).tiny   # at least as accurate as TF


@pytest.mark.parametrize("shape", [(3, 7, 64), (2, 768), (1, 1, 5)])
def test_layer_norm_matches_keras(rng, shape):
    H = shape[-1]
    x = (rng.normal(0, 2, shape) + rng.normal(0, 3)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, H).astype(np.float32)
    beta = rng.normal(0, 0.1, H).astype(np.float32)
    ln = tf_keras.layers.LayerNormalization(axis=-1, epsilon=1e-12, dtype=tf.float32)
    ln.build(shape)
    ln.set_weights([gamma, beta])
    report_close(f"layer_norm{shape}", K.layer_norm(x, gamma, beta, 1e-12), ln(x).numpy(), rtol=2e-6)


def test_masked_softmax_matches_keras_including_all_padding_rows(rng):
    B, N, S = 3, 4, 9
    scores = rng.normal(0, 3, (B, N, S, S)).astype(np.float32)
    mask = np.ones((B, S), np.int32)
    mask[1, 5:] = 0
    mask[2, :] = 0  # every key is padding: TF's softmax is uniform there, never NaN
    # Model Garden: SelfAttentionMask -> [B,S,T] float, then MultiHeadAttention expands to [B,1,S,T].
    mask3d = np.broadcast_to(mask[:, None, :], (B, S, S)).astype(np.float32)
    theirs = tf_keras.layers.Softmax(axis=-1)(scores, mask=mask3d[:, None]).numpy()
    ours = K.masked_softmax(scores, K.attention_mask_adder(mask, np.float32))
    report_close("masked_softmax", ours, theirs)
    assert np.all(np.isfinite(ours))
    np.testing.assert_array_equal(ours[2], np.full((N, S, S), 1.0 / S, np.float32))


def _random_attention_layer(rng, H, N):
    D = H // N
    layer = layers.TalkingHeadsAttention(num_heads=N, key_dim=D)
    x = tf.zeros((1, 2, H))
    layer(query=x, value=x)  # builds
    values = {}
    for v in layer.weights:
        parts = v.name.split(":")[0].split("/")
        name = parts[-1] if parts[-1].endswith("softmax_weight") else "/".join(parts[-2:])
        value = rng.normal(0, 1 / math.sqrt(H), v.shape).astype(np.float32)
        if "softmax_weight" in name:
            value = (np.eye(N) + rng.normal(0, 0.3, v.shape)).astype(np.float32)
        v.assign(value)
        values[name] = value
    return layer, values


@pytest.mark.parametrize("B,S,H,N", [(2, 7, 64, 4), (1, 1, 32, 2), (3, 20, 48, 12)])
def test_talking_heads_attention_matches_model_garden(rng, B, S, H, N):
    layer, w = _random_attention_layer(rng, H, N)
    p = AttentionWeights(
        query_kernel=w["query/kernel"], query_bias=w["query/bias"], key_kernel=w["key/kernel"],
        key_bias=w["key/bias"], value_kernel=w["value/kernel"], value_bias=w["value/bias"],
        output_kernel=w["attention_output/kernel"], output_bias=w["attention_output/bias"],
        pre_softmax_weight=w["pre_softmax_weight"], post_softmax_weight=w["post_softmax_weight"])
    x = rng.normal(0, 1, (B, S, H)).astype(np.float32)
    mask = (rng.random((B, S)) < 0.7).astype(np.int32)
    mask[:, 0] = 1
    mask3d = np.broadcast_to(mask[:, None, :], (B, S, S)).astype(np.float32)
    theirs = layer(query=x, value=x, attention_mask=mask3d).numpy()
    ours = T.talking_heads_attention(x, K.attention_mask_adder(mask, np.float32), p)
    report_close(f"talking_heads_attention B{B} S{S} H{H} N{N}", ours, theirs, rtol=2e-6)


def test_geglu_feedforward_matches_gated_feedforward(rng):
    B, S, H, I = 2, 5, 64, 256
    layer = layers.GatedFeedforward(inner_dim=I, inner_activation=lambda t: tf.nn.gelu(t, approximate=True))
    x = rng.normal(0, 1, (B, S, H)).astype(np.float32)
    layer(tf.constant(x))
    w = {}
    for v in layer.weights:
        key = "/".join(v.name.split(":")[0].split("/")[-2:])
        value = rng.normal(0, 1 / math.sqrt(v.shape[0]), v.shape) if v.shape.rank == 2 else rng.normal(0, 0.1, v.shape)
        if key.endswith("gamma"):
            value = rng.uniform(0.6, 1.4, v.shape)
        v.assign(value.astype(np.float32))
        w[key] = value.astype(np.float32)
    p = FeedForwardWeights(w["intermediate_0/kernel"], w["intermediate_0/bias"], w["gate_0/kernel"], w["gate_0/bias"],
                           w["output_0/kernel"], w["output_0/bias"])
    ours = K.layer_norm(T.feedforward(x, p, "gelu_tanh") + x, w["output_layer_norm_0/gamma"], w["output_layer_norm_0/beta"], 1e-12)
    report_close("geglu_feedforward+LN", ours, layer(tf.constant(x)).numpy(), rtol=2e-6)


def test_gather_and_mlm_head_match_masked_lm(rng):
    B, S, H, V, P = 3, 11, 32, 50, 4
    table = tf.Variable(rng.normal(0, 0.5, (V, H)).astype(np.float32))
    head = layers.MaskedLM(embedding_table=table, activation=lambda t: tf.nn.gelu(t, approximate=True))
    seq = rng.normal(0, 1, (B, S, H)).astype(np.float32)
    pos = rng.integers(0, S, (B, P)).astype(np.int32)
    pos[0, :] = 0  # zero padding of positions, as the Hub inputs use
    head(tf.constant(seq), masked_positions=tf.constant(pos))
    for v in head.weights:
        if v is not table:
            v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    kernel = [v.numpy() for v in head.dense.weights if "kernel" in v.name][0]
    bias = [v.numpy() for v in head.dense.weights if "bias" in v.name][0]
    gamma, beta = (v.numpy() for v in head.layer_norm.weights)
    theirs = head(tf.constant(seq), masked_positions=tf.constant(pos)).numpy()
    gathered = K.gather_positions(seq, pos)
    np.testing.assert_array_equal(gathered, seq[np.arange(B)[:, None], pos])
    ours = T.mlm_head(gathered, kernel, bias, gamma, beta, table.numpy(), head.bias.numpy(), 1e-12)
    report_close("mlm_head", ours, theirs, rtol=2e-6)


def test_talking_heads_mix_is_the_einsum(rng):
    x = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
    w = rng.normal(size=(3, 3)).astype(np.float32)
    theirs = tf.einsum("bnij,nm->bmij", x, w).numpy()
    report_close("talking_heads_mix", K.talking_heads_mix(x, w), theirs)


def test_kernels_keep_float64(rng):
    x = rng.normal(size=(2, 3, 8))
    assert K.gelu_tanh(x).dtype == np.float64
    assert K.layer_norm(x, np.ones(8), np.zeros(8), 1e-12).dtype == np.float64
    assert K.softmax(x).dtype == np.float64
    assert K.attention_mask_adder(np.ones((2, 3), np.int64), np.float64).dtype == np.float64
