"""The packed-weight product of the fast path (engine/fast/gemm.py), against NumPy in float64 (the
truth) and against OpenBLAS's float32 np.matmul (what it replaces): at least as accurate, on both
vector geometries, on every shape edge the kernel has (rows past a whole tile, columns past a whole
panel, K past one partial-sum block, rows past one cache block)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from engine.fast import gemm

pytestmark = pytest.mark.skipif(gemm.numba is None, reason="Numba is not importable: the packed kernel is off")

# (T, K, N): one of each edge; K = 768 and 3072 are the base model's
SHAPES = [(1, 1, 1), (5, 3, 17), (13, 257, 70), (300, 768, 96), (128, 3072, 48), (9, 64, 512), (7, 513, 33),
          (8, 16, 32), (0, 8, 64)]


def _rms(e):
    return float(np.sqrt(np.mean(np.square(e)))) if e.size else 0.0


@pytest.mark.parametrize("wide", [True, False], ids=["512bit", "256bit"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_packed_product_against_float64(shape, wide):
    T, K, N = shape
    rng = np.random.default_rng(T * 1000 + K + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[:, 0] *= 20                                          # an outlier dimension, as trained models have
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    packed = gemm.PackedMatrix(w, wide=wide)
    got = packed(x, b)
    # the fast path's threaded call (panels over a pool of two, then the tail): the same bits
    from engine.fast.threads import packed_product
    threaded = np.empty_like(got)
    packed_product(packed, x, threaded, b, threads=2)
    np.testing.assert_array_equal(threaded, got)
    truth = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    blas = x @ w + b
    err, blas_err = _rms(got - truth), _rms(blas - truth)
    print(f"{shape} {'512' if wide else '256'}-bit: rms error {err:.3g} (OpenBLAS {blas_err:.3g}), "
          f"max {np.abs(got - truth).max() if T else 0:.3g} (OpenBLAS {np.abs(blas - truth).max() if T else 0:.3g})")
    assert got.shape == (T, N) and got.dtype == np.float32
    # as accurate as OpenBLAS's sgemm + bias add (measured: 0.76-1.00x its RMS error); a dropped
    # partial sum, tile row, panel or bias is off by O(1), 1e6x this
    assert err <= 1.05 * blas_err + 1e-9
    assert np.abs(got - truth).max(initial=0) <= 2 * np.abs(blas - truth).max(initial=0) + 1e-9


def test_geometries_give_the_same_bits():
    """Each output is the same sequence of float32 operations in either geometry (K in the same
    blocks, in order), so the two agree bit for bit: what a user sees does not depend on the CPU."""
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((37, 700), (700, 96), (96,)))
    np.testing.assert_array_equal(gemm.PackedMatrix(w, wide=True)(x, b), gemm.PackedMatrix(w, wide=False)(x, b))


@pytest.mark.parametrize("wide", [True, False], ids=["512bit", "256bit"])
def test_packed_product_propagates_nan_and_inf(wide):
    """No finite-math assumption: a NaN in x poisons its row only; an inf weight makes its column
    inf (or NaN where it meets a zero), as np.matmul does."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((11, 300)).astype(np.float32), rng.standard_normal((300, 40)).astype(np.float32)
    x[3, 200] = np.nan
    w[5, 7] = np.inf
    x[6, 5] = 0.0
    with np.errstate(invalid="ignore"):
        got, want = gemm.PackedMatrix(w, wide=wide)(x), x @ w
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert np.isnan(got[3]).all() and np.isnan(got[6, 7]) and np.isfinite(np.delete(got, [3], 0)[:, :7]).all()


def test_packed_product_names_a_bad_input():
    p = gemm.PackedMatrix(np.ones((8, 40), np.float32))
    with pytest.raises(ValueError, match=r"x: shape \(3, 9\), expected \[T,8\]"):
        p(np.ones((3, 9), np.float32))


def test_packed_product_refuses_what_the_kernel_would_misread():
    """matmul() hands raw pointers to the kernel: a strided x, a wrong out shape, a short bias or a
    panel range past the end is refused before it runs."""
    p = gemm.PackedMatrix(np.ones((8, 64), np.float32))
    x, out, bias = np.ones((3, 8), np.float32), np.empty((3, 64), np.float32), np.zeros(64, np.float32)
    p.matmul(x, out, 0, p.num_panels, bias)
    bad = [dict(x=np.ones((3, 16), np.float32)[:, ::2]), dict(out=np.empty((3, 128), np.float32)[:, ::2]),
           dict(out=np.empty((4, 64), np.float32)), dict(bias=np.zeros(32, np.float32)),
           dict(x=np.ones((3, 8))), dict(p1=p.num_panels + 1)]
    for change in bad:
        args = {**dict(x=x, out=out, p0=0, p1=p.num_panels, bias=bias), **change}
        with pytest.raises(ValueError, match="packed product"):
            p.matmul(args["x"], args["out"], args["p0"], args["p1"], args["bias"])


def test_geometry_chosen_by_argument_in_fresh_processes():
    """PackedMatrix(w, wide=...) picks the geometry; Numba's on-disk cache must not hand one process
    the other geometry's compiled code (it does not see module constants change, which is why both
    geometries live in one cached function, picked by an argument). Each process checks its product
    against float64; run 256 -> 512 -> 256 so a stale cache entry would be used in the second or
    third."""
    code = ("import sys, numpy as np; from engine.fast import gemm\n"
            "wide = sys.argv[1] == '512'\n"
            "rng = np.random.default_rng(0); x = rng.standard_normal((21, 300), dtype=np.float32)\n"
            "w = rng.standard_normal((300, 100), dtype=np.float32); p = gemm.PackedMatrix(w, wide=wide)\n"
            "err = np.abs(p(x) - x.astype(np.float64) @ w.astype(np.float64)).max()\n"
            "print(gemm.status(wide), p.nr, err); assert err < 1e-3, err\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for bits, nr in (("256", 16), ("512", 32), ("256", 16)):
        run = subprocess.run([sys.executable, "-c", code, bits], cwd=root, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        print(bits, run.stdout.strip())
        assert f" {nr} " in run.stdout
