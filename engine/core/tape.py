"""The backward pass of the whole model: a tape that records the forward pass once and returns the
gradient of every weight for any cotangent of its outputs, NumPy or CuPy, float32 or float64.

    tape = enc.tape(inputs)                           # the forward pass, activations kept
    tape.outputs["sequence_output"]                    # the same outputs as enc(inputs) / enc.mlm(inputs)
    grads = tape.gradient({"pooled_output": g})        # {HDF5 dataset path: gradient}, every weight
    grads = tape.gradient({"mlm_logits": h})           # again, from the same recording
    tape.release()                                     # or: with enc.tape(inputs) as tape: ...

    outputs, grads = enc.vjp(inputs, cotangents)       # the one-shot form

A cotangent is the gradient of some scalar loss with respect to an output, of that output's shape:
sequence_output [B,S,H], pooled_output (or default) [B,H], encoder_outputs (a list of L [B,S,H],
None for a block with none) and mlm_logits [B,P,V] (the inputs then include masked_lm_positions).
The gradients are those of sum(cotangent * output) over every given output, which is what
tf.GradientTape.gradient(outputs, variables, output_gradients=cotangents) computes.

Each block's forward keeps what its backward needs (llm.c's activations) and nothing more; the
forward is written with the same kernels in the same order as engine.core.model, so with dropout
off tape.outputs equals the readable forward bit for bit (tested). Dropout, off by default, is
Model Garden's: rate `hidden` after the embedding LayerNorm, on the attention output and on the
feed-forward output (before each residual), rate `attention` on the mixed attention probabilities;
its masks come from a seed (NumPy's generator, so the CPU and the GPU draw the same ones), are kept
in tape.dropout_masks and are reused by the backward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from engine.core import backend as backend_mod
from engine.core import backward as KB
from engine.core import kernels as K
from weights.format import expected_shapes


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Dropout rates: `hidden` (embeddings, attention output, feed-forward output) and `attention`
    (the mixed attention probabilities); Model Garden's BERT configs use 0.1 for both."""
    hidden: float = 0.0
    attention: float = 0.0

    @classmethod
    def of(cls, value) -> "Dropout":
        """None or 0 (off), a rate for both, a dict {"hidden":, "attention":}, or a Dropout."""
        if value is None:
            return cls()
        if isinstance(value, Dropout):
            out = value
        elif isinstance(value, dict):
            unknown = set(value) - {"hidden", "attention"}
            if unknown:
                raise ValueError(f"dropout: unknown keys {sorted(unknown)}; use 'hidden' and 'attention'")
            out = cls(**{k: float(v) for k, v in value.items()})
        else:
            out = cls(float(value), float(value))
        for name in ("hidden", "attention"):
            rate = getattr(out, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"dropout: the {name} rate must be in [0, 1), got {rate}")
        return out


def attention(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder, keep_probs, rate):
    """Talking-heads attention from the projections to the context, with dropout on the mixed
    probabilities, as engine.core.kernels.talking_heads_attention computes it, keeping what its
    backward needs. [B,S,N,D] x3 -> (ctx [B,S,N,D], probs [B,N,S,T], dropped_probs [B,N,S,T])"""
    raw = K.raw_attention_scores(q, k)                                           # [B,N,S,T]
    scores = K.scale_scores(raw, q.shape[-1])
    mixed = K.talking_heads_mix(scores, pre_softmax_weight)
    probs = K.softmax(K.apply_attention_mask(mixed, mask_adder))                 # [B,N,S,T]
    mixed_probs = K.talking_heads_mix(probs, post_softmax_weight)                # [B,N,S,T]
    dropped_probs = K.dropout(mixed_probs, keep_probs, rate)
    return K.attention_context(dropped_probs, v), probs, dropped_probs           # [B,S,N,D]


def attention_backward(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder, keep_probs, rate,
                       probs, dropped_probs, dctx, record=None):
    """The VJP of attention(), its steps in reverse; the scores are recomputed (one batched GEMM)
    rather than kept. record(name, array) as in block_backward (mixed_probs, probs, masked_scores,
    scaled_scores). -> (dq, dk, dv [B,S,N,D], dpre_softmax_weight, dpost_softmax_weight [N,N])"""
    rec = record or (lambda name, value: None)
    ddropped, dv = KB.attention_context_backward(dropped_probs, v, dctx)
    dmixed_probs = KB.dropout_backward(None, keep_probs, rate, ddropped)
    rec("mixed_probs", dmixed_probs)
    dprobs, dpost = KB.talking_heads_mix_backward(probs, post_softmax_weight, dmixed_probs)
    rec("probs", dprobs)
    dmasked = KB.softmax_backward(probs, dprobs)
    rec("masked_scores", dmasked)
    dmixed = KB.apply_attention_mask_backward(None, mask_adder, dmasked)
    scores = K.scale_scores(K.raw_attention_scores(q, k), q.shape[-1])          # recomputed
    dscores, dpre = KB.talking_heads_mix_backward(scores, pre_softmax_weight, dmixed)
    rec("scaled_scores", dscores)
    draw = KB.scale_scores_backward(None, q.shape[-1], dscores)
    dq, dk = KB.raw_attention_scores_backward(q, k, draw)
    return dq, dk, dv, dpre, dpost


@dataclasses.dataclass(frozen=True)
class TapeKernels:
    """The kernels the tape runs for its element-wise stages and its attention (projections to
    context), the readable ones by default (looked up in engine.core.kernels / backward at each
    call). A set with the same signatures can be handed
    to Encoder.tape(kernels=...): the trainer hands in the fused set of engine/fast/tape_kernels.py
    (the core never imports it)."""
    layer_norm: Callable = lambda x, gamma, beta, eps: K.layer_norm(x, gamma, beta, eps)              # noqa: E731
    geglu: Callable = lambda x, gate: K.geglu(x, gate)                                              # noqa: E731
    layer_norm_backward: Callable = lambda x, gamma, beta, eps, dy: KB.layer_norm_backward(x, gamma, beta, eps, dy)  # noqa: E731
    geglu_backward: Callable = lambda x, gate, dy: KB.geglu_backward(x, gate, dy)                   # noqa: E731
    attention: Callable = attention
    attention_backward: Callable = attention_backward


READABLE_KERNELS = TapeKernels()


class _Masks:
    """The dropout masks of one forward pass, drawn in forward order from a seed, or given."""

    def __init__(self, xp, dtype, rates: Dropout, seed, given):
        self.xp, self.dtype, self.rates = xp, dtype, rates
        self.rng = np.random.default_rng(seed)
        self.given = given or {}
        self.drawn = {}

    def keep(self, name: str, shape, rate: float):
        if rate == 0.0:
            return None
        if name in self.given:
            mask = self.xp.asarray(np.asarray(self.given[name]), dtype=self.dtype)
            if tuple(mask.shape) != tuple(shape):
                raise ValueError(f"dropout mask {name}: shape {tuple(mask.shape)}, expected {tuple(shape)}")
        else:
            mask = self.xp.asarray(self.rng.random(shape, dtype=np.float32) >= rate, dtype=self.dtype)
        self.drawn[name] = mask
        return mask


@dataclasses.dataclass
class RowGradient:
    """The gradient of an embedding table as the rows that were looked up (tf.gather's
    IndexedSlices): values[j] belongs to row ids[j]; repeated ids are separate entries until
    summed. A few thousand rows instead of a [V,H] table."""
    ids: object                   # [M] ints
    values: object                # [M,H]
    num_rows: int                 # V

    def summed(self):
        """(unique ids [U], their summed rows [U,H])."""
        xp = KB.array_module(self.values)
        unique, inverse = xp.unique(self.ids, return_inverse=True)
        return unique, KB.scatter_add_rows(int(unique.shape[0]), inverse.reshape(-1), self.values)

    def dense(self):
        """The [V,H] table."""
        return KB.scatter_add_rows(self.num_rows, self.ids, self.values)

    def scaled(self, factor) -> "RowGradient":
        return RowGradient(self.ids, self.values * factor, self.num_rows)


def _attention_weight_grads(g: dict) -> dict:
    return {f"attention/{k}": v for k, v in g.items()}


# ---------------------------------------------------------------------------- one block

def block_forward(x, mask_adder, w, eps, masks: _Masks, prefix: str, kernels: TapeKernels = READABLE_KERNELS):
    """engine.core.model.transformer_block with dropout, keeping its activations. [B,S,H] -> [B,S,H]"""
    a, r = w.attention, masks.rates
    q = K.qkv_projection(x, a.query_kernel, a.query_bias)                        # [B,S,N,D]
    k = K.qkv_projection(x, a.key_kernel, a.key_bias)                            # [B,T,N,D]
    v = K.qkv_projection(x, a.value_kernel, a.value_bias)                        # [B,T,N,D]
    B, S, N, _ = q.shape
    keep_probs = masks.keep(prefix + "attention_probs", (B, N, S, k.shape[1]), r.attention)
    ctx, probs, dropped_probs = kernels.attention(q, k, v, a.pre_softmax_weight, a.post_softmax_weight,
                                                  mask_adder, keep_probs, r.attention)  # [B,S,N,D]
    attn = K.attention_output(ctx, a.output_kernel, a.output_bias)               # [B,S,H]
    keep_attn = masks.keep(prefix + "attention_output", attn.shape, r.hidden)
    h1 = x + K.dropout(attn, keep_attn, r.hidden)                                # [B,S,H]
    x1 = kernels.layer_norm(h1, *w.attention_ln, eps)
    f = w.feedforward
    pre_gelu = K.dense(x1, f.intermediate_kernel, f.intermediate_bias)           # [B,S,I]
    gate = K.dense(x1, f.gate_kernel, f.gate_bias)                               # [B,S,I]
    hidden = kernels.geglu(pre_gelu, gate)                                       # [B,S,I]
    out = K.dense(hidden, f.output_kernel, f.output_bias)                        # [B,S,H]
    keep_out = masks.keep(prefix + "feedforward_output", out.shape, r.hidden)
    h2 = K.dropout(out, keep_out, r.hidden) + x1
    y = kernels.layer_norm(h2, *w.feedforward_ln, eps)                           # [B,S,H]
    cache = dict(x=x, q=q, k=k, v=v, probs=probs, dropped_probs=dropped_probs, keep_probs=keep_probs,
                 ctx=ctx, keep_attn=keep_attn, h1=h1, x1=x1, pre_gelu=pre_gelu, gate=gate, hidden=hidden,
                 keep_out=keep_out, h2=h2)
    return y, cache


def block_backward(dy, cache, w, eps, rates: Dropout, mask_adder, record=None,
                   kernels: TapeKernels = READABLE_KERNELS):
    """The VJP of block_forward: its steps in reverse. [B,S,H] -> ([B,S,H], {weight path: grad})
    record(name, array), when given, receives the gradient with respect to the trace's intermediates
    (engine/core/trace.py names): feedforward_layer_norm, attention_layer_norm, context, mixed_probs,
    probs, masked_scores, scaled_scores, q, k, v."""
    rec = record or (lambda name, value: None)
    c, a, f = cache, w.attention, w.feedforward
    grads = {}
    rec("feedforward_layer_norm", dy)
    # y = LN_ffn(dropout(ffn(x1)) + x1)
    dh2, grads["feedforward_layer_norm/gamma"], grads["feedforward_layer_norm/beta"] = \
        kernels.layer_norm_backward(c["h2"], *w.feedforward_ln, eps, dy)
    dout = KB.dropout_backward(None, c["keep_out"], rates.hidden, dh2)          # [B,S,H]
    dhidden, grads["feedforward/output/kernel"], grads["feedforward/output/bias"] = \
        KB.dense_backward(c["hidden"], f.output_kernel, f.output_bias, dout)
    dpre, dgate = kernels.geglu_backward(c["pre_gelu"], c["gate"], dhidden)      # [B,S,I] each
    dx1_gate, grads["feedforward/gate/kernel"], grads["feedforward/gate/bias"] = \
        KB.dense_backward(c["x1"], f.gate_kernel, f.gate_bias, dgate)
    dx1_gelu, grads["feedforward/intermediate/kernel"], grads["feedforward/intermediate/bias"] = \
        KB.dense_backward(c["x1"], f.intermediate_kernel, f.intermediate_bias, dpre)
    dx1 = dh2 + dx1_gelu + dx1_gate                                              # residual + both branches
    rec("attention_layer_norm", dx1)
    # x1 = LN_attn(x + dropout(attention(x)))
    dh1, grads["attention_layer_norm/gamma"], grads["attention_layer_norm/beta"] = \
        kernels.layer_norm_backward(c["h1"], *w.attention_ln, eps, dx1)
    dattn = KB.dropout_backward(None, c["keep_attn"], rates.hidden, dh1)
    g = {}
    dctx, g["output/kernel"], g["output/bias"] = KB.attention_output_backward(
        c["ctx"], a.output_kernel, a.output_bias, dattn)
    rec("context", dctx)
    dq, dk, dv, g["pre_softmax_weight"], g["post_softmax_weight"] = kernels.attention_backward(
        c["q"], c["k"], c["v"], a.pre_softmax_weight, a.post_softmax_weight, mask_adder, c["keep_probs"],
        rates.attention, c["probs"], c["dropped_probs"], dctx, record)
    rec("q", dq), rec("k", dk), rec("v", dv)
    dx = dh1                                                                     # the residual
    for name, dproj, kernel, bias in (("query", dq, a.query_kernel, a.query_bias),
                                      ("key", dk, a.key_kernel, a.key_bias),
                                      ("value", dv, a.value_kernel, a.value_bias)):
        dx_part, g[f"{name}/kernel"], g[f"{name}/bias"] = KB.qkv_projection_backward(c["x"], kernel, bias, dproj)
        dx = dx + dx_part
    grads.update(_attention_weight_grads(g))
    return dx, grads


# ---------------------------------------------------------------------------- the model

OUTPUT_COTANGENTS = ("sequence_output", "pooled_output", "default", "encoder_outputs", "mlm_logits")


class Tape:
    """The recorded forward pass of one batch; `gradient(cotangents)` as often as needed, then
    `release()`. Built by engine.core.model.Encoder.tape (see the module docstring)."""

    def __init__(self, enc, inputs, dropout=None, seed: int = 0, dropout_masks: dict | None = None,
                 kernels: TapeKernels | None = None):
        self.enc = enc
        self.kernels = kernels = kernels or READABLE_KERNELS
        self.rates = Dropout.of(dropout)
        if enc.xp is np:
            backend_mod.reuse_freed_memory()   # big activations: reuse freed blocks, no page faults
        with_positions = "masked_lm_positions" in inputs
        if with_positions and not enc.has_mlm:
            raise ValueError("masked_lm_positions given, but this weights file is encoder-only (no .mlm head)")
        ids, mask, types, positions = enc._device_inputs(inputs, with_positions=with_positions)
        cfg, xp = enc.config, enc.xp
        eps = cfg.layer_norm_epsilon
        masks = _Masks(xp, enc.dtype, self.rates, seed, dropout_masks)
        e = K.embed(ids, types, enc.word_table, enc.position_table, enc.type_table)  # [B,S,H]
        x = kernels.layer_norm(e, *enc.embedding_ln, eps)
        keep_emb = masks.keep("embeddings", x.shape, self.rates.hidden)
        x = K.dropout(x, keep_emb, self.rates.hidden)
        mask_adder = K.attention_mask_adder(mask, enc.dtype, cfg.attention_mask_constant)  # [B,1,1,T]
        caches, layers = [], []
        for i, w in enumerate(enc.blocks):
            x, cache = block_forward(x, mask_adder, w, eps, masks, f"layers/{i}/", kernels)
            caches.append(cache)
            layers.append(x)
        pooled = K.pooler(x, enc.pooler_kernel, enc.pooler_bias)                # [B,H]
        self.outputs = {"pooled_output": pooled, "sequence_output": x, "encoder_outputs": layers,
                        "default": pooled}
        gathered = None
        if positions is not None:
            gathered = K.gather_positions(x, positions)                        # [B,P,H]
            m = enc.mlm_weights
            self.outputs["mlm_logits"] = K.mlm_logits(
                gathered, m["transform_kernel"], m["transform_bias"], m["ln_gamma"], m["ln_beta"],
                enc.word_table, m["output_bias"], eps)
        self.dropout_masks = masks.drawn
        self._saved = dict(ids=ids, types=types, e=e, keep_emb=keep_emb, mask_adder=mask_adder,
                           caches=caches, positions=positions, gathered=gathered)

    # ---------------------------------------------------------------------------- backward

    def _cotangent(self, name, value, like):
        xp = self.enc.xp
        if value is None:
            return None
        array = xp.asarray(value, dtype=self.enc.dtype)
        if tuple(array.shape) != tuple(like.shape):
            raise ValueError(f"cotangents[{name!r}]: shape {tuple(array.shape)}, expected {tuple(like.shape)} "
                             f"(the output's shape)")
        if not bool(xp.all(xp.isfinite(array))):
            raise ValueError(f"cotangents[{name!r}]: contains NaN or infinite values")
        return array

    def gradient(self, cotangents: dict, record=None, word_rows: bool = False) -> dict:
        """{HDF5 dataset path: gradient} for every weight of the model, of sum(cotangent * output)
        over the given outputs. Arrays of the engine's backend and dtype. record(name, array), when
        given, receives the gradient with respect to intermediates, named as in the trace
        (e.g. "layers/3/mixed_scores"; see block_backward). word_rows=True: the word table's
        gradient as a RowGradient (the looked-up rows, as TF's IndexedSlices) unless mlm_logits has
        a cotangent (the tied decoder's gradient is dense)."""
        if self._saved is None:
            raise RuntimeError("this tape was released: record a new one with enc.tape(inputs)")
        unknown = [n for n in cotangents if n not in OUTPUT_COTANGENTS]
        if unknown:
            raise ValueError(f"cotangents: unknown outputs {unknown}; choose from {list(OUTPUT_COTANGENTS)}")
        if "mlm_logits" in cotangents and "mlm_logits" not in self.outputs:
            raise ValueError("cotangents: mlm_logits needs masked_lm_positions in the inputs of the tape")
        enc, s, out = self.enc, self._saved, self.outputs
        eps, xp, L = enc.config.layer_norm_epsilon, enc.xp, len(enc.blocks)
        per_layer = cotangents.get("encoder_outputs")
        if per_layer is not None and len(per_layer) != L:
            raise ValueError(f"cotangents['encoder_outputs']: {len(per_layer)} arrays, expected {L} (one per block)")
        grads = {}
        x = out["sequence_output"]
        dx = xp.zeros_like(x)                                                    # [B,S,H]
        seq = self._cotangent("sequence_output", cotangents.get("sequence_output"), x)
        if seq is not None:
            dx = dx + seq
        dword_decoder = None
        for name in ("pooled_output", "default"):
            dpooled = self._cotangent(name, cotangents.get(name), out["pooled_output"])
            if dpooled is not None:
                dcls, dk, db = KB.pooler_backward(x, enc.pooler_kernel, enc.pooler_bias, out["pooled_output"], dpooled)
                dx = dx + dcls
                _accumulate(grads, "pooler/kernel", dk)
                _accumulate(grads, "pooler/bias", db)
        dlogits = self._cotangent("mlm_logits", cotangents.get("mlm_logits"), out.get("mlm_logits", x))
        if dlogits is not None:
            m = enc.mlm_weights
            g = KB.mlm_logits_backward(s["gathered"], m["transform_kernel"], m["transform_bias"], m["ln_gamma"],
                                       m["ln_beta"], enc.word_table, m["output_bias"], eps, dlogits)
            dx = dx + KB.gather_positions_backward(x, s["positions"], g["gathered"])
            grads.update({"mlm/transform/kernel": g["transform_kernel"], "mlm/transform/bias": g["transform_bias"],
                          "mlm/layer_norm/gamma": g["ln_gamma"], "mlm/layer_norm/beta": g["ln_beta"],
                          "mlm/output_bias": g["output_bias"]})
            dword_decoder = g["word_table"]
        for i in reversed(range(L)):
            if per_layer is not None:
                extra = self._cotangent(f"encoder_outputs[{i}]", per_layer[i], out["encoder_outputs"][i])
                if extra is not None:
                    dx = dx + extra
            block_rec = (lambda name, value, i=i: record(f"layers/{i}/{name}", value)) if record else None
            dx, block_grads = block_backward(dx, s["caches"][i], enc.blocks[i], eps, self.rates, s["mask_adder"],
                                             record=block_rec, kernels=self.kernels)
            grads.update({f"layers/{i}/{k}": v for k, v in block_grads.items()})
        dx = KB.dropout_backward(None, s["keep_emb"], self.rates.hidden, dx)
        de, grads["embeddings/layer_norm/gamma"], grads["embeddings/layer_norm/beta"] = \
            self.kernels.layer_norm_backward(s["e"], *enc.embedding_ln, eps, dx)
        grads["embeddings/word"], grads["embeddings/position"], grads["embeddings/type"] = KB.embed_backward(
            s["ids"], s["types"], enc.word_table, enc.position_table, enc.type_table, de)
        if dword_decoder is not None:
            grads["embeddings/word"] += dword_decoder                            # the tied decoder's share
        elif word_rows:
            H = de.shape[-1]
            grads["embeddings/word"] = RowGradient(s["ids"].reshape(-1), de.reshape(-1, H), enc.word_table.shape[0])
        return self._complete(grads)

    def _complete(self, grads: dict) -> dict:
        """Zeros for the weights no given output depends on (the pooler, the MLM head), in the order
        of weights.format.expected_shapes."""
        xp, dtype = self.enc.xp, self.enc.dtype
        return {path: grads[path] if path in grads else xp.zeros(shape, dtype=dtype)
                for path, shape in expected_shapes(self.enc.config).items()}

    def release(self) -> None:
        """Drops the recorded activations (the outputs stay); gradient() then raises."""
        self._saved = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _accumulate(grads: dict, path: str, value) -> None:
    grads[path] = grads[path] + value if path in grads else value
