"""TensorFlow's own intermediates, step by step, with Model Garden's layers: the other side of the trace.

The model is rebuilt with the same code that exported it (`export_tfhub_lib._create_model` under
the talking-heads GEGLU gin bindings, as `engine.tf.reference` does), every variable is copied in
from the SavedModel (`tf.saved_model.load(dir).mlm.variables`, matched by name with the
`transformer_scaffold_<k>` prefixes renumbered in block order), and the layers' own methods are
called one step at a time:

    embeddings   encoder._embedding_layer, ._position_embedding_layer, ._type_embedding_layer,
                 then word + position + type (the Add layer's order) and ._embedding_norm_layer
    attention    att._query_dense / _key_dense / _value_dense,
                 tf.einsum(att._dot_product_equation, k, q), x 1/sqrt(att._key_dim),
                 tf.einsum(att._talking_heads_equation, s, att._pre_softmax_weight),
                 the additive mask as tf_keras' Softmax adds it, att._masked_softmax,
                 tf.einsum(att._talking_heads_equation, p, att._post_softmax_weight),
                 tf.einsum(att._combine_equation, p, v), att._output_dense
    block        block._attention_layer_norm(x + a)
    feedforward  ff._intermediate_dense[0], ff._inner_activation_layers[0], ff._gate_dense[0],
                 their product, ff._output_dense[0], ff._output_layer_norm[0](out + x)
    pooler       encoder._pooler_layer(x[:, 0])
    MLM          masked_lm._gather_indexes, .dense (with its GELU), .layer_norm,
                 matmul with the embedding table (transposed) and bias_add of .bias

The names are those of `engine.core.trace` (TF's [B*P,...] MLM tensors are reshaped to [B,P,...]).
`faithfulness()` checks that these steps reproduce the SavedModel's own outputs, which proves the
rebuild (and the variable copy) faithful; `verify_trace()` runs both sides and compares them.

This module imports TensorFlow (it lives in engine/tf/, with everything else that does).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from weights.format import block_prefix
from weights.tf_names import TF_BLOCK_NAMES, TF_EMBEDDING_NAMES
from engine.tools import compare, verdict

_SCAFFOLD = re.compile(r"^(?:bert/)?transformer_scaffold(?:_(\d+))?/")
_REBUILT = {}


def _normalized_names(variables) -> dict:
    """{normalized name: variable}; block prefixes become `block<i>/` in numbering order."""
    numbers = sorted({int(m.group(1) or 0) for v in variables if (m := _SCAFFOLD.match(v.name))})
    rank = {n: i for i, n in enumerate(numbers)}
    out = {}
    for v in variables:
        name = v.name.split(":")[0]
        m = _SCAFFOLD.match(name)
        if m:
            name = f"block{rank[int(m.group(1) or 0)]}/" + name[m.end():]
        name = name[len("bert/"):] if name.startswith("bert/") else name
        if name in out and out[name] is not v:
            raise ValueError(f"reference_trace: two variables normalize to {name!r}")
        out[name] = v
    return out


def _infer_config(saved: dict):
    """ReferenceConfig sizes from the SavedModel's variable shapes."""
    from engine.tf.reference import ReferenceConfig
    top = lambda name: saved[TF_EMBEDDING_NAMES[name]].shape  # noqa: E731
    block0 = lambda name: saved["block0/" + TF_BLOCK_NAMES[name]].shape  # noqa: E731
    V, H = top("embeddings/word")
    blocks = sorted({k.split("/")[0] for k in saved if k.startswith("block")}, key=lambda b: int(b[5:]))
    N = block0("attention/pre_softmax_weight")[0]
    I = block0("feedforward/intermediate/kernel")[1]
    return ReferenceConfig(layers=len(blocks), hidden=int(H), heads=int(N), intermediate=int(I), vocab=int(V),
                           positions=int(top("embeddings/position")[0]), type_vocab=int(top("embeddings/type")[0]))


@dataclasses.dataclass
class Rebuilt:
    encoder: object       # EncoderScaffold
    masked_lm: object     # layers.MaskedLM
    config: object        # engine.tf.reference.ReferenceConfig


def rebuild(savedmodel: str) -> Rebuilt:
    """Model Garden's model, built like the export built it, holding the SavedModel's variables.
    Cached per path and process."""
    key = os.path.abspath(savedmodel)
    if key in _REBUILT:
        return _REBUILT[key]
    import tensorflow as tf
    from official.nlp.tools import export_tfhub_lib

    from engine.tf import reference
    tf.get_logger().setLevel("ERROR")
    loaded = reference.load_savedmodel(savedmodel)
    source = loaded.mlm.variables if hasattr(loaded, "mlm") else loaded.variables
    saved = _normalized_names([v for v in source if v.dtype.is_floating])
    cfg = _infer_config(saved)
    with reference.talking_heads_gin_bindings():
        _, pretrainer = export_tfhub_lib._create_model(encoder_config=reference.encoder_config(cfg),
                                                       with_mlm=hasattr(loaded, "mlm"))
    if hasattr(loaded, "mlm"):
        encoder, masked_lm, variables = pretrainer.encoder_network, pretrainer.masked_lm, pretrainer.variables
    else:
        encoder, masked_lm, variables = pretrainer, None, pretrainer.variables
    ours = _normalized_names(variables)
    missing = sorted(set(ours) - set(saved))
    extra = sorted(set(saved) - set(ours))
    if missing or extra:
        raise ValueError(f"reference_trace: variables do not match the SavedModel's: rebuilt only "
                         f"{missing[:8]}, SavedModel only {extra[:8]}")
    for name, var in ours.items():
        src = saved[name]
        if tuple(var.shape) != tuple(src.shape):
            raise ValueError(f"reference_trace: {name}: rebuilt shape {tuple(var.shape)} != SavedModel "
                             f"{tuple(src.shape)}")
        var.assign(src.read_value())
    _REBUILT[key] = Rebuilt(encoder, masked_lm, cfg)
    return _REBUILT[key]


def tf_trace(savedmodel: str, inputs: dict, sink=None) -> dict:
    """TensorFlow's intermediates, by engine.core.trace's names and in its order, as NumPy arrays.

    Without masked_lm_positions the MLM steps take every position (as engine.core.trace does).
    `sink(name, array)`, when given, receives each one too.
    """
    import tensorflow as tf
    from official.nlp.modeling import layers as mg_layers
    from tf_keras.src.layers.activation import softmax as keras_softmax

    model = rebuild(savedmodel)
    enc = model.encoder
    out = {}

    def rec(name, t):
        a = t.numpy()
        out[name] = a
        if sink:
            sink(name, a)

    ids = tf.constant(np.asarray(inputs["input_word_ids"], np.int32))
    mask = tf.constant(np.asarray(inputs["input_mask"], np.int32))
    types = tf.constant(np.asarray(inputs["input_type_ids"], np.int32))
    word = enc._embedding_layer(ids)
    position = enc._position_embedding_layer(word)
    token_type = enc._type_embedding_layer(types)
    e = word + position + token_type                                   # tf_keras Add: ((w + p) + t)
    rec("embeddings/sum", e)
    x = enc._embedding_norm_layer(e)
    rec("embeddings/layer_norm", x)
    attention_mask = mg_layers.SelfAttentionMask()(x, mask)            # [B,S,T] float
    for i, block in enumerate(enc._hidden_layers):
        p = block_prefix(i)
        att = block._attention_layer
        q, k, v = att._query_dense(x), att._key_dense(x), att._value_dense(x)
        rec(p + "q", q), rec(p + "k", k), rec(p + "v", v)
        raw = tf.einsum(att._dot_product_equation, k, q)
        rec(p + "raw_scores", raw)
        scaled = tf.multiply(raw, 1.0 / math.sqrt(float(att._key_dim)))
        rec(p + "scaled_scores", scaled)
        mixed = tf.einsum(att._talking_heads_equation, scaled, att._pre_softmax_weight)
        rec(p + "mixed_scores", mixed)
        # What tf_keras' Softmax adds inside att._masked_softmax (mask expanded at the heads axis).
        mask4 = tf.expand_dims(attention_mask, axis=-len(att._attention_axes) * 2 - 1)
        adder = (1.0 - tf.cast(mask4, mixed.dtype)) * keras_softmax._large_compatible_negative(mixed.dtype)
        rec(p + "masked_scores", mixed + adder)
        probs = att._masked_softmax(mixed, attention_mask)
        rec(p + "probs", probs)
        mixed_probs = tf.einsum(att._talking_heads_equation, probs, att._post_softmax_weight)
        rec(p + "mixed_probs", mixed_probs)
        ctx = tf.einsum(att._combine_equation, mixed_probs, v)
        rec(p + "context", ctx)
        a = att._output_dense(ctx)
        rec(p + "attention_output", a)
        x = block._attention_layer_norm(x + a)
        rec(p + "attention_layer_norm", x)
        ff = block._feedforward_block
        gelu_branch = ff._inner_activation_layers[0](ff._intermediate_dense[0](x))
        gate_branch = ff._gate_dense[0](x)
        hidden = gelu_branch * gate_branch
        rec(p + "gelu_branch", gelu_branch), rec(p + "gate_branch", gate_branch), rec(p + "geglu", hidden)
        f = ff._output_dense[0](hidden)
        rec(p + "feedforward_output", f)
        x = ff._output_layer_norm[0](f + x)
        rec(p + "feedforward_layer_norm", x)
    rec("pooled_output", enc._pooler_layer(x[:, 0, :]))
    if model.masked_lm is not None:
        mlm = model.masked_lm
        positions = inputs.get("masked_lm_positions")
        if positions is None:
            B, S = ids.shape
            positions = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
        positions = tf.constant(np.asarray(positions, np.int32))
        B, P = positions.shape
        shaped = lambda t: tf.reshape(t, [B, P, -1])  # noqa: E731  [B*P,...] -> [B,P,...]
        g = mlm._gather_indexes(x, positions)
        rec("mlm/gathered", shaped(g))
        d = mlm.dense(g)
        rec("mlm/mlm_dense", shaped(d))
        t = mlm.layer_norm(d)
        rec("mlm/mlm_transform", shaped(t))
        logits = tf.nn.bias_add(tf.matmul(t, mlm.embedding_table, transpose_b=True), mlm.bias)
        rec("mlm/logits", shaped(logits))
    return out


def _outputs_of_trace(trace, num_layers: int) -> dict:
    """The Hub outputs, as a step-by-step trace holds them."""
    out = {"sequence_output": trace[block_prefix(num_layers - 1) + "feedforward_layer_norm"],
           "pooled_output": trace["pooled_output"],
           "encoder_outputs": [trace[block_prefix(i) + "feedforward_layer_norm"] for i in range(num_layers)]}
    if "mlm/logits" in trace:
        out["mlm_logits"] = trace["mlm/logits"]
    return out


def faithfulness(savedmodel: str, inputs: dict, trace: dict | None = None, exact: dict | None = None,
                 rtol: float | None = None) -> list:
    """The step-by-step TF trace against the SavedModel's own outputs: sequence_output, every
    encoder_outputs[i], pooled_output and mlm_logits.

    With `exact` (a float64 trace of the same inputs, e.g. the engine's) the judgement is
    engine.tools.verdict's, the steps in the role of the engine: both are float32 runs of TF, and
    each one's distance to float64 must be float32 noise by the other's measure. Else `rtol`, the
    verdict's fixed tolerance (parity.compare). Measured on the reference models: the steps equal
    the rebuilt model's own eager call bit for bit, and the rebuilt model run as a tf.function equals the
    SavedModel bit for bit; what remains is eager against graph execution (Grappler), i.e. float32
    noise, which at base size reaches 1e-5 x max|TF| on pooled_output."""
    from engine.tf import reference
    from engine.tools import parity
    trace = trace if trace is not None else tf_trace(savedmodel, inputs)
    has_mlm = "mlm/logits" in trace
    theirs = reference.run_savedmodel(savedmodel, inputs, mlm=has_mlm)
    L = len(theirs["encoder_outputs"])
    steps = _outputs_of_trace(trace, L)
    ref = {k: theirs[k] for k in steps}
    if exact is None:
        return parity.compare(steps, ref, rtol=verdict.DEFAULT_RTOL if rtol is None else rtol)
    truth = parity.flatten_outputs(_outputs_of_trace(exact, L))
    return verdict.judge_all(parity.flatten_outputs(steps), parity.flatten_outputs(ref), truth)


def exactness(savedmodel: str, inputs: dict, trace: dict) -> dict:
    """max|diff| of (a) the steps against the rebuilt model's own eager call and (b) the rebuilt
    model as a tf.function against the SavedModel, on sequence_output and pooled_output (both 0.0
    when the rebuild is exact)."""
    import tensorflow as tf

    from engine.tf import reference
    model = rebuild(savedmodel)
    feed = {k: tf.constant(np.asarray(v, np.int32)) for k, v in inputs.items() if k != "masked_lm_positions"}
    eager = model.encoder(feed)
    graph = tf.function(lambda d: model.encoder(d))(feed)
    saved = reference.run_savedmodel(savedmodel, inputs, mlm=False)
    L = model.config.layers
    steps = {"sequence_output": trace[block_prefix(L - 1) + "feedforward_layer_norm"],
             "pooled_output": trace["pooled_output"]}
    out = {}
    for k in steps:
        out[f"steps_vs_eager_call/{k}"] = float(np.abs(eager[k].numpy() - steps[k]).max())
        out[f"graph_call_vs_savedmodel/{k}"] = float(np.abs(graph[k].numpy() - saved[k]).max())
    return out


@dataclasses.dataclass
class TraceReport:
    faithfulness: list        # TF steps vs the SavedModel's outputs: verdict.Judgement, one per output
    diffs: list               # engine vs TF steps, in order: verdict.Judgement, one per intermediate

    @property
    def faithful(self) -> bool:
        return all(d.ok for d in self.faithfulness)

    @property
    def first(self):
        return next((d for d in self.diffs if not d.ok), None)

    @property
    def ok(self) -> bool:
        return self.faithful and self.first is None


def verify_trace(savedmodel: str, enc, inputs: dict, enc64=None, rtol: float | None = None,
                 pooled_rtol: float | None = None) -> TraceReport:
    """Engine trace (enc: an engine.Encoder in float32) against TensorFlow's step-by-step trace,
    after the faithfulness check. With `enc64` (the same weights in float64) every intermediate gets
    engine.tools.verdict's judgement against float32 noise; else the fixed tolerance rtol x max|TF|
    (pooled_rtol for pooled_output, default rtol). Every engine intermediate missing from TF's
    trace is a failure."""
    theirs = tf_trace(savedmodel, inputs)
    ours = enc.trace(inputs)
    if enc64 is not None:
        exact = enc64.trace(inputs)
        faithful = faithfulness(savedmodel, inputs, theirs, exact=exact.tensors)
        return TraceReport(faithful, verdict.judge_all(ours.tensors, theirs, exact.tensors, names=ours.names(),
                                                       parents=verdict.trace_parents(enc.config.num_layers)))
    rtol = verdict.DEFAULT_RTOL if rtol is None else rtol
    faithful = faithfulness(savedmodel, inputs, theirs, rtol=rtol)
    ordered = {name: theirs[name] for name in ours.names() if name in theirs}
    diffs = compare.compare(ordered, ours.tensors, rtol, pooled_rtol=pooled_rtol)
    missing = [n for n in ours.names() if n not in theirs]
    diffs += [verdict.not_compared(n, "missing", "not in the TF trace", verdict.TOLERANCE_RULE, rtol) for n in missing]
    return TraceReport(faithful, diffs)
