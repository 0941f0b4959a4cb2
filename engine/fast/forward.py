"""The fast CPU path: the same model as engine.core.kernels + engine.core.model, arranged for speed (NumPy only).

    enc = engine.load("model.h5", fast=True)
    enc(inputs)                          # same outputs as the readable path, within 1e-5 relative
    enc(inputs, skip_padding=True)       # opt-in: computes the real tokens only (see below)

What differs from the readable path (engine.core.kernels), and why the numbers stay the same:
- Q, K and V are one product x·[Wq|Wk|Wv] ([T,H] @ [H,3*N*D]); the GEGLU's two input products are
  one product x·[Wi|Wg] ([T,H] @ [H,2*I]). These fused matrices are this twin's own, derived from
  the readable model's weights at load (which it never rebinds). The four dense products of a
  block run the packed-weight kernel of engine/fast/gemm.py (float32 with Numba, unless packed
  products are turned off): each weight is packed once, here, into column panels, and the panels
  are split over the threads; the q/k/v bias is added as the tile is stored. The panels are then
  the one copy of the block matrices the twin holds (about the encoder blocks' size again beside
  the model's: +430 MB peak RSS at base size), for 0.79x the time at 1x128 and 0.89x at 8x128
  (measured: benchmarks/results/gemm.md). Unpacked, the twin holds the fused matrices in Fortran order and
  every product is np.matmul with `out=` into preallocated buffers, split over the threads
  (nothing is allocated per layer). engine.Encoder rebuilds the twin from the model's arrays
  after they change (weights_changed(), which the Trainer calls after each step).
- Attention runs per sequence on strided views of the fused QKV output (no transposes, no copies):
  scores [N,S,T] = q·k^T; talking-heads mixing is one [N,N] @ [N,S*T] product on that contiguous
  layout; the 1/sqrt(D) scale is folded into W_pre (exact for D a power of two); the masked softmax
  is two fused passes around NumPy's exp; the context is written straight into a [S,N,D] buffer
  that is the input of the output projection. Sequences are spread over the threads; with fewer
  sequences than threads (one long text) each sequence's queries are cut into one part per thread.
- Element-wise work (biases, GELU, gate, residuals, layer norms; engine/fast/elementwise.py) runs
  on row blocks small enough to stay in cache, spread over the thread pool (BLAS is idle at those
  moments): as the fused Numba kernels of engine/fast/fused.py (add + layer norm in one pass with float64 statistics; the
  GEGLU around NumPy's tanh; the softmax around NumPy's exp, its row sums in float64) when Numba is
  there and the Settings' fused is on, else as in-place NumPy ufuncs (which release the GIL) in the
  readable kernels' order of operations.
- float32 (or float64) throughout, as the Encoder's dtype.

skip_padding=True packs the real tokens (input_mask == 1) of all rows into one [tokens,H] matrix,
runs the dense products on it only and attention per row on that row's real tokens only. Real
tokens' outputs equal the dense path's (padded keys get exactly zero probability there, in every
head, before and after the post-softmax mixing), within rounding. Padded positions are NOT
computed: in the returned sequence_output and encoder_outputs they hold zeros, and pooled_output
of a row whose position 0 is padding (an all-padding row, or left padding) is tanh(bias) of the
zero vector, unlike TensorFlow's. Only real tokens (and pooled_output of rows whose position 0 is
real, which is every row the Hub preprocessor makes) match the reference.

Settings (engine.core.settings, resolved once at load, kept as .settings): threads, fused, packed,
blas. With threads > 1 and blas "pool" (the defaults on a multi-core machine) a call sets NumPy's
OpenBLAS to one thread, restoring the previous count after it, and runs the products' row or column
parts, the sequences' attention and the element-wise blocks on the pool of engine/fast/threads.py;
blas "native" leaves OpenBLAS's threading alone (the element-wise blocks still use the pool). Not
thread-safe: one Encoder, one call at a time (the workspace is reused between calls), and other
threads' NumPy products run single-threaded during a call.
"""

from __future__ import annotations

import mmap
import time

import numpy as np

from engine.core import kernels as K
from engine.core.settings import Settings
from engine.fast import elementwise, fused, gemm
from engine.fast.blocks import FastBlock
from weights.format import block_weight_count
from engine.fast.elementwise import masked_softmax_in_place
from engine.fast.threads import (blas_thread_setter, threads_for_work, packed_product, parallel_rows,
                                 single_threaded_blas, thread_pool)



def _touched_empty(shape, dtype):
    """np.empty whose pages are touched here, by one thread: the block outputs are new memory each
    call (the caller keeps them) written by the pool's threads, and page faults taken by two threads
    at once cost far more than by one (measured at base size: 0.97x the time at 8x512, 0.99x at
    8x128 with the touch). One write per 4 KiB page."""
    out = np.empty(shape, dtype)
    out.reshape(-1)[::4096 // out.itemsize] = 0
    return out


class FastEncoder:
    """The fast forward pass of an engine.core.model.Model (NumPy backend), a twin that owns the
    arrays it derives from the model's weights (see engine.fast.blocks.FastBlock) and reads the rest (embedding tables,
    layer norms, biases, pooler) from the model. Built by engine.Encoder(..., fast=True) /
    engine.load(..., fast=True), rebuilt by the Encoder after its weights change."""

    skips_padding = True     # encode(..., skip_padding=True) packs the real tokens

    def __init__(self, model, settings=None, on_block=None):
        """on_block(i), when given, is called once block i's twin is built (engine.Encoder lets the
        readable copies of its matrices go there, so the two are never all held at once)."""
        self.config = cfg = model.config
        self.dtype = np.dtype(model.dtype)
        self.encoder = model                       # the readable model whose twin this is
        self.settings = settings if settings is not None else Settings.resolve()
        packed = self.dtype == np.float32 and gemm.enabled() and self.settings.packed
        # packing reads each fused matrix from one scratch buffer, reused block after block, an
        # anonymous mapping unmapped when the last view of it goes (a freed malloc block of this
        # size would stay in the process's heap: +19 MB resident at base size, measured)
        H, ND, I = cfg.hidden_size, cfg.num_heads * cfg.head_size, cfg.intermediate_size
        size = H * max(3 * ND, (2 if cfg.gated else 1) * I)
        scratch = np.frombuffer(mmap.mmap(-1, size * self.dtype.itemsize), self.dtype, size) if packed else None
        self.blocks = []
        for i, b in enumerate(model.blocks):
            self.blocks.append(FastBlock(b, cfg, self.dtype, packed, scratch))
            if on_block is not None:
                on_block(i)
        del scratch
        t = self.dtype.type
        self._c = {"half": t(0.5), "one": t(1.0), "coeff": t(K.GELU_TANH_COEFF), "k": t(K.SQRT_2_OVER_PI), "minus_2k": t(-2.0 * K.SQRT_2_OVER_PI),
                   "eps": t(cfg.layer_norm_epsilon), "mask": t(cfg.attention_mask_constant)}
        self._work = {}
        self._split = False
        self._call_threads = self.settings.threads
        self.profile = None      # a dict to fill with seconds per kernel class (benchmarks); None: off
        self._last = 0.0

    def _mark(self, kind):
        """Profiling: charges the time since the previous mark to `kind` (no-op unless self.profile)."""
        if self.profile is not None:
            now = time.perf_counter()
            self.profile[kind] = self.profile.get(kind, 0.0) + now - self._last
            self._last = now

    # ------------------------------------------------------------------------ workspace

    def _buffer(self, name, shape):
        """A reusable scratch buffer of at least `shape` (contents undefined)."""
        size = int(np.prod(shape))
        buf = self._work.get(name)
        if buf is None or buf.size < size:
            buf = np.empty(size, self.dtype)
            self._work[name] = buf
        return buf[:size].reshape(shape)

    # ------------------------------------------------------------------------ element-wise stages

    def _fused(self) -> bool:
        """The Numba kernels of engine/fast/fused.py run the element-wise stages: float32, the
        Settings' fused, and Numba there."""
        return self.dtype == np.float32 and self.settings.fused and fused.enabled()

    def _threads(self) -> int:
        """The thread count of this call: the Settings' threads, or with adapt_threads one per
        engine.fast.threads.MIN_FLOPS_PER_THREAD of the call's products (chosen in encode)."""
        return self._call_threads

    def _rows(self, fn, rows, block):
        """engine.fast.threads.parallel_rows on this encoder's threads."""
        parallel_rows(fn, rows, block, self._threads())

    def _add_layer_norm(self, a, bias, residual, gamma, beta, out):
        """out = LN(a + bias + residual) row-wise (a is scratch: overwritten or not); a [T,H], out [T,H]."""
        elementwise.add_layer_norm(a, bias, residual, gamma, beta, self._c["eps"], out, self._threads(),
                                   self._fused(), self._buffer)

    def _activation(self, hg, blk, out):
        """The feed-forward's activation: gelu(h + bi) * (g + bg) with [h|g] = hg [T,2I] (GEGLU), or
        gelu(h + bi) of hg [T,I] (a dense feed-forward); out [T,I]."""
        elementwise.feedforward_activation(hg, blk.intermediate_bias, blk.gate_bias, out,
                                           self.config.hidden_activation, self._threads(), self._fused(),
                                           self._buffer)

    # ------------------------------------------------------------------------ attention

    def _attention(self, blk, qkv, ctx, spans, adders, first_query_only=False):
        """Per sequence: ctx[rows] = attention of qkv[rows]. qkv [T,3ND] (biased), ctx [T,ND].
        first_query_only: sequence i's first query alone, into ctx[i] (ctx [len(spans),ND]): for
        pooled_output alone the last block is needed at the [CLS] token only.

        Work units are (sequence, query rows) spread over the threads, costliest first, to the least
        loaded thread: whole sequences, or with fewer sequences than threads each sequence's queries
        cut into one part per thread (a query's scores, mixing, softmax and context depend on its
        own row of logits and on all keys and values: the parts are independent)."""
        N, D = self.config.num_heads, self.config.head_size
        ND = N * D
        n = self._threads() if self._split else 1
        lengths = [(i, e - s) for i, (s, e) in enumerate(spans) if e > s]
        if first_query_only:
            units = [(i, 0, 1, L) for i, L in lengths]                          # (seq, q0, q1, cost)
        else:
            parts = n if len(lengths) < n else 1
            units = [(i, L * j // parts, L * (j + 1) // parts, (L * (j + 1) // parts - L * j // parts) * L)
                     for i, L in lengths for j in range(parts) if L * (j + 1) // parts > L * j // parts]
        groups, load = [[] for _ in range(n)], [0] * n
        for unit in sorted(units, key=lambda u: -u[3]):
            w = load.index(min(load))
            groups[w].append(unit)
            load[w] += unit[3]
        longest = max((L for _, L in lengths), default=0)
        most_queries = max((q1 - q0 for _, q0, q1, _ in units), default=0)
        profiles = [dict() for _ in range(n)]
        use_fused = self._fused()

        def run(w):
            sbuf = self._buffer(f"scores{w}", (N * most_queries * longest,))
            mbuf = self._buffer(f"mixed{w}", (N * most_queries * longest,))
            prof = profiles[w] if self.profile is not None else None
            last = time.perf_counter()

            def mark(kind):
                nonlocal last
                if prof is not None:
                    now = time.perf_counter()
                    prof[kind] = prof.get(kind, 0.0) + now - last
                    last = now

            for i, q0, q1, _ in groups[w]:
                s, e = spans[i]
                adder = adders[i]
                L = e - s
                Q = q1 - q0                                                       # queries
                rows = qkv[s:e]
                q = rows[q0:q1, :ND].reshape(Q, N, D).transpose(1, 0, 2)          # [N,S,D] view
                k = rows[:, ND:2 * ND].reshape(L, N, D).transpose(1, 2, 0)        # [N,D,T] view
                v = rows[:, 2 * ND:].reshape(L, N, D).transpose(1, 0, 2)          # [N,T,D] view
                scores = sbuf[:N * Q * L].reshape(N, Q, L)
                mark("other")
                np.matmul(q, k, out=scores)                                       # [N,S,T] (unscaled)
                mark("products")
                mixed = mbuf[:N * Q * L].reshape(N, Q, L)
                if blk.pre_t is None:                                             # multi-head: scale only
                    np.multiply(scores, blk.scale, out=mixed)
                else:
                    np.matmul(blk.pre_t, scores.reshape(N, Q * L), out=mixed.reshape(N, Q * L))  # scale*W_pre mix
                    mark("talking-heads mixing")
                masked_softmax_in_place(mixed, adder, use_fused)
                mark("softmax")
                probs = mixed
                if blk.post_t is not None:
                    np.matmul(blk.post_t, mixed.reshape(N, Q * L), out=scores.reshape(N, Q * L))  # W_post mix
                    probs = scores
                    mark("talking-heads mixing")
                dest = ctx[i:i + 1] if first_query_only else ctx[s + q0:s + q1]
                out = dest.reshape(Q, N, D).transpose(1, 0, 2)                    # [N,S,D] view of [S,N,D]
                np.matmul(probs, v, out=out)
                mark("products")

        self._mark("other")
        t0 = time.perf_counter()
        busy = [w for w in range(n) if groups[w]]
        if len(busy) > 1:
            for f in [thread_pool(n).submit(run, w) for w in busy]:
                f.result()
        elif busy:
            run(busy[0])
        if self.profile is not None:   # the phase's wall time, shared out as the threads spent it
            wall = time.perf_counter() - t0
            total = {}
            for prof in profiles:
                for kind, sec in prof.items():
                    total[kind] = total.get(kind, 0.0) + sec
            whole = sum(total.values()) or 1.0
            for kind, sec in total.items():
                self.profile[kind] = self.profile.get(kind, 0.0) + wall * sec / whole
            self._last = time.perf_counter()

    def _product(self, a, blk, name, out, bias=None):
        """out = a @ blk.<name> (+ bias [N], when given): the packed kernel of engine/fast/gemm.py
        when the block has its packed copy, else np.matmul (_matmul) and a bias add."""
        if blk.packed is None:
            self._matmul(a, getattr(blk, name), out)
            if bias is not None:
                self._rows(lambda s, e, w: np.add(out[s:e], bias, out=out[s:e]), out.shape[0], 256)
            return
        packed_product(blk.packed[name], a, out, bias, self._threads())

    def _matmul(self, a, b, out):
        """out = a @ b split over the threads (BLAS single-threaded in each) when splitting: by rows of
        a for many rows, else by columns of b (each thread then packs only its half of the weights)."""
        rows, cols = a.shape[0], b.shape[1]
        n = self._threads()
        if not self._split or rows < 2 * n or cols < 2 * n:
            np.matmul(a, b, out=out)
            return
        if rows > 512:
            bounds = [rows * i // n for i in range(n + 1)]
            parts = [(a[bounds[i]:bounds[i + 1]], b, out[bounds[i]:bounds[i + 1]]) for i in range(n)]
        else:
            bounds = [cols * i // n for i in range(n + 1)]
            parts = [(a, b[:, bounds[i]:bounds[i + 1]], out[:, bounds[i]:bounds[i + 1]]) for i in range(n)]
        futures = [thread_pool(n).submit(np.matmul, x, w, out=o) for x, w, o in parts]
        for f in futures:
            f.result()

    # ------------------------------------------------------------------------ forward

    def encode(self, ids, mask, types, skip_padding=False, keep="all"):
        """Returns (encoder_outputs, pooled [B,H]), like Model.encode: encoder_outputs holds the L
        block outputs [B,S,H] (keep="all"), the last one only ("last"), or none ("pooled")."""
        tokens = int(np.count_nonzero(mask)) if skip_padding else int(np.size(ids))
        self._call_threads = (threads_for_work(self.settings.threads, 2.0 * tokens * block_weight_count(self.config))
                              if self.settings.adapt_threads else self.settings.threads)
        # blas "pool": OpenBLAS at one thread for the call, whatever the count (its own threads
        # busy-wait: on a busy machine one call on them ran 3x slower than on the pool's one thread)
        hold_blas = self.settings.blas == "pool" and blas_thread_setter() is not None
        self._split = self._threads() > 1 and hold_blas
        if not hold_blas:
            return self._encode(ids, mask, types, skip_padding, keep)
        with single_threaded_blas():
            return self._encode(ids, mask, types, skip_padding, keep)

    def _encode(self, ids, mask, types, skip_padding, keep="all"):
        cfg, enc, dt = self.config, self.encoder, self.dtype
        self._last = time.perf_counter()
        B, S = ids.shape
        H, I, ND = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_size
        nL = len(self.blocks)
        mask = np.asarray(mask)
        if keep not in ("all", "last", "pooled"):
            raise ValueError(f"keep={keep!r}: all, last or pooled")
        kept = {"all": nL, "last": 1, "pooled": 0}[keep]
        outputs = np.zeros((kept, B, S, H), dt) if skip_padding else _touched_empty((kept, B, S, H), dt)
        if skip_padding:
            flat = np.flatnonzero(mask.reshape(-1))                          # real tokens, row-major
            lengths = np.count_nonzero(mask, axis=1)
            ends = np.cumsum(lengths)
            spans = [(int(e - n), int(e)) for n, e in zip(lengths, ends)]
            adders = [None] * B
            tok_ids, tok_types, tok_pos = ids.reshape(-1)[flat], types.reshape(-1)[flat], flat % S
        else:
            flat = None
            spans = [(b * S, (b + 1) * S) for b in range(B)]
            adders = []
            for b in range(B):
                if np.all(mask[b] == 1):
                    adders.append(None)                                        # adding -0.0 changes nothing
                else:
                    adders.append((self._c["one"] - mask[b].astype(dt)) * self._c["mask"])   # [T]
            tok_ids, tok_types = ids.reshape(-1), types.reshape(-1)
            tok_pos = np.tile(np.arange(S), B)
        T = len(tok_ids)
        self._mark("other")
        # embeddings: (word[ids] + position) + type, then LN
        x0 = self._buffer("x0", (T, H))
        np.take(enc.word_table, tok_ids, axis=0, out=x0)
        e = self._buffer("a", (T, H))
        np.take(enc.position_table, tok_pos, axis=0, out=e)
        np.add(x0, e, out=x0)
        np.take(enc.type_table, tok_types, axis=0, out=e)
        self._mark("gather")
        zero = self._buffer("zero_h", (H,))
        zero[:] = 0
        # the block outputs go to two alternating buffers, copied (scattered with skip_padding) into
        # `outputs` for the blocks kept; without skip_padding and with every block kept they are
        # computed in place in `outputs`
        in_place = not skip_padding and keep == "all"
        xs = None if in_place else self._buffer("xpack", (2, T, H))
        x = x0 if in_place else xs[0]
        self._add_layer_norm(x0, zero, e, *enc.embedding_ln, out=x)
        self._mark("layer norm")
        qkv = self._buffer("qkv", (T, 3 * ND))
        ctx = self._buffer("ctx", (T, ND))
        a = self._buffer("a", (T, H))
        widths = 2 * I if cfg.gated else I
        hg = self._buffer("hg", (T, widths))
        hid = self._buffer("hid", (T, I))
        f = self._buffer("f", (T, H))
        for li, blk in enumerate(self.blocks):
            self._product(x, blk, "qkv_kernel", qkv, blk.qkv_bias)             # [T,3ND] (+ bias)
            self._mark("products")
            if keep == "pooled" and li == nL - 1:
                return [], self._pooled_from_last_block(blk, x, qkv, spans, adders, mask, skip_padding)
            self._attention(blk, qkv, ctx, spans, adders)                     # [T,ND]
            self._product(ctx, blk, "output_kernel", a)                        # [T,H]
            self._mark("products")
            x1 = self._buffer("x1", (T, H))
            self._add_layer_norm(a, blk.output_bias, x, *blk.attention_ln, out=x1)
            self._mark("layer norm")
            self._product(x1, blk, "ff_kernel", hg)                            # [T,2I] or [T,I]
            self._mark("products")
            self._activation(hg, blk, hid)                                    # [T,I]
            self._mark("gelu")
            self._product(hid, blk, "out_kernel", f)                           # [T,H]
            self._mark("products")
            x = outputs[li].reshape(B * S, H) if in_place else xs[(li + 1) % 2]
            self._add_layer_norm(f, blk.out_bias, x1, *blk.feedforward_ln, out=x)
            self._mark("layer norm")
            slot = li - (nL - kept)                                            # this block's place in outputs
            if not in_place and slot >= 0:
                if skip_padding:
                    outputs[slot].reshape(B * S, H)[flat] = x
                else:
                    outputs[slot].reshape(B * S, H)[...] = x
                self._mark("other")
        return list(outputs), self._pooler(x, spans, mask, skip_padding)

    def _pooler(self, x, spans, mask, skip_padding):
        """tanh(x[:,0]·Wp + bp) from the last block's output x [T,H] (packed with skip_padding)."""
        enc, dt = self.encoder, self.dtype
        B, S = mask.shape
        H = x.shape[1]
        if skip_padding:                                                       # [CLS] rows: position 0 of each row
            cls = np.zeros((B, H), dt)
            first_real = mask[:, 0] == 1
            cls[first_real] = x[np.asarray([s for s, _ in spans])[first_real]]
        else:
            cls = x.reshape(B, S, H)[:, 0]
        pooled = K.dense(cls, enc.pooler_kernel, enc.pooler_bias)                     # [B,H]
        self._mark("products")
        np.tanh(pooled, out=pooled)
        self._mark("other")
        return pooled

    def _pooled_from_last_block(self, blk, x, qkv, spans, adders, mask, skip_padding):
        """pooled_output when nothing else is asked for: the last block at the [CLS] tokens only
        (rows whose position 0 is padding get the zero vector with skip_padding, as in the full call)."""
        B = mask.shape[0]
        which = [b for b in range(B) if mask[b, 0] == 1] if skip_padding else list(range(B))
        first = np.asarray([spans[b][0] for b in which], dtype=np.intp)
        ctx = np.empty((len(which), self.config.num_heads * self.config.head_size), self.dtype)   # [B',ND]
        self._attention(blk, qkv, ctx, [spans[b] for b in which], [adders[b] for b in which], first_query_only=True)
        self._mark("softmax")
        rows, H, I = len(which), self.config.hidden_size, self.config.intermediate_size
        a, x1 = np.empty((rows, H), self.dtype), np.empty((rows, H), self.dtype)
        self._product(ctx, blk, "output_kernel", a)                            # [B',H]
        self._mark("products")
        self._add_layer_norm(a, blk.output_bias, x[first], *blk.attention_ln, out=x1)
        hg = np.empty((rows, 2 * I if self.config.gated else I), self.dtype)
        self._product(x1, blk, "ff_kernel", hg)                                # [B',2I] or [B',I]
        hid = np.empty((rows, I), self.dtype)
        self._activation(hg, blk, hid)
        f = np.empty((rows, H), self.dtype)
        self._product(hid, blk, "out_kernel", f)                               # [B',H]
        self._mark("products")
        y = np.empty_like(f)
        self._add_layer_norm(f, blk.out_bias, x1, *blk.feedforward_ln, out=y)
        cls = np.zeros((B, y.shape[1]), self.dtype)
        cls[which] = y
        pooled = K.dense(cls, self.encoder.pooler_kernel, self.encoder.pooler_bias)   # [B,H]
        np.tanh(pooled, out=pooled)
        self._mark("other")
        return pooled

