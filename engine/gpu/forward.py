"""The fused GPU forward pass: the encoder of engine.core.model in 12 launches per block, a twin
that derives its own arrays from the model's weights at load (never changing the model's).

`engine.Encoder(..., backend="cupy")` uses it for its float32 encoder (float64, the MLM head and
traced calls take the plain path); the setting gpu_path="plain" (engine.core.settings) forces the
plain path. Per block:

    qkv   = x_c · [Wq|Wk|Wv]                                  cuBLAS   [B*S,3H] f32   (merged product)
    q,k,v = split_heads(qkv + [bq|bk|bv])                     kernel   [B,N,S,D] c
    s     = q · k^T                                           cuBLAS   [B,N,S,T] f32  (batched)
    p     = talking_heads_softmax(s)                          kernel   [B,N,S,T] c    (scale, pre-mix,
                                                                                        mask, softmax, post-mix)
    ctx   = p · v                                             cuBLAS   [B,N,S,D] c    (batched)
    ctx   = merge_heads(ctx)                                  kernel   [B,S,H] c
    a     = ctx · Wo                                          cuBLAS   [B*S,H] f32
    x1    = LN((a + bo) + x)                                  kernel   f32 and c
    y     = x1_c · [Wi|Wg]                                    cuBLAS   [B*S,2I] f32   (merged product)
    h     = gelu(y[:, :I] + bi) * (y[:, I:] + bg)             kernel   [B*S,I] c
    f     = h · Wout                                          cuBLAS   [B*S,H] f32
    x     = LN((f + bout) + x1)                               kernel   f32 and c

"f32" is float32; "c" is the compute storage of the precision (engine.gpu.kernels: float32, tf32,
float16, bfloat16). The residual stream, every layer norm and softmax, and all accumulation stay in
float32; only the products' inputs are rounded. With precision "float32" there is no separate "c"
copy and no TF32 anywhere (explicit CUBLAS_COMPUTE_32F, whatever CUPY_TF32 says).

CUDA graphs (the setting `cuda_graphs=True`, opt-in): the first call of each input
shape runs eagerly, then captures the whole forward into a graph on a private stream; later calls of
that shape copy the inputs into the graph's buffers, launch the graph once and copy the outputs out.
If capture fails, that shape falls back to eager launches (and says so once, as a warning).

`GpuForward` is written against an "ops" object (engine.gpu.kernels.CudaOps or NumpyOps), so the same
forward runs on the CPU with the NumPy twins: that is how it is tested without a GPU.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from engine.gpu import kernels as G


class _Block:
    """One block's weights, merged for the fused path (its own arrays; the readable block is read)."""

    def __init__(self, w, ops, xp):
        a, f = w.attention, w.feedforward
        H, N, D = a.query_kernel.shape
        f32 = lambda x: xp.ascontiguousarray(x, dtype=np.float32)  # noqa: E731
        self.qkv_kernel = ops.to_compute(xp.concatenate(
            [k.reshape(H, N * D) for k in (a.query_kernel, a.key_kernel, a.value_kernel)], axis=1))   # [H,3H]
        self.qkv_bias = f32(xp.concatenate([b.reshape(N * D) for b in (a.query_bias, a.key_bias, a.value_bias)]))
        self.pre, self.post = f32(a.pre_softmax_weight), f32(a.post_softmax_weight)                   # [N,N]
        self.out_kernel = ops.to_compute(a.output_kernel.reshape(N * D, -1))                           # [H,H]
        self.out_bias = f32(a.output_bias)
        self.attention_ln = tuple(f32(t) for t in w.attention_ln)
        self.ig_kernel = ops.to_compute(xp.concatenate([f.intermediate_kernel, f.gate_kernel], axis=1))  # [H,2I]
        self.ig_bias = f32(xp.concatenate([f.intermediate_bias, f.gate_bias]))                          # [2I]
        self.ffn_kernel = ops.to_compute(f.output_kernel)                                               # [I,H]
        self.ffn_bias = f32(f.output_bias)
        self.feedforward_ln = tuple(f32(t) for t in w.feedforward_ln)


class _Workspace:
    """Every intermediate of one forward pass for one input shape, allocated once."""

    def __init__(self, ops, B, S, H, N, I, compute_copy):
        D = H // N
        e, ec = ops.empty, (lambda shape: ops.empty(shape, compute=True))
        self.ids, self.types, self.mask = (ops.xp.zeros((B, S), np.int32) for _ in range(3))
        self.x_c = ec((B, S, H)) if compute_copy else None        # compute copy of the block input
        self.x_mid = e((B, S, H))                                   # after the attention LN
        self.x_mid_c = ec((B, S, H)) if compute_copy else None
        self.qkv = e((B * S, 3 * H))
        self.q, self.k, self.v = ec((B, N, S, D)), ec((B, N, S, D)), ec((B, N, S, D))
        self.scores = e((B, N, S, S))
        self.probs = ec((B, N, S, S))
        self.ctx_heads = ec((B, N, S, D))
        self.ctx = ec((B, S, H))
        self.attn = e((B * S, H))
        self.y = e((B * S, 2 * I))
        self.h = ec((B * S, I))
        self.ffn = e((B * S, H))
        self.pool_pre = e((B, H))
        self.embeddings = e((B, S, H))


FUSED_FAMILY = "talking_heads+geglu+gelu_tanh"   # what the CUDA kernels of engine/gpu/kernels.cu compute


class GpuForward:
    """The fused encoder forward over a model's weights (an engine.core.model.Model), with CudaOps
    (GPU) or NumpyOps (CPU).

        fwd = GpuForward(model, precision="float32", ops="cuda", cuda_graphs=False)
        outputs, pooled = fwd.encode(ids, mask, types)     # device int arrays [B,S]
    `outputs` is the list of the L block outputs [B,S,H] float32, `pooled` [B,H] float32.
    """

    MAX_WORKSPACES = 4
    skips_padding = False

    def __init__(self, model, precision: str = "float32", ops: str = "cuda", cuda_graphs: bool = False):
        cfg = model.config
        if cfg.family != FUSED_FAMILY:
            raise ValueError(f"the fused GPU path runs {FUSED_FAMILY} models; this model is {cfg.family}: "
                             "load it with gpu_path='plain' (the readable model on CuPy)")
        self.precision = G.check_precision(precision)
        self.ops = G.CudaOps(self.precision) if ops == "cuda" else G.NumpyOps(self.precision)
        xp = self.ops.xp
        self.config = cfg
        self.H, self.N, self.I = cfg.hidden_size, cfg.num_heads, cfg.intermediate_size
        self.eps = float(cfg.layer_norm_epsilon)
        self.mask_constant = float(cfg.attention_mask_constant)
        self.scale = float(np.float32(1.0 / math.sqrt(float(cfg.head_size))))
        f32 = lambda x: xp.ascontiguousarray(x, dtype=np.float32)  # noqa: E731
        self.word, self.position, self.type_table = f32(model.word_table), f32(model.position_table), f32(model.type_table)
        self.embedding_ln = tuple(f32(t) for t in model.embedding_ln)
        self.blocks = [_Block(w, self.ops, xp) for w in model.blocks]
        self.pooler_kernel = self.ops.to_compute(model.pooler_kernel)
        self.pooler_bias = f32(model.pooler_bias)
        self.compute_copy = self.precision in ("float16", "bfloat16")
        self.cuda_graphs = bool(cuda_graphs) and ops == "cuda"
        self._workspaces = {}    # (B, S) -> _Workspace
        self._graphs = {}        # (B, S) -> (graph, stream, outputs, pooled) or None when capture failed

    # ------------------------------------------------------------------------------ one pass

    def _workspace(self, B, S):
        key = (B, S)
        if key not in self._workspaces:
            if len(self._workspaces) >= self.MAX_WORKSPACES:
                old = next(iter(self._workspaces))
                self._workspaces.pop(old)
                self._graphs.pop(old, None)
            self._workspaces[key] = _Workspace(self.ops, B, S, self.H, self.N, self.I, self.compute_copy)
        return self._workspaces[key]

    def _forward(self, ws, outputs, pooled):
        """The forward pass on ws.ids/types/mask into `outputs` (L arrays [B,S,H]) and `pooled` [B,H].
        Allocates nothing on the GPU."""
        o = self.ops
        B, S = ws.ids.shape
        H, N = self.H, self.N
        D = H // N
        BN, BS = B * N, B * S
        x, x_c = ws.embeddings, ws.x_c
        o.embed_layer_norm(ws.ids, ws.types, self.word, self.position, self.type_table, *self.embedding_ln,
                           self.eps, x, x_c)
        for blk, out in zip(self.blocks, outputs):
            xin = x if x_c is None else x_c                                               # products' input
            o.matmul(xin.reshape(BS, H), blk.qkv_kernel, ws.qkv)                          # [BS,3H]
            o.bias_split_heads(ws.qkv, blk.qkv_bias, ws.q, ws.k, ws.v)                    # [B,N,S,D] x3
            o.matmul(ws.q.reshape(BN, S, D), ws.k.reshape(BN, S, D), ws.scores.reshape(BN, S, S),
                     transpose_b=True)                                                    # [B,N,S,T]
            o.talking_heads_softmax(ws.scores, ws.mask, blk.pre, blk.post, self.scale, self.mask_constant,
                                    ws.probs)                                             # [B,N,S,T]
            o.matmul(ws.probs.reshape(BN, S, S), ws.v.reshape(BN, S, D), ws.ctx_heads.reshape(BN, S, D),
                     out_compute=True)                                                    # [B,N,S,D]
            o.merge_heads(ws.ctx_heads, ws.ctx)                                           # [B,S,H]
            o.matmul(ws.ctx.reshape(BS, H), blk.out_kernel, ws.attn)                      # [BS,H]
            o.layer_norm_residual(ws.attn, blk.out_bias, x.reshape(BS, H), *blk.attention_ln, self.eps,
                                  ws.x_mid.reshape(BS, H),
                                  None if ws.x_mid_c is None else ws.x_mid_c.reshape(BS, H))
            mid_in = ws.x_mid if ws.x_mid_c is None else ws.x_mid_c
            o.matmul(mid_in.reshape(BS, H), blk.ig_kernel, ws.y)                          # [BS,2I]
            o.geglu(ws.y, blk.ig_bias, ws.h)                                              # [BS,I]
            o.matmul(ws.h, blk.ffn_kernel, ws.ffn)                                        # [BS,H]
            o.layer_norm_residual(ws.ffn, blk.ffn_bias, ws.x_mid.reshape(BS, H), *blk.feedforward_ln, self.eps,
                                  out.reshape(BS, H), None if x_c is None else x_c.reshape(BS, H))
            x = out
        last = x if x_c is None else x_c
        o.matmul(last[:, 0], self.pooler_kernel, ws.pool_pre)                             # [B,H] (rows strided)
        o.bias_tanh(ws.pool_pre, self.pooler_bias, pooled)

    def products_only(self, ws):
        """The forward's matrix products alone, same shapes and storage, no other kernel: the
        cuBLAS floor that benchmarks/bench_gpu.py compares the fused pass with."""
        o = self.ops
        B, S = ws.ids.shape
        H, N = self.H, self.N
        D = H // N
        BN, BS = B * N, B * S
        xin = ws.embeddings if ws.x_c is None else ws.x_c
        mid = ws.x_mid if ws.x_mid_c is None else ws.x_mid_c
        for blk in self.blocks:
            o.matmul(xin.reshape(BS, H), blk.qkv_kernel, ws.qkv)
            o.matmul(ws.q.reshape(BN, S, D), ws.k.reshape(BN, S, D), ws.scores.reshape(BN, S, S), transpose_b=True)
            o.matmul(ws.probs.reshape(BN, S, S), ws.v.reshape(BN, S, D), ws.ctx_heads.reshape(BN, S, D),
                     out_compute=True)
            o.matmul(ws.ctx.reshape(BS, H), blk.out_kernel, ws.attn)
            o.matmul(mid.reshape(BS, H), blk.ig_kernel, ws.y)
            o.matmul(ws.h, blk.ffn_kernel, ws.ffn)
        o.matmul(xin[:, 0], self.pooler_kernel, ws.pool_pre)

    # ------------------------------------------------------------------------------ entry point

    def encode(self, ids, mask, types, skip_padding=False, keep="all"):
        """(encoder_outputs, pooled) for int arrays [B,S] of the ops' backend. Every position is
        computed (skips_padding is False: engine.Encoder refuses skip_padding=True before this);
        every block output is returned whatever `keep` says."""
        xp = self.ops.xp
        B, S = ids.shape
        ws = self._workspace(B, S)
        ws.ids[...] = ids
        ws.types[...] = types
        ws.mask[...] = mask
        if self.cuda_graphs:
            result = self._encode_graph(ws, (B, S))
            if result is not None:
                return result
        outputs = [xp.empty((B, S, self.H), np.float32) for _ in self.blocks]
        pooled = xp.empty((B, self.H), np.float32)
        self._forward(ws, outputs, pooled)
        return outputs, pooled

    def _encode_graph(self, ws, key):
        """Launches the captured graph for this shape (capturing it on the shape's second call).
        Returns None where it must run eagerly."""
        import cupy
        entry = self._graphs.get(key, "first")
        if entry is None:
            return None
        if entry == "first":          # first call of this shape: eager (compiles kernels, warms cuBLAS)
            self._graphs[key] = "capture"
            return None
        if entry == "capture":
            B, S = key
            outputs = [cupy.empty((B, S, self.H), np.float32) for _ in self.blocks]
            pooled = cupy.empty((B, self.H), np.float32)
            stream = cupy.cuda.Stream(non_blocking=True)
            cupy.cuda.get_current_stream().synchronize()
            try:
                with stream:
                    stream.begin_capture()
                    try:
                        self._forward(ws, outputs, pooled)
                    finally:
                        graph = stream.end_capture()
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
                warnings.warn(f"CUDA graph capture failed for shape {key}, running eagerly: {e}")
                self._graphs[key] = None
                return None
            entry = self._graphs[key] = (graph, stream, outputs, pooled)
        graph, stream, outputs, pooled = entry
        current = cupy.cuda.get_current_stream()
        ready = current.record()
        stream.wait_event(ready)                  # inputs copied on the current stream come first
        graph.launch(stream)
        done = stream.record()
        current.wait_event(done)
        # copies, so that the next call (which overwrites the graph's buffers) leaves these alone
        return [o.copy() for o in outputs], pooled.copy()
