"""The model's forward pass, written once, and its backward: a tape that records the forward pass
and returns the gradient of every weight for any cotangent of its outputs, NumPy or CuPy, float32
or float64.

    tape = enc.tape(inputs)                           # the forward pass, activations kept
    tape.outputs["sequence_output"]                    # the same outputs as enc(inputs) / enc.mlm(inputs)
    grads = tape.gradient({"pooled_output": g})        # {HDF5 dataset path: gradient}, every weight
    grads = tape.gradient({"mlm_logits": h})           # again, from the same recording
    tape.release()                                     # or: with enc.tape(inputs) as tape: ...

    outputs, grads = enc.vjp(inputs, cotangents)       # the one-shot form

The forward (encoder_forward: embeddings, block_forward for each block, the pooler; mlm_forward:
the MLM head) is the model's one definition. The plain call (engine.core.model.Model) runs it
keeping nothing; the tape runs it with `saved`, a dict that each step fills with what its backward
needs (llm.c's activations); the trace runs it with `record(name, array)`, which receives every
intermediate (engine/core/trace.py names them). So with dropout off tape.outputs equals the plain
forward bit for bit (tested).

A cotangent is the gradient of some scalar loss with respect to an output, of that output's shape:
sequence_output [B,S,H], pooled_output (or default) [B,H], encoder_outputs (a list of L [B,S,H],
None for a block with none) and mlm_logits [B,P,V] (the inputs then include masked_lm_positions).
The gradients are those of sum(cotangent * output) over every given output, which is what
tf.GradientTape.gradient(outputs, variables, output_gradients=cotangents) computes.

Dropout, off by default, is Model Garden's: rate `hidden` after the embedding LayerNorm, on the
attention output and on the feed-forward output (before each residual), rate `attention` on the
mixed attention probabilities; its masks come from a seed (NumPy's generator, so the CPU and the GPU
draw the same ones), are kept in tape.dropout_masks and are reused by the backward pass.
Letters as in engine.core.kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


from engine.core import backward as KB
from engine.core import kernels as K
from engine.core.dropout import NO_DROPOUT, Dropout, DropoutMasks
from weights.format import block_prefix, expected_shapes


def _ignore(name, value):
    """The recorder when nobody records."""


def _prefixed(record, prefix: str):
    return None if record is None else (lambda name, value: record(prefix + name, value))




# ---------------------------------------------------------------------------- attention, scores to context

def mix_heads(x, weight):
    """Talking-heads mixing, or nothing when the model has no mixing weight (multi-head attention:
    each head attends alone, which is mixing by the identity). [B,N,S,T] -> [B,N,S,T]"""
    return x if weight is None else K.talking_heads_mix(x, weight)


def mix_heads_backward(x, weight, dy):
    """The VJP of mix_heads: (dx, dweight), dweight None without a weight."""
    return (dy, None) if weight is None else KB.talking_heads_mix_backward(x, weight, dy)


def attention(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder, keep_probs, rate, record=None):
    """Talking-heads attention from the projections to the context, with dropout on the mixed
    probabilities; with both mixing weights None, standard multi-head attention (nothing mixed,
    the mixed_* steps not recorded). [B,S,N,D] x3 -> (ctx [B,S,N,D], probs [B,N,S,T],
    dropped_probs [B,N,S,T]): the context and what the backward needs."""
    rec = record or _ignore
    raw = K.raw_attention_scores(q, k)                                           # [B,N,S,T]
    rec("raw_scores", raw)
    scores = K.scale_scores(raw, q.shape[-1])                                    # [B,N,S,T]
    rec("scaled_scores", scores)
    mixed = mix_heads(scores, pre_softmax_weight)                                # [B,N,S,T]
    if pre_softmax_weight is not None:
        rec("mixed_scores", mixed)
    masked = K.apply_attention_mask(mixed, mask_adder)                           # [B,N,S,T]
    rec("masked_scores", masked)
    probs = K.softmax(masked)                                                    # [B,N,S,T]
    rec("probs", probs)
    mixed_probs = mix_heads(probs, post_softmax_weight)                          # [B,N,S,T]
    if post_softmax_weight is not None:
        rec("mixed_probs", mixed_probs)
    dropped_probs = K.dropout(mixed_probs, keep_probs, rate)                     # [B,N,S,T]
    return K.attention_context(dropped_probs, v), probs, dropped_probs           # [B,S,N,D]


def attention_backward(q, k, v, pre_softmax_weight, post_softmax_weight, mask_adder, keep_probs, rate,
                       probs, dropped_probs, dctx, record=None):
    """The VJP of attention(), its steps in reverse; the scores are recomputed (one batched GEMM)
    rather than kept. record(name, array) as in block_backward (mixed_probs, probs, masked_scores,
    scaled_scores). -> (dq, dk, dv [B,S,N,D], dpre_softmax_weight, dpost_softmax_weight [N,N])"""
    rec = record or _ignore
    ddropped, dv = KB.attention_context_backward(dropped_probs, v, dctx)         # [B,N,S,T], [B,T,N,D]
    dmixed_probs = KB.dropout_backward(None, keep_probs, rate, ddropped)
    if post_softmax_weight is not None:
        rec("mixed_probs", dmixed_probs)
    dprobs, dpost = mix_heads_backward(probs, post_softmax_weight, dmixed_probs)
    rec("probs", dprobs)
    dmasked = KB.softmax_backward(probs, dprobs)                                 # [B,N,S,T]
    rec("masked_scores", dmasked)
    dmixed = KB.apply_attention_mask_backward(None, mask_adder, dmasked)
    scores = None if pre_softmax_weight is None else \
        K.scale_scores(K.raw_attention_scores(q, k), q.shape[-1])               # recomputed for dpre
    dscores, dpre = mix_heads_backward(scores, pre_softmax_weight, dmixed)
    rec("scaled_scores", dscores)
    draw = KB.scale_scores_backward(None, q.shape[-1], dscores)
    dq, dk = KB.raw_attention_scores_backward(q, k, draw)                        # [B,S,N,D], [B,T,N,D]
    return dq, dk, dv, dpre, dpost


@dataclasses.dataclass(frozen=True)
class TapeKernels:
    """The kernels the forward runs for its element-wise stages and its attention (projections to
    context), the readable ones by default (looked up in engine.core.kernels / backward at each
    call). A set with the same signatures can be handed to Model.tape(kernels=...):
    engine/fast/tape_kernels.py holds the fused set (the core never imports it)."""
    layer_norm: Callable = lambda x, gamma, beta, eps: K.layer_norm(x, gamma, beta, eps)              # noqa: E731
    geglu: Callable = lambda x, gate, kind: K.geglu(x, gate, kind)                                  # noqa: E731
    gelu: Callable = lambda x, kind: K.gelu(x, kind)                                                # noqa: E731
    layer_norm_backward: Callable = lambda x, gamma, beta, eps, dy: KB.layer_norm_backward(x, gamma, beta, eps, dy)  # noqa: E731
    geglu_backward: Callable = lambda x, gate, dy, kind: KB.geglu_backward(x, gate, dy, kind)       # noqa: E731
    gelu_backward: Callable = lambda x, dy, kind: KB.gelu_backward(x, dy, kind)                     # noqa: E731
    attention: Callable = attention
    attention_backward: Callable = attention_backward


READABLE_KERNELS = TapeKernels()


# ---------------------------------------------------------------------------- the forward, written once

def talking_heads_attention(x, mask_adder, a, *, kernels=READABLE_KERNELS, masks=None, prefix="", saved=None,
                            record=None):
    """The block's self-attention, before the residual: q, k, v projections, talking-heads
    attention, output projection. `a`: engine.core.model.AttentionWeights. [B,S,H] -> [B,S,H]"""
    rec, masks = record or _ignore, masks or NO_DROPOUT
    rate = masks.rates.attention
    q = K.qkv_projection(x, a.query_kernel, a.query_bias)                        # [B,S,N,D]
    k = K.qkv_projection(x, a.key_kernel, a.key_bias)                            # [B,T,N,D]
    v = K.qkv_projection(x, a.value_kernel, a.value_bias)                        # [B,T,N,D]
    rec("q", q), rec("k", k), rec("v", v)
    B, S, N, _ = q.shape
    keep_probs = masks.keep(prefix + "attention_probs", (B, N, S, k.shape[1]), rate)
    ctx, probs, dropped_probs = kernels.attention(q, k, v, a.pre_softmax_weight, a.post_softmax_weight,
                                                  mask_adder, keep_probs, rate, record=record)  # [B,S,N,D]
    rec("context", ctx)
    out = K.attention_output(ctx, a.output_kernel, a.output_bias)                # [B,S,H]
    rec("attention_output", out)
    if saved is not None:
        saved.update(q=q, k=k, v=v, keep_probs=keep_probs, probs=probs, dropped_probs=dropped_probs, ctx=ctx)
    return out


def feedforward(x, f, activation, *, kernels=READABLE_KERNELS, saved=None, record=None):
    """The feed-forward, before the residual: gated, (gelu(x·Wi+bi) * (x·Wg+bg))·Wo + bo (GEGLU);
    without a gate kernel, standard BERT's gelu(x·Wi+bi)·Wo + bo. `f`:
    engine.core.model.FeedForwardWeights; activation: "gelu_tanh" | "gelu_erf".
    [B,S,H] -> [B,S,I] -> [B,S,H]"""
    pre_gelu = K.dense(x, f.intermediate_kernel, f.intermediate_bias)            # [B,S,I]
    if f.gate_kernel is None:
        gate = None
        hidden = kernels.gelu(pre_gelu, activation)                              # [B,S,I]
        (record or _ignore)("gelu_branch", hidden)
    else:
        gate = K.dense(x, f.gate_kernel, f.gate_bias)                            # [B,S,I]
        hidden = kernels.geglu(pre_gelu, gate, activation)                       # [B,S,I]
        if record is not None:   # the GELU branch alone exists only for the trace
            record("gelu_branch", K.gelu(pre_gelu, activation)), record("gate_branch", gate)
            record("geglu", hidden)
    out = K.dense(hidden, f.output_kernel, f.output_bias)                        # [B,S,H]
    (record or _ignore)("feedforward_output", out)
    if saved is not None:
        saved.update(pre_gelu=pre_gelu, gate=gate, hidden=hidden)
    return out


def block_forward(x, mask_adder, w, eps, activation="gelu_tanh", *, kernels=READABLE_KERNELS, masks=None,
                  prefix="", saved=None, record=None):
    """One post-LN block: x1 = LN_attn(x + attention(x)), y = LN_ffn(feedforward(x1) + x1), with
    dropout before each residual. `w`: engine.core.model.BlockWeights. `saved`: a dict to fill with
    what block_backward needs (None: nothing is kept); `record(name, array)`: every intermediate.
    [B,S,H] -> [B,S,H]"""
    rec, masks = record or _ignore, masks or NO_DROPOUT
    rate = masks.rates.hidden
    attn = talking_heads_attention(x, mask_adder, w.attention, kernels=kernels, masks=masks, prefix=prefix,
                                   saved=saved, record=record)                   # [B,S,H]
    keep_attn = masks.keep(prefix + "attention_output", attn.shape, rate)
    h1 = x + K.dropout(attn, keep_attn, rate)                                    # [B,S,H]
    x1 = kernels.layer_norm(h1, *w.attention_ln, eps)                            # [B,S,H]
    rec("attention_layer_norm", x1)
    out = feedforward(x1, w.feedforward, activation, kernels=kernels, saved=saved, record=record)  # [B,S,H]
    keep_out = masks.keep(prefix + "feedforward_output", out.shape, rate)
    h2 = K.dropout(out, keep_out, rate) + x1                                     # [B,S,H]
    y = kernels.layer_norm(h2, *w.feedforward_ln, eps)                           # [B,S,H]
    rec("feedforward_layer_norm", y)
    if saved is not None:
        saved.update(x=x, keep_attn=keep_attn, h1=h1, x1=x1, keep_out=keep_out, h2=h2)
    return y


def encoder_forward(model, ids, mask, types, *, kernels=READABLE_KERNELS, masks=None, saved=None, record=None):
    """Embeddings, the L blocks, the pooler of `model` (engine.core.model.Model) on device int
    arrays [B,S]. -> (encoder_outputs: L arrays [B,S,H], pooled [B,H])"""
    cfg, rec, masks = model.config, record or _ignore, masks or NO_DROPOUT
    eps = cfg.layer_norm_epsilon
    e = K.embed(ids, types, model.word_table, model.position_table, model.type_table)  # [B,S,H]
    rec("embeddings/sum", e)
    x = kernels.layer_norm(e, *model.embedding_ln, eps)                          # [B,S,H]
    rec("embeddings/layer_norm", x)
    keep_emb = masks.keep("embeddings", x.shape, masks.rates.hidden)
    x = K.dropout(x, keep_emb, masks.rates.hidden)
    mask_adder = K.attention_mask_adder(mask, model.dtype, cfg.attention_mask_constant)  # [B,1,1,T]
    layers, caches = [], []
    for i, w in enumerate(model.blocks):
        cache = None if saved is None else {}
        x = block_forward(x, mask_adder, w, eps, cfg.hidden_activation, kernels=kernels, masks=masks,
                          prefix=block_prefix(i),
                          saved=cache, record=_prefixed(record, block_prefix(i)))   # [B,S,H]
        layers.append(x)
        caches.append(cache)
    pooled = K.pooler(x, model.pooler_kernel, model.pooler_bias)                # [B,H]
    rec("pooled_output", pooled)
    if saved is not None:
        saved.update(ids=ids, types=types, e=e, keep_emb=keep_emb, mask_adder=mask_adder, caches=caches)
    return layers, pooled


def mlm_head(gathered, transform_kernel, transform_bias, ln_gamma, ln_beta, word_table, output_bias, eps,
             activation="gelu_tanh", saved=None, record=None):
    """The MLM head on the gathered vectors only: LN(gelu(g·Wd+bd)) · word^T + bias, the output
    matrix the word-embedding table (tied weights). [B,P,H] -> [B,P,V]"""
    rec = record or _ignore
    pre = K.dense(gathered, transform_kernel, transform_bias)                    # [B,P,H]
    act = K.gelu(pre, activation)                                                # [B,P,H]
    rec("mlm_dense", act)
    t = K.layer_norm(act, ln_gamma, ln_beta, eps)                                # [B,P,H]
    rec("mlm_transform", t)
    logits = K.dense(t, word_table.T, output_bias)                               # [B,P,H] @ [H,V] -> [B,P,V]
    rec("logits", logits)
    if saved is not None:
        saved.update(gathered=gathered, pre=pre, act=act, t=t)
    return logits


def mlm_forward(model, sequence_output, positions, *, saved=None, record=None):
    """mlm_logits at masked_lm_positions: gather, then mlm_head. [B,S,H], [B,P] -> [B,P,V]"""
    gathered = K.gather_positions(sequence_output, positions)                   # [B,P,H]
    (record or _ignore)("mlm/gathered", gathered)
    m = model.mlm_weights
    return mlm_head(gathered, m["transform_kernel"], m["transform_bias"], m["ln_gamma"], m["ln_beta"],
                    model.word_table, m["output_bias"], model.config.layer_norm_epsilon,
                    model.config.hidden_activation, saved=saved, record=_prefixed(record, "mlm/"))


# ---------------------------------------------------------------------------- the backward

def block_backward(dy, cache, w, eps, rates: Dropout, mask_adder, record=None,
                   kernels: TapeKernels = READABLE_KERNELS, activation="gelu_tanh"):
    """The VJP of block_forward: its steps in reverse. [B,S,H] -> ([B,S,H], {weight path: grad})
    record(name, array), when given, receives the gradient with respect to the trace's intermediates
    (engine/core/trace.py names): feedforward_layer_norm, attention_layer_norm, context, mixed_probs,
    probs, masked_scores, scaled_scores, q, k, v."""
    rec = record or _ignore
    c, a, f = cache, w.attention, w.feedforward
    grads = {}
    rec("feedforward_layer_norm", dy)
    # y = LN_ffn(dropout(ffn(x1)) + x1)
    dh2, grads["feedforward_layer_norm/gamma"], grads["feedforward_layer_norm/beta"] = \
        kernels.layer_norm_backward(c["h2"], *w.feedforward_ln, eps, dy)
    dout = KB.dropout_backward(None, c["keep_out"], rates.hidden, dh2)          # [B,S,H]
    dhidden, grads["feedforward/output/kernel"], grads["feedforward/output/bias"] = \
        KB.dense_backward(c["hidden"], f.output_kernel, f.output_bias, dout)
    if f.gate_kernel is None:
        dpre = kernels.gelu_backward(c["pre_gelu"], dhidden, activation)         # [B,S,I]
        dx1 = dh2                                                                # the residual
    else:
        dpre, dgate = kernels.geglu_backward(c["pre_gelu"], c["gate"], dhidden, activation)  # [B,S,I] each
        dx1_gate, grads["feedforward/gate/kernel"], grads["feedforward/gate/bias"] = \
            KB.dense_backward(c["x1"], f.gate_kernel, f.gate_bias, dgate)
        dx1 = dh2 + dx1_gate                                                     # residual + the gate branch
    dx1_gelu, grads["feedforward/intermediate/kernel"], grads["feedforward/intermediate/bias"] = \
        KB.dense_backward(c["x1"], f.intermediate_kernel, f.intermediate_bias, dpre)
    dx1 = dx1 + dx1_gelu
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
    grads.update({f"attention/{k}": v for k, v in g.items() if v is not None})
    return dx, grads


def mlm_head_backward(saved, transform_kernel, transform_bias, ln_gamma, ln_beta, word_table, output_bias, eps,
                      dlogits, activation="gelu_tanh"):
    """The VJP of mlm_head, its steps in reverse: doutput_bias = sum dlogits, dword = dlogits^T·t (the
    tied decoder's share of the word table's gradient), dt = dlogits·word, then layer_norm_backward,
    gelu_backward, dense_backward. [B,P,V] -> (dgathered [B,P,H], dword [V,H], {mlm path: gradient})"""
    V, H = word_table.shape
    dword = dlogits.reshape(-1, V).T @ saved["t"].reshape(-1, H)                 # [V,M] @ [M,H] -> [V,H]
    dt = K.matmul_2d(dlogits, word_table)                                        # [B,P,V] @ [V,H] -> [B,P,H]
    dact, dgamma, dbeta = KB.layer_norm_backward(saved["act"], ln_gamma, ln_beta, eps, dt)
    dpre = KB.gelu_backward(saved["pre"], dact, activation)                      # [B,P,H]
    dgathered, dkernel, dbias = KB.dense_backward(saved["gathered"], transform_kernel, transform_bias, dpre)
    return dgathered, dword, {"mlm/transform/kernel": dkernel, "mlm/transform/bias": dbias,
                              "mlm/layer_norm/gamma": dgamma, "mlm/layer_norm/beta": dbeta,
                              "mlm/output_bias": dlogits.reshape(-1, V).sum(axis=0)}


# ---------------------------------------------------------------------------- the tape

OUTPUT_COTANGENTS = ("sequence_output", "pooled_output", "default", "encoder_outputs", "mlm_logits")


class Tape:
    """The recorded forward pass of one batch; `gradient(cotangents)` as often as needed, then
    `release()`. Built by engine.core.model.Model.tape (see the module docstring)."""

    def __init__(self, model, inputs, dropout=None, seed: int = 0, dropout_masks: dict | None = None,
                 kernels: TapeKernels | None = None):
        self.enc = model
        self.kernels = kernels or READABLE_KERNELS
        self.rates = Dropout.of(dropout)
        with_positions = "masked_lm_positions" in inputs
        if with_positions and not model.has_mlm:
            raise ValueError("masked_lm_positions given, but this weights file is encoder-only (no .mlm head)")
        ids, mask, types, positions = model.device_inputs(inputs, with_positions=with_positions)
        masks = DropoutMasks(model.xp, model.dtype, self.rates, seed, dropout_masks)
        saved = {}
        layers, pooled = encoder_forward(model, ids, mask, types, kernels=self.kernels, masks=masks, saved=saved)
        self.outputs = {"pooled_output": pooled, "sequence_output": layers[-1], "encoder_outputs": layers,
                        "default": pooled}
        saved["mlm"] = None
        if positions is not None:
            saved["mlm"] = {}
            self.outputs["mlm_logits"] = mlm_forward(model, layers[-1], positions, saved=saved["mlm"])
        saved["positions"] = positions
        self.dropout_masks = masks.drawn
        self._saved = saved

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
            dgathered, dword_decoder, head_grads = mlm_head_backward(
                s["mlm"], m["transform_kernel"], m["transform_bias"], m["ln_gamma"], m["ln_beta"], enc.word_table,
                m["output_bias"], eps, dlogits, enc.config.hidden_activation)
            dx = dx + KB.gather_positions_backward(x, s["positions"], dgathered)
            grads.update(head_grads)
        for i in reversed(range(L)):
            if per_layer is not None:
                extra = self._cotangent(f"encoder_outputs[{i}]", per_layer[i], out["encoder_outputs"][i])
                if extra is not None:
                    dx = dx + extra
            dx, block_grads = block_backward(dx, s["caches"][i], enc.blocks[i], eps, self.rates, s["mask_adder"],
                                             record=_prefixed(record, block_prefix(i)), kernels=self.kernels,
                                             activation=enc.config.hidden_activation)
            grads.update({block_prefix(i) + k: v for k, v in block_grads.items()})
        dx = KB.dropout_backward(None, s["keep_emb"], self.rates.hidden, dx)
        de, grads["embeddings/layer_norm/gamma"], grads["embeddings/layer_norm/beta"] = \
            self.kernels.layer_norm_backward(s["e"], *enc.embedding_ln, eps, dx)
        grads["embeddings/word"], grads["embeddings/position"], grads["embeddings/type"] = KB.embed_backward(
            s["ids"], s["types"], enc.word_table, enc.position_table, enc.type_table, de)
        if dword_decoder is not None:
            grads["embeddings/word"] += dword_decoder                            # the tied decoder's share
        elif word_rows:
            H = de.shape[-1]
            grads["embeddings/word"] = KB.RowGradient(s["ids"].reshape(-1), de.reshape(-1, H), enc.word_table.shape[0])
        return self._complete(grads)

    def _complete(self, grads: dict) -> dict:
        """Zeros for the weights no given output depends on (the pooler, the MLM head), in the order
        of weights.format.expected_shapes."""
        xp, dtype = self.enc.xp, self.enc.dtype
        return {path: grads[path] if path in grads else xp.zeros(shape, dtype=dtype)
                for path, shape in expected_shapes(self.enc.config).items()}

    def saved_bytes(self) -> int:
        """The bytes of the activations kept for the backward pass (0 once released)."""
        if self._saved is None:
            return 0
        parts = [*self._saved["caches"], self._saved["mlm"] or {}]
        return sum(a.nbytes for part in parts for a in part.values() if hasattr(a, "nbytes"))

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
