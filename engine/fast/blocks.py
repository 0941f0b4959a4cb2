"""One block's weights in the fast layout (engine/fast/forward.py's twin of a readable block):
the product matrices fused and packed (or re-laid for np.matmul), the fused q/k/v bias, the scaled
W_pre^T; and the way back to the readable matrices (FastBlock.readable_matrices). Letters as in
engine.core.kernels."""

from __future__ import annotations

import math

import numpy as np

from engine.fast import gemm


def _side_by_side(parts, dtype, fortran, scratch=None):
    """The matrices [K,n_1], [K,n_2], ... as one [K,n_1+n_2+...] product matrix, in Fortran order
    (the transpose of a C-order array: what OpenBLAS multiplies fastest for few rows) or C order
    (what engine/fast/gemm.py packs from: one C-order part is itself, no copy; several are copied
    into `scratch` when given, a buffer reused from block to block)."""
    if len(parts) == 1 and not fortran:
        return np.ascontiguousarray(parts[0], dtype)
    K, N = parts[0].shape[0], sum(p.shape[1] for p in parts)
    if fortran:
        out = np.empty((N, K), dtype).T
    else:
        out = np.empty((K, N), dtype) if scratch is None else scratch[:K * N].reshape(K, N)
    start = 0
    for p in parts:
        out[:, start:start + p.shape[1]] = p
        start += p.shape[1]
    return out


class FastBlock:
    """One block's weights in the fast layout, derived from the readable block (whose arrays are
    read, never rebound or re-laid). The four product matrices are held either packed for
    engine/fast/gemm.py (`packed`, float32 with Numba; then no other copy of them) or in Fortran
    order for np.matmul (qkv_kernel, output_kernel, ff_kernel, out_kernel); the fused q/k/v bias
    and the scaled W_pre^T are its own; biases and layer norms are the readable block's arrays."""

    MATRICES = ("qkv_kernel", "output_kernel", "ff_kernel", "out_kernel")

    def __init__(self, block, config, dtype, packed: bool, scratch=None):
        a, f = block.attention, block.feedforward
        H, N, D = config.hidden_size, config.num_heads, config.head_size
        ND = N * D
        # Unpacked, every matrix is stored transposed ([out,in] in C order, used as its [in,out]
        # view): OpenBLAS multiplies x @ W^T-stored faster for few rows (measured at 128 rows, one
        # thread: 92 vs 75 GFLOP/s for [128,768]x[768,2304], 87 vs 77 for [768,6144]) and as fast
        # for many. Q, K and V are one product x·[Wq|Wk|Wv]; the GEGLU's inputs one x·[Wi|Wg].
        gated = f.gate_kernel is not None
        sources = {"qkv_kernel": [a.query_kernel.reshape(H, ND), a.key_kernel.reshape(H, ND),
                                  a.value_kernel.reshape(H, ND)],                  # [H,3ND]
                   "output_kernel": [a.output_kernel.reshape(ND, H)],              # [ND,H]
                   "ff_kernel": [f.intermediate_kernel, f.gate_kernel] if gated
                   else [f.intermediate_kernel],                                   # [H,2I] or [H,I]
                   "out_kernel": [f.output_kernel]}                                # [I,H]
        self.packed = {} if packed else None
        for name, parts in sources.items():   # packed, the panels are the one derived copy
            matrix = _side_by_side(parts, dtype, fortran=not packed, scratch=scratch)
            if packed:
                self.packed[name] = p = gemm.PackedMatrix(matrix)
                if p.tail is not None and scratch is not None and np.shares_memory(p.tail, scratch):
                    p.tail = p.tail.copy()          # the whole matrix when narrower than a panel
            setattr(self, name, None if packed else matrix)
        self.qkv_bias = np.concatenate([b.reshape(ND) for b in (a.query_bias, a.key_bias, a.value_bias)])  # [3ND]
        self.output_bias = a.output_bias
        # out = W^T @ x over the head axis; the score scale folded into W_pre (exact when D = 4^k).
        # W^T is kept in Fortran order (the transpose of a C-order W): OpenBLAS runs [N,N] @ [N,S*T]
        # about 100x faster with 2 threads that way than with a C-order W^T.
        # Without mixing weights (multi-head attention) the scale is applied as the readable
        # K.scale_scores does, and nothing is mixed.
        scale = 1.0 / math.sqrt(float(D))
        self.scale = dtype.type(scale)
        self.pre_t = self.post_t = None
        if a.pre_softmax_weight is not None:
            self.pre_t = np.ascontiguousarray(np.asarray(a.pre_softmax_weight, np.float64) * scale, dtype).T
            self.post_t = np.ascontiguousarray(a.post_softmax_weight, dtype).T
        self.attention_ln, self.feedforward_ln = block.attention_ln, block.feedforward_ln
        self.intermediate_bias, self.gate_bias = f.intermediate_bias, f.gate_bias
        self.out_bias = f.output_bias
        self.gated = gated

    def matrix(self, name):
        """The product matrix `name` (a MATRICES entry) as a [K,N] C-order array, unpacked from the
        panels (a copy: packing only moves values) or copied from the Fortran-order one."""
        if self.packed is None:
            return np.ascontiguousarray(getattr(self, name))
        return self.packed[name].to_dense()

    def readable_matrices(self, config) -> dict:
        """The readable block's product weights, rebuilt from this twin's matrices (exact copies):
        {(part, field): array} for engine.core.model.BlockWeights, e.g. ("attention", "query_kernel")
        [H,N,D]. What engine.Encoder restores after it let the readable copies go."""
        H, N, D, I = config.hidden_size, config.num_heads, config.head_size, config.intermediate_size
        ND = N * D
        qkv, ff = self.matrix("qkv_kernel"), self.matrix("ff_kernel")              # [H,3ND], [H,2I] or [H,I]
        out = {("attention", name + "_kernel"): qkv[:, j * ND:(j + 1) * ND].reshape(H, N, D).copy()
               for j, name in enumerate(("query", "key", "value"))}
        out[("attention", "output_kernel")] = self.matrix("output_kernel").reshape(N, D, H)
        out[("feedforward", "intermediate_kernel")] = ff[:, :I].copy()
        if self.gated:
            out[("feedforward", "gate_kernel")] = ff[:, I:].copy()
        out[("feedforward", "output_kernel")] = self.matrix("out_kernel")
        return out
