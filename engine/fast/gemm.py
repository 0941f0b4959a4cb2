"""Packed-weight matrix products of the fast path: out[T,N] = x[T,K] @ W[K,N] (+ bias), float32.

Why: with the weights cold in memory and few rows (one 128-token text is T = 128), OpenBLAS spends a
large share of each product re-packing W, every call. MLAS (ONNX Runtime) packs constant weights
once; this does the same. Each weight is packed once, when the fast path is built, into column
panels [N/NR, K, NR] (one panel's K x NR floats contiguous), and a register-tiled kernel computes an
MR x NR block of `out` per call: for k in 0..K-1, MR broadcasts of x[i, k] times the panel's row k
(NR/VL vectors), fused multiply-adds into MR*NR/VL vector accumulators that stay in registers;
x is read in place (row-major, no packing). The kernel is written in LLVM IR through Numba's
@intrinsic, because LLVM does not keep a loop-carried tile of accumulators in registers when it has
to find the vectors itself (measured: 2.5 and 6 GFLOP/s for two plain-Numba versions, vs 111).

Measured on the benchmark machine (2-core AVX-512 EPYC; the base model's four products over 12
layers, weights cold; two threads each taking half of the panels; benchmarks/bench_gemm.py):
187-197 GFLOP/s with 128 rows where OpenBLAS runs 153-156, 213 with 1024 rows where it runs 194-195;
warm in L2 one thread runs 113 (benchmarks/results/gemm.md).

Geometry, an argument (`wide`) of PackedMatrix: 512-bit, VL = 16 floats, MR = 8 rows, NR = 32
columns (16 accumulators); 256-bit, VL = 8, MR = 6, NR = 16 (12 accumulators, the AVX2 register
file). By default the CPU's: 512-bit where it has AVX-512 (host_is_wide()); LLVM splits vectors
wider than the CPU's, so either is correct anywhere (tests run both). N % NR trailing columns, and
the products the fast path does not pack (float64, Numba missing, the Settings' packed off), run
np.matmul.

Numerics: each output sums k = 0..K-1 in order in blocks of 256, one float32 accumulator per block
with fused multiply-adds, the block sums added in order (as a blocked BLAS adds its K blocks into
C), then + bias rounded once: the arithmetic of a BLAS sgemm followed by a bias add, at least as
accurate as OpenBLAS's (tests/test_gemm.py), and the same bits in either geometry. An inf or NaN
propagates as in NumPy (no fast-math flags).

    packed = PackedMatrix(w, wide=None)      # w [K,N] float32, any layout; wide: the geometry (None: the CPU's)
    packed(x, bias)                          # x @ w + bias as a new array (bias optional)
    packed.matmul(x, out, p0, p1, bias)      # out[:, panels p0..p1) = x @ w (+ bias [N]); releases the
                                             # GIL: engine.fast.threads.packed_product splits panels over threads
    packed.matmul_tail(x, out, bias)         # the columns past the last full panel (np.matmul)
"""

from __future__ import annotations

import functools

import numpy as np

from engine.fast import fused

numba = fused.numba


@functools.lru_cache(maxsize=None)
def host_is_wide() -> bool:
    """The CPU has AVX-512 (llvmlite's view of the host): the 512-bit geometry is its default."""
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except Exception:   # no llvmlite, or a host it cannot describe: the portable geometry
        return False


def enabled() -> bool:
    """Numba imports: the packed kernel can run (the Settings' packed says whether the fast path
    packs its weights)."""
    return numba is not None


def status(wide: bool | None = None) -> str:
    if not enabled():
        return "off: numba not importable; np.matmul (OpenBLAS) runs every product"
    wide = host_is_wide() if wide is None else wide
    return f"available: packed weights, {'8x32 tile of 16' if wide else '6x16 tile of 8'}-float vectors"


def _aligned_empty(shape, dtype=np.float32, align=64):
    """An uninitialized C-order array whose data starts on an `align`-byte boundary (whole cache lines)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + size].view(dtype).reshape(shape)


if numba is not None:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    def _make_tile(VL, MR, NR):
        """The register tile for one geometry, as a Numba intrinsic (see _tile_wide below)."""
        def tile(typingctx, x, panels, bias, out, x_off, lda, p_off, j0, c_off, ldc, K, rows, add_out, add_bias):
            return _tile_signature(VL, MR, NR, x, panels, bias, out, x_off, lda, p_off, j0, c_off, ldc, K, rows,
                                   add_out, add_bias)
        return intrinsic(tile)

    def _tile_signature(VL, MR, NR, x, panels, bias, out, x_off, lda, p_off, j0, c_off, ldc, K, rows, add_out,
                        add_bias):
        """s = sum over k < K of x[r, k] * panel[k, :] for the first `rows` of MR rows (x row r at
        x_off + r*lda; the panel at p_off, NR floats a row), then out[r, j0:j0+NR] (at c_off + r*ldc)
        = s, plus out's value first if add_out, plus bias[j0:j0+NR] last if add_bias."""
        i64 = types.intp
        sig = types.void(x, panels, bias, out, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64)

        def codegen(context, builder, signature, args):
            x_arr, p_arr, b_arr, o_arr, x_off, lda, p_off, j0, c_off, ldc, K, rows, add_out, add_bias = args
            f32, int64 = ir.FloatType(), ir.IntType(64)
            vec = ir.VectorType(f32, VL)
            const = lambda v: ir.Constant(int64, v)                                    # noqa: E731

            def data(i, value):
                return context.make_array(signature.args[i])(context, builder, value).data

            def load_vec(ptr):
                v = builder.load(builder.bitcast(ptr, vec.as_pointer()))
                v.align = 4
                return v

            x0 = builder.gep(data(0, x_arr), [x_off])
            panel = builder.gep(data(1, p_arr), [p_off])
            bias_at = builder.gep(data(2, b_arr), [j0])
            out0 = builder.gep(data(3, o_arr), [c_off])
            # rows past `rows` read row 0 again (valid memory); their sums are never stored
            x_rows = []
            for r in range(MR):
                valid = builder.icmp_signed("<", const(r), rows)
                x_rows.append(builder.gep(x0, [builder.mul(builder.select(valid, const(r), const(0)), lda)]))
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{VL}f32")
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), VL), [0] * VL)
            undef = ir.Constant(vec, ir.Undefined)
            zero = ir.Constant(vec, [0.0] * VL)
            nv = NR // VL

            entry = builder.block
            loop = builder.append_basic_block("tile.k")
            done = builder.append_basic_block("tile.store")
            builder.cbranch(builder.icmp_signed(">", K, const(0)), loop, done)

            builder.position_at_end(loop)
            k = builder.phi(int64)
            acc = [[builder.phi(vec) for _ in range(nv)] for _ in range(MR)]
            row_k = builder.gep(panel, [builder.mul(k, const(NR))])
            b = [load_vec(builder.gep(row_k, [const(j * VL)])) for j in range(nv)]
            summed = []
            for r in range(MR):
                a = builder.load(builder.gep(x_rows[r], [k]))
                a = builder.insert_element(undef, a, ir.Constant(ir.IntType(32), 0))
                a = builder.shuffle_vector(a, undef, splat_mask)                 # broadcast x[r, k]
                summed.append([builder.call(fma, [a, b[j], acc[r][j]]) for j in range(nv)])
            k_next = builder.add(k, const(1))
            latch = builder.block
            k.add_incoming(const(0), entry)
            k.add_incoming(k_next, latch)
            for r in range(MR):
                for j in range(nv):
                    acc[r][j].add_incoming(zero, entry)
                    acc[r][j].add_incoming(summed[r][j], latch)
            builder.cbranch(builder.icmp_signed("<", k_next, K), loop, done)

            builder.position_at_end(done)
            final = [[builder.phi(vec) for _ in range(nv)] for _ in range(MR)]
            for r in range(MR):
                for j in range(nv):
                    final[r][j].add_incoming(zero, entry)
                    final[r][j].add_incoming(summed[r][j], latch)
            with_out = builder.icmp_signed("!=", add_out, const(0))
            with_bias = builder.icmp_signed("!=", add_bias, const(0))
            bias_vecs = [load_vec(builder.gep(bias_at, [const(j * VL)])) for j in range(nv)]
            for r in range(MR):
                with builder.if_then(builder.icmp_signed("<", const(r), rows), likely=True):
                    row_out = builder.gep(out0, [builder.mul(const(r), ldc)])
                    for j in range(nv):
                        at = builder.bitcast(builder.gep(row_out, [const(j * VL)]), vec.as_pointer())
                        prev = builder.load(at)           # out's memory, used only when add_out
                        prev.align = 4
                        v = builder.select(with_out, builder.fadd(prev, final[r][j]), final[r][j])
                        v = builder.select(with_bias, builder.fadd(v, bias_vecs[j]), v)
                        builder.store(v, at).align = 4
            return context.get_dummy_value()

        return sig, codegen

    # rows per cache block: x's block (256 x K floats) stays in L2 while the panels stream past it
    _ROW_BLOCK = 256
    # k per partial sum: each output is the sum of ceil(K/256) float32 partial sums (as a blocked
    # BLAS adds its K blocks into C), not one running sum over all K, which loses more to rounding
    _K_BLOCK = 256

    # both geometries are compiled into the one cached function below and picked by an argument:
    # Numba's on-disk cache does not see module constants change, so none of them may select code
    _tile_wide, _tile_narrow = _make_tile(16, 8, 32), _make_tile(8, 6, 16)

    @numba.njit(nogil=True, cache=True)
    def _panels_product(x, panels, bias, out, p0, p1, wide):
        """out[:, p*NR:(p+1)*NR] = x @ panel p + bias, for the panels p0..p1-1. x [T,K] and out [T,N]
        with unit column stride; wide: the 512-bit geometry (MR 8, NR 32), else 256-bit (6, 16)."""
        MR, NR = (8, 32) if wide else (6, 16)
        T, K = x.shape
        lda = x.strides[0] // 4
        ldc = out.strides[0] // 4
        for r0 in range(0, T, _ROW_BLOCK):
            r1 = min(T, r0 + _ROW_BLOCK)
            for p in range(p0, p1):
                for i in range(r0, r1, MR):
                    rows = min(MR, r1 - i)
                    for k0 in range(0, max(K, 1), _K_BLOCK):
                        k1 = min(K, k0 + _K_BLOCK)
                        x_at, p_at, c_at = i * lda + k0, (p * K + k0) * NR, i * ldc + p * NR
                        if wide:
                            _tile_wide(x, panels, bias, out, x_at, lda, p_at, p * NR, c_at, ldc, k1 - k0, rows,
                                       k0 > 0, k1 >= K)
                        else:
                            _tile_narrow(x, panels, bias, out, x_at, lda, p_at, p * NR, c_at, ldc, k1 - k0, rows,
                                         k0 > 0, k1 >= K)


class PackedMatrix:
    """W [K,N] (float32) packed once into [N//NR, K, NR] panels, plus the N % NR columns left over.
    wide: the geometry, True for 512-bit vectors, False for 256-bit (None: host_is_wide()); tests
    pack both."""

    def __init__(self, w, wide: bool | None = None):
        w = np.asarray(w, np.float32)
        K, N = w.shape
        self.wide = host_is_wide() if wide is None else bool(wide)
        self.nr = NR = 32 if self.wide else 16
        self.shape = (K, N)
        self.num_panels = P = N // NR
        self.panels = _aligned_empty((P, K, NR))
        self.panels[...] = w[:, :P * NR].reshape(K, P, NR).transpose(1, 0, 2)      # [K,N] -> [P,K,NR]
        self.tail = np.ascontiguousarray(w[:, P * NR:]) if N > P * NR else None   # [K,N%NR]
        self.no_bias = np.zeros(N, np.float32)       # the tile always adds a bias row: zeros for none

    def to_dense(self):
        """W [K,N] again, C order: the panels and the tail copied back (exact: packing only moves values)."""
        K, N = self.shape
        P, NR = self.num_panels, self.nr
        w = np.empty((K, N), np.float32)
        w[:, :P * NR] = self.panels.transpose(1, 0, 2).reshape(K, P * NR)          # [P,K,NR] -> [K,P*NR]
        if self.tail is not None:
            w[:, P * NR:] = self.tail
        return w

    def matmul(self, x, out, p0, p1, bias=None):
        """out[:, p0*NR:p1*NR] = x @ W[:, same] (+ bias[same]); x [T,K], out [T,N] float32, each row
        contiguous; bias [N] float32 or None. Releases the GIL."""
        K, N = self.shape
        bias = self.no_bias if bias is None else bias
        if (x.dtype != np.float32 or out.dtype != np.float32 or x.ndim != 2 or x.shape[1] != K
                or out.shape != (x.shape[0], N) or (x.size > 1 and x.strides[1] != 4)
                or (out.size > 1 and out.strides[1] != 4)
                or bias.shape != (N,) or bias.dtype != np.float32 or not 0 <= p0 <= p1 <= self.num_panels):
            # the kernel reads and writes raw memory: a wrong shape or stride would not fail there
            raise ValueError(f"packed product: x {x.dtype}{x.shape} strides {x.strides}, out {out.dtype}{out.shape} "
                             f"strides {out.strides}, bias {bias.dtype}{bias.shape}, panels {p0}..{p1}: need float32 "
                             f"x [T,{K}] and out [T,{N}] with contiguous rows, bias [{N}], 0 <= p0 <= p1 <= "
                             f"{self.num_panels}")
        if x.shape[0] and p1 > p0:
            _panels_product(x, self.panels, bias, out, p0, p1, self.wide)

    def matmul_tail(self, x, out, bias=None):
        """The columns past the last full panel: out[:, P*NR:] = x @ W[:, P*NR:] (+ bias[P*NR:])."""
        if self.tail is not None:
            c = self.num_panels * self.nr
            np.matmul(x, self.tail, out=out[:, c:])
            if bias is not None:
                np.add(out[:, c:], bias[c:], out=out[:, c:])

    def __call__(self, x, bias=None):
        """x @ W (+ bias) as a new array, on this thread: [T,K] -> [T,N] (tests, benchmarks)."""
        x = np.ascontiguousarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.shape[0]:
            raise ValueError(f"x: shape {x.shape}, expected [T,{self.shape[0]}]")
        bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
        out = np.empty((x.shape[0], self.shape[1]), np.float32)
        self.matmul(x, out, 0, self.num_panels, bias)
        self.matmul_tail(x, out, bias)
        return out
