"""TensorFlow's own intermediates, step by step, with Model Garden's layers: the other side of the trace.

The model is rebuilt with the same code that exported it (`export_tfhub_lib._create_model` for the
SavedModel's family, as `engine.tf.reference` does), every variable is copied in from the
SavedModel (`tf.saved_model.load(dir).mlm.variables`, both sides matched to the datasets of
`weights.format` by the extractor's rules, weights.tf_names.match_variables), and the layers' own
methods are called one step at a time:

    embeddings   encoder._embedding_layer, ._position_embedding_layer, ._type_embedding_layer,
                 then word + position + type (the Add layer's order) and ._embedding_norm_layer
    attention    att._query_dense / _key_dense / _value_dense,
                 talking heads (TalkingHeadsAttention): tf.einsum(att._dot_product_equation, k, q),
                 x 1/sqrt(att._key_dim), tf.einsum(att._talking_heads_equation, s, att._pre_softmax_weight);
                 multi-head (tf_keras' MultiHeadAttention): the same einsum on q x 1/sqrt(att._key_dim),
                 as it scales the query first (raw_scores: the einsum on q itself);
                 the additive mask as tf_keras' Softmax adds it, att._masked_softmax,
                 talking heads: tf.einsum(att._talking_heads_equation, p, att._post_softmax_weight);
                 tf.einsum(att._combine_equation, p, v), att._output_dense
    block        block._attention_layer_norm(x + a)
    feedforward  GEGLU (GatedFeedforward): ff._intermediate_dense[0], ff._inner_activation_layers[0],
                 ff._gate_dense[0], their product, ff._output_dense[0], ff._output_layer_norm[0](out + x);
                 dense (TransformerEncoderBlock): block._intermediate_dense,
                 ._intermediate_activation_layer, ._output_dense, ._output_layer_norm(out + x)
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

import numpy as np

from weights.format import block_prefix
from weights.tf_names import SourceModel, SourceVariable, match_variables
from engine.tools import compare, verdict

_REBUILT = {}


def _matched(path: str, variables, activations=None):
    """(config, {dataset path: tf.Variable}) of TF variables, by weights.tf_names.match_variables."""
    floats = {v.name: v for v in variables if v.dtype.is_floating}
    source = SourceModel(path, [SourceVariable(v.name, tuple(int(d) for d in v.shape), v.dtype.name, v.numpy)
                                for v in floats.values()], [], False, None, None, None, None, activations=activations)
    plan = match_variables(source)
    return plan.config, {path: floats[var.name] for path, var in plan.mapping.items()}


@dataclasses.dataclass
class Rebuilt:
    encoder: object       # EncoderScaffold or BertEncoder
    masked_lm: object     # layers.MaskedLM
    config: object        # engine.tf.reference.ReferenceConfig
    family: str           # engine.tf.reference.FAMILIES


def rebuild(savedmodel: str) -> Rebuilt:
    """Model Garden's model, built like the export built it, holding the SavedModel's variables.
    Cached per path and process."""
    key = os.path.abspath(savedmodel)
    if key in _REBUILT:
        return _REBUILT[key]
    import tensorflow as tf
    from official.nlp.tools import export_tfhub_lib

    from engine.tf import export, extract, reference
    tf.get_logger().setLevel("ERROR")
    loaded = reference.load_savedmodel(savedmodel)
    with_mlm = hasattr(loaded, "mlm")
    c, saved = _matched(key, loaded.mlm.variables if with_mlm else loaded.variables, extract.read_activations(key))
    family = export.reference_family(c, f"reference_trace: {key}")
    cfg = reference.ReferenceConfig(layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads,
                                    intermediate=c.intermediate_size, vocab=c.vocab_size,
                                    positions=c.max_position_embeddings, type_vocab=c.type_vocab_size)
    encoder_config = reference.encoder_config(cfg, c.hidden_activation)
    with reference.family_scope(family):
        _, pretrainer = export_tfhub_lib._create_model(encoder_config=encoder_config, with_mlm=with_mlm)
    if with_mlm:
        encoder, masked_lm = pretrainer.encoder_network, pretrainer.masked_lm
    else:
        encoder, masked_lm = pretrainer, None
    _, ours = _matched("(rebuilt)", pretrainer.variables)
    if set(ours) != set(saved):
        raise ValueError(f"reference_trace: variables do not match the SavedModel's: rebuilt only "
                         f"{sorted(set(ours) - set(saved))[:8]}, SavedModel only {sorted(set(saved) - set(ours))[:8]}")
    for path, var in ours.items():
        var.assign(saved[path].read_value())
    _REBUILT[key] = Rebuilt(encoder, masked_lm, cfg, family)
    return _REBUILT[key]


def _attention_steps(block, x, attention_mask, talking_heads: bool, rec):
    """The attention of one block, step by step (TalkingHeadsAttention or tf_keras' MultiHeadAttention),
    then its LayerNorm; returns the block's attention_layer_norm."""
    import tensorflow as tf
    from tf_keras.src.layers.activation import softmax as keras_softmax
    att = block._attention_layer
    q, k, v = att._query_dense(x), att._key_dense(x), att._value_dense(x)
    rec("q", q), rec("k", k), rec("v", v)
    raw = tf.einsum(att._dot_product_equation, k, q)
    rec("raw_scores", raw)
    scale = 1.0 / math.sqrt(float(att._key_dim))
    if talking_heads:
        scaled = tf.multiply(raw, scale)
        rec("scaled_scores", scaled)
        scores = tf.einsum(att._talking_heads_equation, scaled, att._pre_softmax_weight)
        rec("mixed_scores", scores)
    else:  # MultiHeadAttention scales the query, not the product
        scores = tf.einsum(att._dot_product_equation, k, tf.multiply(q, scale))
        rec("scaled_scores", scores)
    # What tf_keras' Softmax adds inside att._masked_softmax (mask expanded at the heads axis).
    mask4 = tf.expand_dims(attention_mask, axis=-len(att._attention_axes) * 2 - 1)
    adder = (1.0 - tf.cast(mask4, scores.dtype)) * keras_softmax._large_compatible_negative(scores.dtype)
    rec("masked_scores", scores + adder)
    probs = att._masked_softmax(scores, attention_mask)
    rec("probs", probs)
    if talking_heads:
        probs = tf.einsum(att._talking_heads_equation, probs, att._post_softmax_weight)
        rec("mixed_probs", probs)
    ctx = tf.einsum(att._combine_equation, probs, v)
    rec("context", ctx)
    a = att._output_dense(ctx)
    rec("attention_output", a)
    x = block._attention_layer_norm(x + a)
    rec("attention_layer_norm", x)
    return x


def _geglu_steps(block, x, rec):
    """GatedFeedforward, step by step; returns the block's output."""
    ff = block._feedforward_block
    gelu_branch = ff._inner_activation_layers[0](ff._intermediate_dense[0](x))
    gate_branch = ff._gate_dense[0](x)
    hidden = gelu_branch * gate_branch
    rec("gelu_branch", gelu_branch), rec("gate_branch", gate_branch), rec("geglu", hidden)
    f = ff._output_dense[0](hidden)
    rec("feedforward_output", f)
    x = ff._output_layer_norm[0](f + x)
    rec("feedforward_layer_norm", x)
    return x


def _dense_steps(block, x, rec):
    """TransformerEncoderBlock's feed-forward, step by step; returns the block's output."""
    gelu_branch = block._intermediate_activation_layer(block._intermediate_dense(x))
    rec("gelu_branch", gelu_branch)
    f = block._output_dense(gelu_branch)
    rec("feedforward_output", f)
    x = block._output_layer_norm(f + x)
    rec("feedforward_layer_norm", x)
    return x


def tf_trace(savedmodel: str, inputs: dict, sink=None) -> dict:
    """TensorFlow's intermediates, by engine.core.trace's names and in its order, as NumPy arrays.

    Without masked_lm_positions the MLM steps take every position (as engine.core.trace does).
    `sink(name, array)`, when given, receives each one too.
    """
    import tensorflow as tf
    from official.nlp.modeling import layers as mg_layers

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
    talking_heads = model.family == "talking_heads"
    for i, block in enumerate(enc._hidden_layers if talking_heads else enc._transformer_layers):
        record = lambda name, t, p=block_prefix(i): rec(p + name, t)  # noqa: E731
        x = _attention_steps(block, x, attention_mask, talking_heads, record)
        x = (_geglu_steps if talking_heads else _dense_steps)(block, x, record)
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
