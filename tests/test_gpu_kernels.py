"""The fused GPU path: CUDA source, NumPy twins, and (on a GPU) each kernel against its twin.

Runs without a GPU: the CUDA source compiles with nvcc (skipped without nvcc), the NumPy twins of
the kernels agree with engine.core.kernels, and the fused forward of engine.gpu run with the twins
(NumpyOps) agrees with the plain Encoder. Tests marked `gpu` need CuPy and a CUDA device and skip
with the reason otherwise. Measured figures are printed (pytest -s).
"""

import re
import shutil
import subprocess

import numpy as np
import pytest

import engine
from engine.gpu import forward as gpu
from engine.gpu import kernels as G
from engine.core import kernels as K
from engine.tools import parity
from tests.random_weights import random_tensors
from weights.format import ModelConfig

TINY = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, head_size=16, intermediate_size=256,
                   vocab_size=3000, max_position_embeddings=128, type_vocab_size=2)
# names CudaOps launches (checked against the compiled entry points)
ENTRY_POINTS = ([f"{k}_{s}" for k in ("layer_norm_residual", "embed_layer_norm", "bias_split_heads",
                                     "talking_heads_softmax", "geglu", "cast_from_f32") for s in ("f32", "f16", "bf16")]
                + ["merge_heads_b32", "merge_heads_b16", "bias_tanh_f32"])


def rel_err(ours, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture(scope="module")
def tiny_encoder():
    return engine.Encoder(TINY, random_tensors(TINY, seed=0))


def tiny_inputs(B=3, S=33, seed=0):
    inputs = parity.random_inputs(np.random.default_rng(seed), B, S, TINY.vocab_size, all_padding_row=B > 1,
                                  segment_pairs=True, num_positions=1)
    return inputs["input_word_ids"], inputs["input_mask"], inputs["input_type_ids"]


# ------------------------------------------------------------------------------------ CUDA source

@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles(tmp_path, arch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH: cannot compile engine/gpu/kernels.cu here")
    ptx = tmp_path / f"gpu_kernels_{arch}.ptx"
    cmd = [nvcc, f"-arch={arch}", "--ptx", *G.NVRTC_OPTIONS, G.CU_SOURCE, "-o", str(ptx)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), result.stderr
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.read_text()))
    missing = sorted(set(ENTRY_POINTS) - entries)
    assert not missing, f"entry points missing from the PTX: {missing}"


def test_launched_kernel_names_exist_in_source():
    src = G.read_source()
    used = set(re.findall(r'fn\(f?"(\w+?)(?:_\{self\.suffix\})?"\)', open(G.__file__).read()))
    assert used, "no kernel names found in engine/gpu/kernels.py"
    for name in used:
        assert name in src, name


# ------------------------------------------------------------------------------------ roundings

def test_bf16_rounding_is_nearest_even(rng):
    x = np.concatenate([rng.normal(0, 10, 100000), [0.0, -0.0, 1.0, -2.5, 3.4e38, -3.4e38, 1e-40, np.inf, -np.inf]])
    x = x.astype(np.float32)
    bits = G.to_bf16_bits(x)
    y = G.from_bf16_bits(bits)
    # the nearest bfloat16 value: neighbours differ by one unit in the last place of the bf16
    with np.errstate(invalid="ignore", over="ignore"):
        down = G.from_bf16_bits(bits - 1).astype(np.float64)
        up = G.from_bf16_bits(bits + 1).astype(np.float64)
        finite = np.isfinite(x) & np.isfinite(up) & np.isfinite(down)
        d = np.abs(y.astype(np.float64) - x)
    assert np.all(d[finite] <= np.abs(down - x)[finite]) and np.all(d[finite] <= np.abs(up - x)[finite])
    np.testing.assert_array_equal(y[np.isinf(x)], x[np.isinf(x)])
    # ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7
    assert G.from_bf16_bits(G.to_bf16_bits(np.float32(1 + 2 ** -8)))[()] == 1.0
    assert G.from_bf16_bits(G.to_bf16_bits(np.float32(1 + 3 * 2 ** -8)))[()] == np.float32(1 + 2 ** -6)
    assert np.isnan(G.from_bf16_bits(G.to_bf16_bits(np.float32(np.nan))))
    # representable values are unchanged
    exact = G.from_bf16_bits(bits)
    np.testing.assert_array_equal(G.round_to_storage(exact, "bfloat16"), exact)


def test_tf32_and_float16_roundings(rng):
    x = rng.normal(0, 3, 10000).astype(np.float32)
    t = G.round_to_tf32(x)
    assert np.all(t.view(np.uint32) & 0x1FFF == 0)                      # 10 mantissa bits left
    assert np.all(np.abs(t - x) <= np.abs(x) * 2.0 ** -11)
    np.testing.assert_array_equal(G.round_to_storage(x, "float16"), x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(G.round_to_storage(x, "float32"), x)


# ------------------------------------------------------------------------------------ NumPy twins

# Each twin against TensorFlow running the same operation in float32 (the ground truth, not the
# engine's own kernels that the twins are written with). Tolerances: exact for pure data movement;
# TWIN_RTOL x max|TF| where the two float32 implementations may round differently (a few ulps).
TWIN_RTOL = 1e-6   # measured: at most 1.8e-7 (pytest -s prints each)


def _tf():
    return pytest.importorskip("tensorflow")


def _check_layer_norm_residual(twin):
    tf = _tf()
    import tf_keras
    rng = np.random.default_rng(11)
    x, r = rng.normal(0, 2, (10, 64)).astype(np.float32), rng.normal(0, 2, (10, 64)).astype(np.float32)
    b, g, be = (rng.normal(0, 1, 64).astype(np.float32) for _ in range(3))
    ln = tf_keras.layers.LayerNormalization(epsilon=1e-12)
    ln.build((None, 64))
    ln.set_weights([g, be])
    theirs = ln((tf.constant(x) + b) + tf.constant(r)).numpy()
    return max(rel_err(twin(x, b, r, g, be, 1e-12), theirs), rel_err(twin(x, None, None, g, be, 1e-12), ln(x).numpy()))


def _check_embed_layer_norm(twin, enc):
    tf = _tf()
    import tf_keras
    ids, _, types = tiny_inputs()
    ln = tf_keras.layers.LayerNormalization(epsilon=1e-12)
    ln.build((None, None, TINY.hidden_size))
    ln.set_weights(list(enc.embedding_ln))
    S = ids.shape[1]
    e = (tf.gather(enc.word_table, ids) + enc.position_table[:S]) + tf.gather(enc.type_table, types)
    return rel_err(twin(ids, types, enc.word_table, enc.position_table, enc.type_table, *enc.embedding_ln, 1e-12),
                   ln(e).numpy())


def _check_bias_split_heads(twin):
    tf = _tf()
    B, S, N, D = 2, 7, 4, 16
    rng = np.random.default_rng(12)
    qkv, bias = rng.normal(0, 1, (B * S, 3 * N * D)).astype(np.float32), rng.normal(0, 1, 3 * N * D).astype(np.float32)
    y = tf.reshape(tf.constant(qkv) + bias, [B, S, 3, N, D])
    theirs = [tf.transpose(y[:, :, i], [0, 2, 1, 3]).numpy() for i in range(3)]
    return max(rel_err(o, t) for o, t in zip(twin(qkv, bias, B, S, N, D), theirs)) * 1e9   # exact: any change fails


def _check_talking_heads_softmax(twin, enc):
    tf = _tf()
    w = enc.blocks[0].attention
    B, N, S = 2, TINY.num_heads, 17
    rng = np.random.default_rng(13)
    scores = rng.normal(0, 8, (B, N, S, S)).astype(np.float32)
    mask = np.ones((B, S), np.int32)
    mask[0, 11:] = 0
    mask[1, :] = 0                                              # a row that is all padding: uniform softmax
    scale = np.float32(1.0 / np.sqrt(TINY.head_size))
    mixed = tf.einsum("bnst,nm->bmst", tf.constant(scores) * scale, w.pre_softmax_weight)
    adder = (1.0 - tf.cast(mask, tf.float32)) * TINY.attention_mask_constant
    probs = tf.nn.softmax(mixed + adder[:, None, None, :], axis=-1)
    theirs = tf.einsum("bnst,nm->bmst", probs, w.post_softmax_weight).numpy()
    return rel_err(twin(scores, mask, w.pre_softmax_weight, w.post_softmax_weight, scale,
                        TINY.attention_mask_constant), theirs)


def _check_merge_heads(twin):
    tf = _tf()
    ctx = np.random.default_rng(14).normal(0, 1, (2, 4, 5, 16)).astype(np.float32)
    theirs = tf.reshape(tf.transpose(ctx, [0, 2, 1, 3]), [2, 5, 64]).numpy()
    return rel_err(twin(ctx), theirs) * 1e9   # exact


def _check_geglu(twin):
    tf = _tf()
    I = 256
    rng = np.random.default_rng(15)
    y, bias = rng.normal(0, 2, (9, 2 * I)).astype(np.float32), rng.normal(0, 1, 2 * I).astype(np.float32)
    theirs = (tf.nn.gelu(y[:, :I] + bias[:I], approximate=True) * (y[:, I:] + bias[I:])).numpy()
    return rel_err(twin(y, bias), theirs)


def _check_bias_tanh(twin):
    tf = _tf()
    rng = np.random.default_rng(16)
    y, bias = rng.normal(0, 2, (3, 64)).astype(np.float32), rng.normal(0, 1, 64).astype(np.float32)
    return rel_err(twin(y, bias), tf.tanh(tf.constant(y) + bias).numpy())


TWIN_CHECKS = {
    "layer_norm_residual_reference": lambda twin, enc: _check_layer_norm_residual(twin),
    "embed_layer_norm_reference": _check_embed_layer_norm,
    "bias_split_heads_reference": lambda twin, enc: _check_bias_split_heads(twin),
    "talking_heads_softmax_reference": _check_talking_heads_softmax,
    "merge_heads_reference": lambda twin, enc: _check_merge_heads(twin),
    "geglu_reference": lambda twin, enc: _check_geglu(twin),
    "bias_tanh_reference": lambda twin, enc: _check_bias_tanh(twin),
}


@pytest.mark.parametrize("name", sorted(TWIN_CHECKS))
def test_twin_matches_tensorflow(name, tiny_encoder):
    err = TWIN_CHECKS[name](getattr(G, name), tiny_encoder)
    print(f"{name}: max|twin - TF| / max|TF| = {err:.2e} (tolerance {TWIN_RTOL:.0e})")
    assert err <= TWIN_RTOL


def _perturbed(twin):
    """The twin with its result nudged by 1e-5 (relative): a small real change."""
    def nudged(*args):
        out = twin(*args)
        if isinstance(out, tuple):
            return tuple(o * np.float32(1 + 1e-5) for o in out)
        return out * np.float32(1 + 1e-5)
    return nudged


@pytest.mark.parametrize("name", sorted(TWIN_CHECKS))
def test_a_perturbed_twin_fails_its_check(name, tiny_encoder):
    err = TWIN_CHECKS[name](_perturbed(getattr(G, name)), tiny_encoder)
    assert err > TWIN_RTOL, f"{name}: a 1e-5 change passed ({err:.2e})"


# ------------------------------------------------------------------------------------ fused forward on the CPU

def test_fused_forward_with_numpy_twins_matches_encoder(tiny_encoder):
    enc = tiny_encoder
    ids, mask, types = tiny_inputs()
    ref = enc({"input_word_ids": ids, "input_mask": mask, "input_type_ids": types})
    outs, pooled = gpu.GpuForward(enc, precision="float32", ops="numpy").encode(ids, mask, types)
    errs = [rel_err(o, r) for o, r in zip(outs, ref["encoder_outputs"])] + [rel_err(pooled, ref["pooled_output"])]
    print("fused forward (NumPy twins) vs Encoder, float32, rel errs:", ", ".join(f"{e:.1e}" for e in errs))
    # merged products sum in another order than the separate ones: float32 rounding differences,
    # amplified by the random weights' large scale (pooled: ~1e-5 of max|pooled| <= 1)
    assert max(errs) <= 3e-5


@pytest.mark.parametrize("precision,bound", [("tf32", 3e-2), ("float16", 3e-2), ("bfloat16", 2e-1)])
def test_reduced_precision_emulated_on_cpu(tiny_encoder, precision, bound):
    """The roundings of the reduced precisions, emulated with NumPy (inputs of every product rounded,
    float32 accumulation). A sanity bound on the tiny random model, not the GPU's documented tolerance."""
    enc = tiny_encoder
    ids, mask, types = tiny_inputs()
    ref = enc({"input_word_ids": ids, "input_mask": mask, "input_type_ids": types})
    outs, pooled = gpu.GpuForward(enc, precision=precision, ops="numpy").encode(ids, mask, types)
    errs = [rel_err(o, r) for o, r in zip(outs, ref["encoder_outputs"])] + [rel_err(pooled, ref["pooled_output"])]
    print(f"{precision} emulated on the CPU (tiny random model), rel errs:", ", ".join(f"{e:.1e}" for e in errs))
    assert all(np.all(np.isfinite(o)) for o in outs)
    assert max(errs) <= bound


def test_options_are_validated_and_numpy_backend_is_untouched(tiny_encoder):
    """The GPU settings are checked at load (one line naming the setting), default to the fused
    path in float32 without graphs, and the numpy backend gets no GPU twin whatever they say."""
    from engine.core.settings import SettingError, Settings
    with pytest.raises(SettingError, match="setting gpu_path = 'fast': choose one of fused, plain"):
        Settings.resolve(gpu_path="fast")
    with pytest.raises(SettingError, match="setting precision = 'fp8'"):
        gpu.GpuForward(tiny_encoder, precision="fp8", ops="numpy")
    with pytest.raises(SettingError, match="setting cuda_graphs = 'yes': True or False"):
        engine.Encoder(TINY, random_tensors(TINY, seed=0), cuda_graphs="yes")
    defaults = Settings()
    assert (defaults.gpu_path, defaults.precision, defaults.cuda_graphs) == ("fused", "float32", False)
    assert engine.Encoder(TINY, random_tensors(TINY, seed=0), gpu_path="fused", precision="tf32").fast_forward is None
    assert tiny_encoder.fast_forward is None


# ------------------------------------------------------------------------------------ on a GPU

def _cupy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install -e '.[gpu]')")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - no driver, no device, wrong CUDA: all mean skip
        pytest.skip(f"no CUDA device: {e}")
    if count < 1:
        pytest.skip("no CUDA device: CuPy sees none")
    return cupy


PRECISIONS = list(G.PRECISIONS)
# twin vs kernel, float32 ops: only summation order differs (a few ulps of the largest value)
KERNEL_RTOL = 2e-6


def _pair(precision):
    cupy = _cupy()
    return cupy, G.CudaOps(precision), G.NumpyOps(precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_layer_norm_kernels_match_twins(precision, rng):
    cupy, cu, npo = _pair(precision)
    rows, H = 37, 768
    x, r = rng.normal(0, 2, (rows, H)).astype(np.float32), rng.normal(3, 2, (rows, H)).astype(np.float32)
    b, g, be = (rng.normal(0, 1, H).astype(np.float32) for _ in range(3))
    compute = precision in ("float16", "bfloat16")
    for bias, res in ((b, r), (None, None), (b, None)):
        want, want_c = np.empty_like(x), (np.empty_like(x) if compute else None)
        npo.layer_norm_residual(x, bias, res, g, be, 1e-12, want, want_c)
        out = cupy.empty((rows, H), np.float32)
        out_c = cu.empty((rows, H), compute=True) if compute else None
        dev = lambda a: None if a is None else cupy.asarray(a)  # noqa: E731
        cu.layer_norm_residual(dev(x), dev(bias), dev(res), dev(g), dev(be), 1e-12, out, out_c)
        e = rel_err(out.get(), want)
        print(f"layer_norm_residual {precision}: rel err {e:.2e}")
        assert e <= KERNEL_RTOL
        if compute:   # the compute copy is the float32 result rounded once
            got_c = cu.load(out_c).get()
            np.testing.assert_array_equal(got_c, G.round_to_storage(out.get(), precision))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_embed_layer_norm_matches_twin(precision, tiny_encoder):
    cupy, cu, npo = _pair(precision)
    enc = tiny_encoder
    ids, mask, types = tiny_inputs()
    want = np.empty(ids.shape + (TINY.hidden_size,), np.float32)
    npo.embed_layer_norm(ids, types, enc.word_table, enc.position_table, enc.type_table, *enc.embedding_ln,
                         1e-12, want, None)
    out = cupy.empty(want.shape, np.float32)
    d = cupy.asarray
    cu.embed_layer_norm(d(ids), d(types), d(enc.word_table), d(enc.position_table), d(enc.type_table),
                        d(enc.embedding_ln[0]), d(enc.embedding_ln[1]), 1e-12, out, None)
    assert rel_err(out.get(), want) <= KERNEL_RTOL


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,S,N", [(2, 33, 4), (1, 512, 12), (3, 1, 12)])
def test_gpu_talking_heads_softmax_matches_twin(precision, B, S, N, rng):
    cupy, cu, npo = _pair(precision)
    scores = rng.normal(0, 8, (B, N, S, S)).astype(np.float32)
    mask = (rng.uniform(size=(B, S)) < 0.8).astype(np.int32)
    mask[:, 0] = 1
    if B > 1:
        mask[-1] = 0                                              # all padding
    w_pre = (np.eye(N) + rng.normal(0, 0.3, (N, N))).astype(np.float32)
    w_post = (np.eye(N) + rng.normal(0, 0.3, (N, N))).astype(np.float32)
    scale = float(np.float32(0.125))
    want = np.empty_like(scores)
    npo.talking_heads_softmax(scores, mask, w_pre, w_post, scale, -1e9, want)
    probs = cu.empty(scores.shape, compute=True)
    d = cupy.asarray
    cu.talking_heads_softmax(d(scores), d(mask), d(w_pre), d(w_post), scale, -1e9, probs)
    got = cu.load(probs).get()
    e = rel_err(got, want)
    print(f"talking_heads_softmax {precision} B{B} S{S} N{N}: rel err {e:.2e}")
    # reduced precisions: the twin rounds the same float32 value, so at most one unit apart
    bound = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}.get(precision, KERNEL_RTOL)
    assert e <= bound


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_split_merge_geglu_tanh_cast_match_twins(precision, rng):
    cupy, cu, npo = _pair(precision)
    d = cupy.asarray
    B, S, N, D, I = 2, 5, 12, 64, 3072
    H = N * D
    qkv, bqkv = rng.normal(0, 1, (B * S, 3 * H)).astype(np.float32), rng.normal(0, 1, 3 * H).astype(np.float32)
    q, k, v = (cu.empty((B, N, S, D), compute=True) for _ in range(3))
    cu.bias_split_heads(d(qkv), d(bqkv), q, k, v)
    for got, want in zip((q, k, v), G.bias_split_heads_reference(qkv, bqkv, B, S, N, D)):
        np.testing.assert_array_equal(cu.load(got).get(), G.round_to_storage(want, precision))
    merged = cu.empty((B, S, H), compute=True)
    cu.merge_heads(q, merged)
    np.testing.assert_array_equal(cu.load(merged).get(), G.merge_heads_reference(cu.load(q).get()))
    y, big = rng.normal(0, 2, (B * S, 2 * I)).astype(np.float32), rng.normal(0, 1, 2 * I).astype(np.float32)
    h = cu.empty((B * S, I), compute=True)
    cu.geglu(d(y), d(big), h)
    want = G.geglu_reference(y, big)
    bound = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}.get(precision, 4e-7)
    assert rel_err(cu.load(h).get(), want) <= bound
    out = cupy.empty((B * S, H), np.float32)
    cu.bias_tanh(d(y[:, :H]), d(bqkv[:H]), out)
    np.testing.assert_allclose(out.get(), G.bias_tanh_reference(y[:, :H], bqkv[:H]), atol=4e-7)
    x = np.concatenate([rng.normal(0, 100, 10000), [0, -0.0, 1 + 2 ** -8, 65504, 1e-8, np.inf]]).astype(np.float32)
    np.testing.assert_array_equal(cu.load(cu.to_compute(d(x))).get(), G.round_to_storage(x, precision))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_matmul_layouts(precision, rng):
    cupy, cu, npo = _pair(precision)
    a = rng.normal(0, 1, (4, 9, 64)).astype(np.float32)       # rows of a[:, 0] are strided (pooler)
    w = rng.normal(0, 1, (64, 48)).astype(np.float32)
    bq = rng.normal(0, 1, (6, 17, 32)).astype(np.float32)
    bk = rng.normal(0, 1, (6, 13, 32)).astype(np.float32)
    tol = {"float32": 1e-6, "tf32": 3e-3, "float16": 3e-3, "bfloat16": 2e-2}[precision]
    c = lambda x: cu.to_compute(cupy.asarray(x))  # noqa: E731
    out = cupy.empty((4, 48), np.float32)
    cu.matmul(c(a)[:, 0], c(w), out)
    assert rel_err(out.get(), a[:, 0] @ w) <= tol
    out = cupy.empty((6, 17, 13), np.float32)
    cu.matmul(c(bq), c(bk), out, transpose_b=True)
    assert rel_err(out.get(), bq @ bk.transpose(0, 2, 1)) <= tol
    out = cu.empty((6, 17, 32), compute=True)
    cu.matmul(c(bq @ bk.transpose(0, 2, 1)), c(bk), out, out_compute=True)
    want = (bq @ bk.transpose(0, 2, 1)) @ bk
    assert rel_err(cu.load(out).get(), want) <= max(tol, {"float16": 2e-3, "bfloat16": 1e-2}.get(precision, 0))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_fused_forward_matches_twins_and_plain(precision, tiny_encoder):
    cupy = _cupy()
    enc_cpu = tiny_encoder
    tensors = random_tensors(TINY, seed=0)
    fused = engine.Encoder(TINY, tensors, backend="cupy", precision=precision)
    plain = engine.Encoder(TINY, tensors, backend="cupy", gpu_path="plain")
    assert fused.fast_forward is not None and plain.fast_forward is None
    ids, mask, types = tiny_inputs()
    inputs = {"input_word_ids": ids, "input_mask": mask, "input_type_ids": types}
    got = engine.to_numpy(fused(inputs))
    ref = engine.to_numpy(plain(inputs))
    twin_outs, twin_pooled = gpu.GpuForward(enc_cpu, precision=precision, ops="numpy").encode(ids, mask, types)
    e_plain = max(rel_err(o, r) for o, r in zip(got["encoder_outputs"], ref["encoder_outputs"]))
    e_twin = max(rel_err(o, r) for o, r in zip(got["encoder_outputs"], twin_outs))
    print(f"fused {precision} on the GPU: rel err vs plain cupy {e_plain:.2e}, vs NumPy twins {e_twin:.2e}")
    if precision == "float32":
        assert e_plain <= 3e-5 and e_twin <= 3e-5
    else:
        assert e_twin <= 5e-2
    np.testing.assert_array_equal(got["default"], got["pooled_output"])
    del cupy


@pytest.mark.gpu
def test_gpu_cuda_graphs_match_eager(tiny_encoder):
    _cupy()
    tensors = random_tensors(TINY, seed=0)
    eager = engine.Encoder(TINY, tensors, backend="cupy")
    graphs = engine.Encoder(TINY, tensors, backend="cupy", cuda_graphs=True)
    for seed in range(4):        # call 1 eager, call 2 captures, calls 3-4 replay
        ids, mask, types = tiny_inputs(seed=seed)
        inputs = {"input_word_ids": ids, "input_mask": mask, "input_type_ids": types}
        a, b = engine.to_numpy(eager(inputs)), engine.to_numpy(graphs(inputs))
        for x, y in zip(a["encoder_outputs"], b["encoder_outputs"]):
            np.testing.assert_array_equal(x, y)
    state = graphs.fast_forward._graphs[(3, 33)]
    print("CUDA graph for (3, 33):", "captured" if isinstance(state, tuple) else f"not used ({state})")
    assert isinstance(state, tuple), "capture failed (see the warning)"


# ------------------------------------------------------------------------------------ benchmark

def test_bench_gpu_exits_clearly_without_a_gpu():
    import importlib.util
    import sys
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: this test is for machines without it")
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--random-weights"],
                            capture_output=True, text=True, timeout=120,
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert result.returncode == 2
    assert "needs CuPy and a CUDA GPU" in result.stderr


def test_bench_flops_products_only_and_plot(tmp_path, tiny_encoder):
    from benchmarks import bench_gpu
    base = ModelConfig(num_layers=12, hidden_size=768, num_heads=12, head_size=64, intermediate_size=3072,
                       vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
    # 12 blocks x (2*128*768*(3*768 + 768 + 2*3072) + 3072*768*2*128 + 4*12*128*128*64) + pooler
    assert bench_gpu.product_flops(base, 1, 128) == 12 * (2 * 128 * 768 * (4 * 768 + 3 * 3072)
                                                          + 4 * 12 * 128 * 128 * 64) + 2 * 768 * 768
    fwd = gpu.GpuForward(tiny_encoder, ops="numpy")
    ids, mask, types = tiny_inputs()
    fwd.encode(ids, mask, types)
    fwd.products_only(fwd._workspace(*ids.shape))           # same shapes as the forward's products
    rows = [dict(batch=1, seq_length=128, precision=p, fused_tflops=1.0 + i, floor_tflops=2.0 + i)
            for i, p in enumerate(G.PRECISIONS)]
    bench_gpu.plot(rows, [(1, 128)], list(G.PRECISIONS), "test device", str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000
