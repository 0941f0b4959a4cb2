"""The fast path (engine/fast/forward.py) held to the readable one (engine/core) and to TF, by the
noise verdict of engine.tools.verdict, the engine's float64 run as the truth:

- fast vs readable, tiny (random and trained-like) and base reference models: the fast path as
  accurate as the readable one and their difference float32 noise, on every output;
- skip_padding=True vs the readable path on the real tokens (input_mask == 1) of every encoder
  output, pooled_output of rows whose position 0 is real, and mlm_logits at real positions; padded
  positions hold zeros;
- fast (dense and skip_padding) vs TensorFlow running the tiny SavedModels.
"""

import numpy as np
import pytest

import engine
from engine.fast import fused
from engine.tools import parity, verdict

CASES = [
    dict(batch=1, seq_length=1),
    dict(batch=1, seq_length=128, padding=False),
    dict(batch=4, seq_length=33, all_padding_row=True),
    dict(batch=3, seq_length=77),
    dict(batch=8, seq_length=64),
    dict(batch=2, seq_length=512),
]
BASE_CASES = [
    dict(batch=3, seq_length=40, all_padding_row=True),
    dict(batch=8, seq_length=128, padding=False),
    dict(batch=4, seq_length=128),
]


def _inputs(cfg, case, seed):
    rng = np.random.default_rng(seed)
    S = case["seq_length"]
    return parity.random_inputs(rng, case["batch"], S, cfg.vocab_size, padding=case.get("padding", True),
                                all_padding_row=case.get("all_padding_row", False), num_positions=min(S, 32))


def _real_tokens(outputs, mask, positions):
    """The outputs on real tokens only: encoder outputs at mask==1, pooled of rows with mask[:,0]==1,
    and mlm_logits at positions that are real tokens (flattened dict, as verdict.judge_all takes)."""
    real = mask.astype(bool)
    out = {f"encoder_outputs[{i}]": np.asarray(a)[real] for i, a in enumerate(outputs["encoder_outputs"])}
    out["sequence_output"] = np.asarray(outputs["sequence_output"])[real]
    out["pooled_output"] = np.asarray(outputs["pooled_output"])[real[:, 0]]
    if "mlm_logits" in outputs:
        b_idx = np.arange(mask.shape[0])[:, None].repeat(positions.shape[1], 1)
        out["mlm_logits"] = np.asarray(outputs["mlm_logits"])[real[b_idx, positions]]
    return out


def _assert_pass(judgements, label):
    print(f"{label}:\n{verdict.format_table(judgements)}")
    bad = [f"{j.name}: {j.status} {j.detail}" for j in judgements if not j.ok]
    assert not bad, "\n".join(bad)


def _check(fast, ref, exact, case, seed):
    """fast (float32) judged against ref (readable float32) with exact (readable float64) as the truth."""
    inputs = _inputs(ref.config, case, seed)
    want = engine.to_numpy(ref.mlm(inputs))
    got = engine.to_numpy(fast.mlm(inputs))
    truth = engine.to_numpy(exact.mlm(inputs))
    flat = parity.flatten_outputs
    # the float32 noise level: both float32 runs (the fused kernels are more accurate than the
    # readable float32 ones, e.g. layer norm in float64; that is not a failure of either)
    _assert_pass(verdict.judge_all(flat(got), flat(want), flat(truth), others=[flat(want)]),
                 f"\nfast vs readable {case}")
    skipped = engine.to_numpy(fast.mlm(inputs, skip_padding=True))
    mask, positions = inputs["input_mask"], inputs["masked_lm_positions"]
    _assert_pass(verdict.judge_all(_real_tokens(skipped, mask, positions), _real_tokens(want, mask, positions),
                                   _real_tokens(truth, mask, positions), others=[_real_tokens(want, mask, positions)]),
                 "skip_padding vs readable, real tokens")
    pad = ~mask.astype(bool)
    for out in skipped["encoder_outputs"]:
        assert np.all(out[pad] == 0)
    # the root call agrees with the .mlm call
    enc_inputs = {k: v for k, v in inputs.items() if k != "masked_lm_positions"}
    root = engine.to_numpy(fast(enc_inputs))
    np.testing.assert_array_equal(root["sequence_output"], got["sequence_output"])
    np.testing.assert_array_equal(root["default"], root["pooled_output"])


MODELS = ["random", "trained"]


@pytest.fixture(scope="module", params=MODELS)
def tiny_model(request):
    """(savedmodel, fast, readable, float64) for the tiny random and trained-like models."""
    savedmodel = request.getfixturevalue("tiny_savedmodel" if request.param == "random" else "tiny_trained_savedmodel")
    h5 = request.getfixturevalue("tiny_h5" if request.param == "random" else "tiny_trained_h5")
    return savedmodel, engine.load(h5, fast=True), engine.load(h5), engine.load(h5, dtype="float64")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['batch']}xS{c['seq_length']}")
def test_tiny_fast_matches_readable(tiny_model, case):
    _, fast, ref, exact = tiny_model
    _check(fast, ref, exact, case, seed=case["seq_length"])


@pytest.mark.slow
@pytest.mark.parametrize("model", [pytest.param("random", marks=pytest.mark.exhaustive), "trained"])
def test_base_fast_matches_readable(model, request):
    h5 = request.getfixturevalue("base_h5" if model == "random" else "base_trained_h5")
    fast, ref, exact = engine.load(h5, fast=True), engine.load(h5), engine.load(h5, dtype="float64")
    for i, case in enumerate(BASE_CASES):
        _check(fast, ref, exact, case, seed=200 + i)


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: f"B{c['batch']}xS{c['seq_length']}")
def test_tiny_fast_matches_tensorflow(tiny_model, case):
    from engine.tf import reference
    savedmodel, fast, readable, exact = tiny_model
    inputs = _inputs(fast.config, case, seed=1000 + case["seq_length"])
    theirs = reference.run_savedmodel(savedmodel, inputs)
    truth = engine.to_numpy(exact.mlm(inputs))
    other = engine.to_numpy(readable.mlm(inputs))     # the engine's other float32 run: the noise level
    flat = parity.flatten_outputs
    _assert_pass(verdict.judge_all(flat(engine.to_numpy(fast.mlm(inputs))), flat(theirs), flat(truth),
                                   others=[flat(other)]), f"\nfast vs TF {case}")
    mask, positions = inputs["input_mask"], inputs["masked_lm_positions"]
    skipped = engine.to_numpy(fast.mlm(inputs, skip_padding=True))
    _assert_pass(verdict.judge_all(_real_tokens(skipped, mask, positions), _real_tokens(theirs, mask, positions),
                                   _real_tokens(truth, mask, positions), others=[_real_tokens(other, mask, positions)]),
                 "skip_padding vs TF, real tokens")


def test_skip_padding_needs_fast(tiny_h5):
    enc = engine.load(tiny_h5)
    inputs = _inputs(enc.config, dict(batch=2, seq_length=8), seed=0)
    inputs.pop("masked_lm_positions")
    with pytest.raises(ValueError, match="fast"):
        enc(inputs, skip_padding=True)


def test_fast_twin_leaves_the_model_alone_and_keeps_the_readable_path(tiny_h5):
    """Building the fast twin changes none of the model's arrays (the same objects, C order, the
    file's values), the twin's product matrices share no memory with them, and the readable path
    (mlm(record=...)) gives the readable results bit for bit."""
    import weights
    loaded = weights.load(tiny_h5)
    fast, ref = engine.load(tiny_h5, fast=True), engine.load(tiny_h5)
    model_arrays = fast.parameters()
    for path, a in model_arrays.items():
        assert a.flags.c_contiguous, path
        np.testing.assert_array_equal(a, loaded.tensors[path], err_msg=path)
    twin = fast.fast_forward
    for blk in twin.blocks:
        held = list(blk.packed.values()) if blk.packed is not None else [getattr(blk, n) for n in blk.MATRICES]
        arrays = [a for m in held for a in ((m.panels, m.tail) if hasattr(m, "panels") else (m,)) if a is not None]
        assert not any(np.shares_memory(a, b) for a in arrays for b in model_arrays.values())
    inputs = _inputs(ref.config, dict(batch=2, seq_length=16), seed=3)
    rec = []
    via_readable = engine.to_numpy(fast.mlm(inputs, record=lambda n, v: rec.append(n)))
    want = engine.to_numpy(ref.mlm(inputs))
    assert rec
    for k, v in parity.flatten_outputs(want).items():   # the very same computation: bit for bit
        np.testing.assert_array_equal(parity.flatten_outputs(via_readable)[k], v)


@pytest.mark.parametrize("packed", [True, False])
def test_fast_load_holds_the_block_matrices_once(tiny_h5, packed, monkeypatch):
    """engine.load(fast=True) keeps the file's arrays as the model's own (float32: no copy), the twin
    one derived copy of the block matrices (the packed panels alone when packing, else the fused
    matrices in Fortran order), and lets the readable copies of those matrices go; reading the
    readable blocks (parameters()) restores them exactly, and from then on both are held."""
    import weakref
    import weights
    from engine.api import PRODUCT_MATRICES
    from engine.fast import gemm
    originals, values = {}, {}
    real_load = weights.load

    def load_and_watch(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        originals.update({name: weakref.ref(a) for name, a in loaded.tensors.items()})
        values.update({name: a.copy() for name, a in loaded.tensors.items()})
        return loaded
    monkeypatch.setattr(weights, "load", load_and_watch)
    fast = engine.load(tiny_h5, fast=True, packed=packed)
    held = [getattr(getattr(b, part), field) for b in fast._blocks for part, field in PRODUCT_MATRICES]
    assert all(a is None for a in held), "the readable product matrices are let go"
    twin_bytes = 0
    for blk in fast.fast_forward.blocks:
        if blk.packed is not None:
            assert all(getattr(blk, n) is None for n in blk.MATRICES)
            twin_bytes += sum(m.panels.nbytes + (0 if m.tail is None else m.tail.nbytes) for m in blk.packed.values())
        else:
            twin_bytes += sum(getattr(blk, n).nbytes for n in blk.MATRICES)
    assert (fast.fast_forward.blocks[0].packed is not None) == (packed and gemm.enabled())
    kernels = [p for p in values if p.startswith("layers/") and p.endswith("/kernel")]
    file_bytes = sum(values[p].nbytes for p in kernels)
    print(f"packed={packed}: block matrices {file_bytes} bytes in the file, {twin_bytes} in the twin, "
          f"{sum(originals[p]() is not None for p in kernels)} readable kept")
    assert twin_bytes == file_bytes
    assert all(originals[p]() is None for p in kernels), "nothing else keeps a readable matrix alive"
    params = fast.parameters()                                   # restores the readable copies
    assert all(np.array_equal(params[p], values[p]) for p in values), "restored exactly"
    assert all(originals[p]() is params[p] for p in values if p not in kernels), "the rest is the file's arrays"
    fast.weights_changed()
    assert fast.fast_forward is not None and fast._blocks[0].attention.query_kernel is not None, "both held now"


def test_fast_numpy_only(tiny_h5):
    """Refused for what it is (the fast path is NumPy's), before CuPy is looked for: this holds on
    machines with and without CuPy (a BackendError for missing CuPy would not satisfy it)."""
    import weights
    loaded = weights.load(tiny_h5)
    with pytest.raises(ValueError, match="fast=True is the NumPy CPU path"):
        engine.Encoder(loaded.config, loaded.tensors, backend="cupy", fast=True)


@pytest.mark.parametrize("skip_padding", [False, True])
def test_asking_for_fewer_outputs_gives_the_same_numbers(tiny_h5, skip_padding):
    """outputs=(...) lets the fast path keep only the last block (the very same numbers as the full
    call, bit for bit) or compute its last block at the [CLS] tokens only (the same within float32
    noise: other product shapes round differently); unknown names are refused."""
    fast = engine.load(tiny_h5, fast=True)
    inputs = _inputs(fast.config, dict(batch=4, seq_length=33, all_padding_row=True), seed=9)
    inputs.pop("masked_lm_positions")
    full = fast(inputs, skip_padding=skip_padding)
    last = fast(inputs, skip_padding=skip_padding, outputs=("sequence_output", "pooled_output"))
    pooled = fast(inputs, skip_padding=skip_padding, outputs=("pooled_output",))
    assert set(pooled) == {"pooled_output"} and set(last) == {"sequence_output", "pooled_output"}
    np.testing.assert_array_equal(last["sequence_output"], full["sequence_output"])
    np.testing.assert_array_equal(last["pooled_output"], full["pooled_output"])
    exact = engine.load(tiny_h5, dtype="float64")(inputs)["pooled_output"]
    real_cls = inputs["input_mask"][:, 0] == 1 if skip_padding else slice(None)
    j = verdict.judge("pooled_output", pooled["pooled_output"][real_cls], full["pooled_output"][real_cls],
                      exact[real_cls])
    assert j.ok, j.detail
    if skip_padding:   # a row whose position 0 is padding: the zero vector through the pooler, as the full call
        np.testing.assert_array_equal(pooled["pooled_output"][~real_cls], full["pooled_output"][~real_cls])
    readable = engine.load(tiny_h5)(inputs, outputs=("default",))
    assert set(readable) == {"default"}
    with pytest.raises(ValueError, match="unknown"):
        fast(inputs, outputs=("logits",))


# ------------------------------------------------------------------ fused kernels (engine/fast/fused.py)

needs_numba = pytest.mark.skipif(not fused.enabled(), reason=f"fused kernels {fused.status()}")


@needs_numba
@pytest.mark.parametrize("rows,width", [(1, 8), (37, 96), (200, 768)])
def test_fused_kernels_against_float64(rows, width):
    """Each fused kernel against the float64 formula: layer norm at least as accurate as the readable
    float32 kernel, the GEGLU within 1.5x its error (same formula, other roundings), measured."""
    from engine.core import kernels as K
    rng = np.random.default_rng(rows)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    a, bias, residual, gamma, beta = f32(rows, width), f32(width), f32(rows, width) + 5, f32(width), f32(width)
    out = np.empty_like(a)
    fused.add_layer_norm_rows(a, bias, residual, gamma, beta, 1e-12, out, 0, rows)
    x64 = a.astype(np.float64) + bias + residual
    exact = K.layer_norm(x64, gamma.astype(np.float64), beta.astype(np.float64), 1e-12)
    readable = K.layer_norm((a + bias) + residual, gamma, beta, 1e-12)
    err, ref_err = (float(np.abs(y - exact).max() / np.abs(exact).max()) for y in (out, readable))
    print(f"\nlayer norm {rows}x{width}: fused {err:.2e}, readable float32 {ref_err:.2e}")
    assert err <= ref_err
    hg, bi, bg = f32(rows, 2 * width) * 3, f32(width), f32(width)

    def geglu(intermediate_bias):
        out, u = np.empty((rows, width), np.float32), np.empty((rows, width), np.float32)
        fused.geglu_argument_rows(hg, intermediate_bias, u, 0, rows, np.float32(K.SQRT_2_OVER_PI),
                                  np.float32(K.GELU_TANH_COEFF))
        np.tanh(u, out=u)
        fused.geglu_finish_rows(hg, intermediate_bias, bg, u, out, 0, rows)
        return out
    out = geglu(bi)
    h64, g64 = hg[:, :width].astype(np.float64) + bi, hg[:, width:].astype(np.float64) + bg
    exact = K.gelu_tanh(h64) * g64
    readable = K.gelu_tanh(hg[:, :width] + bi) * (hg[:, width:] + bg)
    err, ref_err = (float(np.abs(y - exact).max() / np.abs(exact).max()) for y in (out, readable))
    print(f"geglu {rows}x{width}: fused {err:.2e}, readable float32 {ref_err:.2e}")
    assert err <= 1.5 * ref_err + 1e-8
    # a value changed by one part in 1e4 moves the output by far more than the noise: teeth
    moved = geglu(bi * np.float32(1 + 1e-4))
    assert np.abs(moved - out).max() > 10 * np.abs(out - exact).max()


@needs_numba
@pytest.mark.parametrize("masked", [False, True])
def test_fused_softmax_against_float64(masked):
    """The fast forward's softmax (two Numba passes around np.exp) against the float64 formula: at
    least as accurate as the readable float32 kernel (engine.core.kernels.masked_softmax), a row whose
    keys are all masked uniform as in the model, and a logit moved by 1e-4 seen (teeth)."""
    from engine.core import kernels as K
    rng = np.random.default_rng(7)
    R, T = 96, 77
    logits = (rng.standard_normal((R, T)) * 4).astype(np.float32)
    adder = np.zeros(T, np.float32)
    if masked:
        adder[50:] = np.float32(-1e9)

    def fast_softmax(x):
        x = x.copy()
        fused.softmax_shift_rows(x, adder, masked)
        np.exp(x, out=x)
        fused.softmax_normalize_rows(x)
        return x
    got = fast_softmax(logits)
    exact = K.masked_softmax(logits.astype(np.float64), adder.astype(np.float64))
    readable = K.masked_softmax(logits, adder)
    err, ref_err = (float(np.abs(y - exact).max()) for y in (got, readable))
    print(f"\nsoftmax {R}x{T} masked={masked}: fused {err:.2e}, readable float32 {ref_err:.2e}")
    assert err <= ref_err
    if masked:
        assert np.all(got[:, 50:] == 0)
        everything = fast_softmax(np.full((1, T), 3.0, np.float32) + np.where(adder != 0, 0, np.float32(-1e9)))
        np.testing.assert_allclose(everything, np.full((1, T), 1.0 / T), rtol=1e-6)
    moved = logits.copy()
    moved[3, 5] *= np.float32(1 + 1e-4)
    assert np.abs(fast_softmax(moved) - got).max() > 10 * err


@pytest.mark.parametrize("threads", [2, 3])
def test_attention_split_by_queries_matches_readable(tiny_h5, threads):
    """With fewer sequences than threads the fast forward cuts each sequence's queries into one part
    per thread (engine/fast/forward.py FastEncoder._attention); uneven parts (77 queries over 3
    threads), dense and skip_padding, held to the readable path by the same verdict."""
    from engine.fast.threads import blas_thread_setter
    if blas_thread_setter() is None:
        pytest.skip("OpenBLAS's thread setter not found: the fast path does not split its work")
    fast = engine.load(tiny_h5, fast=True, threads=threads)
    ref, exact = engine.load(tiny_h5), engine.load(tiny_h5, dtype="float64")
    assert fast.fast_forward.settings.threads == threads
    for case in (dict(batch=1, seq_length=77), dict(batch=2, seq_length=50, padding=True)):
        _check(fast, ref, exact, case, seed=threads)


@pytest.mark.parametrize("model", MODELS)
def test_numpy_fallback_matches_fused(model, request, monkeypatch):
    """fused=False (what runs without Numba) gives the fast path's outputs within float32 noise of
    the fused kernels, both judged against the float64 engine with TF's noise level unused: the
    fallback must pass the same verdict as the default against the readable path. No Numba kernel
    runs (each raises if called), and the tape gets the readable kernel set."""
    from engine.fast import tape_kernels
    h5 = request.getfixturevalue("tiny_h5" if model == "random" else "tiny_trained_h5")
    fast, ref, exact = engine.load(h5, fast=True, fused=False), engine.load(h5), engine.load(h5, dtype="float64")

    def refuse(*args):
        raise AssertionError("a fused kernel ran with fused=False")
    for name in ("add_layer_norm_rows", "geglu_argument_rows", "geglu_finish_rows", "softmax_shift_rows"):
        monkeypatch.setattr(fused, name, refuse, raising=False)
    assert tape_kernels.for_encoder(fast) is tape_kernels.READABLE_KERNELS
    _check(fast, ref, exact, dict(batch=4, seq_length=33, all_padding_row=True), seed=5)


@pytest.mark.parametrize("model", MODELS)
def test_openblas_products_match_packed(model, request):
    """The fast path's products run the packed kernel of engine/fast/gemm.py by default (float32 with
    Numba); with packed=False they are np.matmul (OpenBLAS) and the qkv bias a separate add. Both
    pass the verdict against the readable path."""
    from engine.fast import gemm
    h5 = request.getfixturevalue("tiny_h5" if model == "random" else "tiny_trained_h5")
    fast, ref, exact = engine.load(h5, fast=True), engine.load(h5), engine.load(h5, dtype="float64")
    assert (fast.fast_forward.blocks[0].packed is not None) == gemm.enabled()
    case = dict(batch=4, seq_length=33, all_padding_row=True)
    _check(fast, ref, exact, case, seed=6)
    unpacked = engine.load(h5, fast=True, packed=False)
    assert all(blk.packed is None for blk in unpacked.fast_forward.blocks)
    _check(unpacked, ref, exact, case, seed=6)


def test_small_work_runs_on_one_thread_with_the_same_bits(tiny_h5):
    """adapt_threads: a call gets one thread per engine.fast.threads.MIN_FLOPS_PER_THREAD of its
    products (the tiny model's calls: one), a base-size 8x128 call all of them; the outputs do not
    depend on the count (every element is computed by one thread either way)."""
    from engine.fast import threads as threads_mod
    assert threads_mod.threads_for_work(2, 2.0 * 8 * 128 * 85e6) == 2
    assert threads_mod.threads_for_work(2, 1.4e9) == 1 and threads_mod.threads_for_work(8, 0) == 1
    rng = np.random.default_rng(3)
    x = {"input_word_ids": rng.integers(1, 1000, (4, 40)).astype(np.int32),
         "input_mask": np.ones((4, 40), np.int32), "input_type_ids": np.zeros((4, 40), np.int32)}
    adapted = engine.load(tiny_h5, fast=True, threads=2)
    fixed = engine.load(tiny_h5, fast=True, threads=2, adapt_threads=False)
    a, b = adapted(x), fixed(x)
    assert adapted.fast_forward._call_threads == 1 and fixed.fast_forward._call_threads == 2
    for name in ("sequence_output", "pooled_output"):
        assert np.array_equal(a[name], b[name]), name
