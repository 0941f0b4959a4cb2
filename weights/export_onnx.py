"""Writes an ONNX graph of the model from an HDF5 weights file: the `onnx` package only (no
TensorFlow, no tf2onnx), so a model extracted once deploys wherever ONNX Runtime runs.

    from weights.export_onnx import export_onnx
    export_onnx("model.h5", "model.onnx")              # encoder: Hub inputs -> Hub outputs
    export_onnx("model.h5", "model_mlm.onnx", mlm=True)  # + masked_lm_positions -> mlm_logits

The graph is the math of engine/core/model.py written in standard ONNX operators (opset 17),
with the Hub model's names:

    inputs   input_word_ids, input_mask, input_type_ids   int32 [batch, seq]
             masked_lm_positions                           int32 [batch, num_masked]   (mlm=True)
    outputs  pooled_output [batch, H], default (the same), sequence_output [batch, seq, H],
             encoder_outputs_0 .. encoder_outputs_{L-1} [batch, seq, H]
             mlm_logits [batch, num_masked, V]                                         (mlm=True)

batch, seq and num_masked are dynamic axes. Letters as in engine/core/kernels.py. Choices, each for
a reason:
- Q, K and V are one MatMul against [Wq|Wk|Wv] ([B,S,H] @ [H,3ND]) and a Split: one GEMM instead
  of three (the fast path does the same). The GEGLU's two input products stay separate: the
  GELU branch and the gate branch then read as in the readable model.
- The talking-heads mix is W^T @ x on x viewed as [B,N,S*T]: a broadcast MatMul over the head
  axis, no transposes (engine.core.kernels.talking_heads_mix).
- The 1/sqrt(D) scale is a Mul after q.k, as in TalkingHeadsAttention; folded into W_pre only
  where that is exact (1/sqrt(D) a power of two, e.g. D = 64).
- Layer norm is the opset-17 LayerNormalization operator; the tanh GELU is written out
  (0.5x(1+tanh(k(x+0.044715x^3)))), which ONNX Runtime fuses into its own GELU kernel; the erf GELU
  is 0.5x(1+Erf(x/sqrt2)) with ONNX's Erf.
- The family follows the config: multi-head attention has no mixing MatMuls (the scale stays a
  Mul), a dense feed-forward no gate.
- The MLM decoder is a Gemm with transB on the word table: the tied weight is stored once.
- The mask adder is (1 - mask) * -1e9 in float32, as the Hub model computes it.
The model's config and the weights file's provenance travel in the graph's metadata_props.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from weights import format as fmt
from weights.load import load
from weights.write import atomic_output

OPSET = 17


class OnnxExportError(ValueError):
    """The ONNX package is missing or the written graph fails onnx's checker."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:  # pragma: no cover - onnx is in requirements/lock.txt
        raise OnnxExportError(f"export-onnx needs the `onnx` package ({e}); run scripts/setup.sh") from e
    return onnx, helper, numpy_helper


class _Graph:
    """A small builder: nodes, initializers and unique names."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self._count = [], [], 0

    def const(self, name, array):
        # np.array, not ascontiguousarray: that would make a 0-d index 1-d
        self.initializers.append(self.numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def op(self, op_type, inputs, name=None, outputs=1, **attrs):
        self._count += 1
        base = name or f"{op_type.lower()}_{self._count}"
        outs = [base] if outputs == 1 else [f"{base}_{i}" for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=f"{base}/{op_type}", **attrs))
        return outs[0] if outputs == 1 else outs


def _power_of_two(x: float) -> bool:
    m, _ = math.frexp(x)
    return m == 0.5


def build_model(weights, mlm: bool = False):
    """The onnx.ModelProto for a weights.LoadedWeights (encoder, or encoder + MLM head)."""
    onnx, helper, numpy_helper = _onnx()
    cfg, t = weights.config, weights.tensors
    if mlm and not cfg.has_mlm:
        raise OnnxExportError(f"{weights.path}: encoder-only weights (has_mlm false): no MLM graph to export")
    H, N, D, I, L = cfg.hidden_size, cfg.num_heads, cfg.head_size, cfg.intermediate_size, cfg.num_layers
    ND = N * D
    g = _Graph(helper, numpy_helper)
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    one, half = g.const("one", f32(1.0)), g.const("half", f32(0.5))
    gelu_c, gelu_k = g.const("gelu_coeff", f32(0.044715)), g.const("sqrt_2_over_pi", f32(0.7978845608028654))
    sqrt_half = g.const("sqrt_half", f32(0.7071067811865476))
    mask_constant = g.const("mask_constant", f32(cfg.attention_mask_constant))
    scale = 1.0 / math.sqrt(float(D))
    fold_scale = _power_of_two(scale) and cfg.talking_heads   # folded into W_pre; without mixing, a Mul
    score_scale = None if fold_scale else g.const("score_scale", f32(scale))
    shape_bnx = g.const("shape_b_n_rest", np.array([0, N, -1], np.int64))      # [B,N,S*T]
    shape_bsnd = g.const("shape_b_s_n_d", np.array([0, 0, N, D], np.int64))    # [B,S,N,D]
    shape_bsx = g.const("shape_b_s_rest", np.array([0, 0, -1], np.int64))      # [B,S,ND]
    split_sizes = g.const("qkv_split", np.array([ND, ND, ND], np.int64))

    def gelu(x, name):
        """The config's GELU: gelu_tanh or gelu_erf."""
        return gelu_tanh(x, name) if cfg.hidden_activation == "gelu_tanh" else gelu_erf(x, name)

    def gelu_erf(x, name):
        """0.5 x (1 + erf(x / sqrt 2)), ONNX's Erf in float32 (the engine computes it in float64)."""
        erf = g.op("Erf", [g.op("Mul", [x, sqrt_half])])
        return g.op("Mul", [g.op("Mul", [half, x]), g.op("Add", [one, erf])], name=name)

    def gelu_tanh(x, name):
        """0.5 x (1 + tanh(k (x + c x^3))), in engine.core.kernels.gelu_tanh's order."""
        cube = g.op("Mul", [g.op("Mul", [x, x]), x])
        inner = g.op("Mul", [gelu_k, g.op("Add", [x, g.op("Mul", [gelu_c, cube])])])
        return g.op("Mul", [g.op("Mul", [half, x]), g.op("Add", [one, g.op("Tanh", [inner])])], name=name)

    def dense(x, kernel, bias, name):
        return g.op("Add", [g.op("MatMul", [x, g.const(f"{name}/kernel", kernel)]), g.const(f"{name}/bias", bias)],
                    name=name)

    def layer_norm(x, gamma, beta, name):
        return g.op("LayerNormalization", [x, g.const(f"{name}/gamma", gamma), g.const(f"{name}/beta", beta)],
                    name=name, axis=-1, epsilon=float(cfg.layer_norm_epsilon))

    def mix(x, weight, name):
        """out[b,m,s,t] = sum_n x[b,n,s,t] weight[n,m]: W^T @ x[b] on [N,S*T]. [B,N,S,T] -> [B,N,S,T]"""
        flat = g.op("Reshape", [x, shape_bnx])                                          # [B,N,S*T]
        mixed = g.op("MatMul", [g.const(f"{name}/weight_t", np.ascontiguousarray(weight.T)), flat])
        return g.op("Reshape", [mixed, g.op("Shape", [x])], name=name)                  # [B,N,S,T]

    # ---- inputs
    dims = lambda *names: [helper.make_tensor_value_info(n, onnx.TensorProto.INT32, ["batch", "seq"]) for n in names]  # noqa: E731
    inputs = dims("input_word_ids", "input_mask", "input_type_ids")
    if mlm:
        inputs.append(helper.make_tensor_value_info("masked_lm_positions", onnx.TensorProto.INT32, ["batch", "num_masked"]))

    # ---- embeddings: (word[ids] + position[:S]) + type[type_ids], LN                 [B,S,H]
    seq_len = g.op("Slice", [g.op("Shape", ["input_word_ids"]), g.const("one_i64", np.array([1], np.int64)),
                             g.const("two_i64", np.array([2], np.int64))])             # [1] = S
    positions = g.op("Slice", [g.const("embeddings/position", t["embeddings/position"]),
                               g.const("zero_i64", np.array([0], np.int64)), seq_len])   # [S,H]
    word = g.op("Gather", [g.const("embeddings/word", t["embeddings/word"]), "input_word_ids"])
    types = g.op("Gather", [g.const("embeddings/type", t["embeddings/type"]), "input_type_ids"])
    e = g.op("Add", [g.op("Add", [word, positions]), types], name="embeddings/sum")
    x = layer_norm(e, t["embeddings/layer_norm/gamma"], t["embeddings/layer_norm/beta"], "embeddings/layer_norm")

    # ---- the additive mask: (1 - mask) * constant                                  [B,1,1,T]
    mask_f = g.op("Cast", ["input_mask"], to=onnx.TensorProto.FLOAT)
    adder = g.op("Mul", [g.op("Sub", [one, mask_f]), mask_constant])
    adder = g.op("Unsqueeze", [adder, g.const("axes_1_2", np.array([1, 2], np.int64))], name="mask_adder")

    layer_outputs = []
    for i in range(L):
        p = fmt.block_prefix(i).rstrip("/")                                           # node names
        w = lambda name: t[fmt.block_path(i, name)]  # noqa: E731
        # attention
        qkv_kernel = np.concatenate([w(f"attention/{n}/kernel").reshape(H, ND) for n in ("query", "key", "value")], axis=1)
        qkv_bias = np.concatenate([w(f"attention/{n}/bias").reshape(ND) for n in ("query", "key", "value")])
        qkv = dense(x, qkv_kernel, qkv_bias, f"{p}/attention/qkv")                     # [B,S,3ND]
        q, k, v = g.op("Split", [qkv, split_sizes], outputs=3, axis=-1)               # [B,S,ND] each
        q = g.op("Transpose", [g.op("Reshape", [q, shape_bsnd])], perm=[0, 2, 1, 3])  # [B,N,S,D]
        k = g.op("Transpose", [g.op("Reshape", [k, shape_bsnd])], perm=[0, 2, 3, 1])  # [B,N,D,T]
        v = g.op("Transpose", [g.op("Reshape", [v, shape_bsnd])], perm=[0, 2, 1, 3])  # [B,N,T,D]
        scores = g.op("MatMul", [q, k], name=f"{p}/attention/raw_scores")             # [B,N,S,T]
        if not fold_scale:
            scores = g.op("Mul", [scores, score_scale], name=f"{p}/attention/scaled_scores")
        if cfg.talking_heads:
            pre = w("attention/pre_softmax_weight")
            if fold_scale:   # exact: multiplying by a power of two commutes with every rounding
                pre = pre * np.float32(scale)
            scores = mix(scores, pre, f"{p}/attention/pre_softmax_mix")               # [B,N,S,T]
        probs = g.op("Softmax", [g.op("Add", [scores, adder])], name=f"{p}/attention/probs", axis=-1)
        if cfg.talking_heads:
            probs = mix(probs, w("attention/post_softmax_weight"), f"{p}/attention/post_softmax_mix")
        ctx = g.op("MatMul", [probs, v])                                               # [B,N,S,D]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), shape_bsx])  # [B,S,ND]
        a = dense(ctx, w("attention/output/kernel").reshape(ND, H), w("attention/output/bias"), f"{p}/attention/output")
        x = layer_norm(g.op("Add", [x, a]), w("attention_layer_norm/gamma"), w("attention_layer_norm/beta"),
                       f"{p}/attention_layer_norm")                                    # [B,S,H]
        # feed-forward: GEGLU, or a dense GELU layer
        hidden = gelu(dense(x, w("feedforward/intermediate/kernel"), w("feedforward/intermediate/bias"),
                            f"{p}/feedforward/intermediate"), f"{p}/feedforward/gelu")  # [B,S,I]
        if cfg.gated:
            gate = dense(x, w("feedforward/gate/kernel"), w("feedforward/gate/bias"), f"{p}/feedforward/gate")
            hidden = g.op("Mul", [hidden, gate], name=f"{p}/feedforward/geglu")       # [B,S,I]
        f = dense(hidden, w("feedforward/output/kernel"), w("feedforward/output/bias"), f"{p}/feedforward/output")
        x = layer_norm(g.op("Add", [f, x]), w("feedforward_layer_norm/gamma"), w("feedforward_layer_norm/beta"),
                       f"{p}/feedforward_layer_norm")                                  # [B,S,H]
        layer_outputs.append(x)

    # ---- outputs
    cls = g.op("Gather", [x, g.const("zero_scalar_i64", np.array(0, np.int64))], axis=1)      # [B,H]
    pooled = g.op("Tanh", [dense(cls, t["pooler/kernel"], t["pooler/bias"], "pooler")])
    hidden_dims = ["batch", "seq", H]
    outputs = [("pooled_output", pooled, ["batch", H]), ("default", pooled, ["batch", H]),
               ("sequence_output", layer_outputs[-1], hidden_dims)]
    outputs += [(f"encoder_outputs_{i}", y, hidden_dims) for i, y in enumerate(layer_outputs)]
    if mlm:
        # gather the masked positions: GatherND with one batch dim, [B,S,H] x [B,P,1] -> [B,P,H]
        pos = g.op("Unsqueeze", [g.op("Cast", ["masked_lm_positions"], to=onnx.TensorProto.INT64),
                                 g.const("axis_last", np.array([-1], np.int64))])
        gathered = g.op("GatherND", [x, pos], name="mlm/gathered", batch_dims=1)
        m = gelu(dense(gathered, t["mlm/transform/kernel"], t["mlm/transform/bias"], "mlm/transform"), "mlm/gelu")
        m = layer_norm(m, t["mlm/layer_norm/gamma"], t["mlm/layer_norm/beta"], "mlm/layer_norm")   # [B,P,H]
        flat = g.op("Reshape", [m, g.const("shape_rows_h", np.array([-1, H], np.int64))])       # [B*P,H]
        logits = g.op("Gemm", [flat, "embeddings/word", g.const("mlm/output_bias", t["mlm/output_bias"])],
                      transB=1)                                                              # [B*P,V]
        bp = g.op("Slice", [g.op("Shape", ["masked_lm_positions"]), "zero_i64", "two_i64"])  # [B,P]
        shape_bpv = g.op("Concat", [bp, g.const("vocab_dim", np.array([cfg.vocab_size], np.int64))], axis=0)
        outputs.append(("mlm_logits", g.op("Reshape", [logits, shape_bpv]), ["batch", "num_masked", cfg.vocab_size]))

    graph_outputs = []
    for name, tensor, shape in outputs:
        g.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"{name}/Identity"))
        graph_outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    graph = helper.make_graph(g.nodes, "talkheads_ggelu_bert" + ("_mlm" if mlm else ""), inputs, graph_outputs,
                              initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="talkheads-ggelu-engine weights.export_onnx")
    model.ir_version = 8   # opset 17's IR version: readable by ONNX Runtime >= 1.13
    meta = {"config": json.dumps(cfg.to_attrs()), "source_weights": os.path.abspath(weights.path),
            "weights_format_version": str(fmt.FORMAT_VERSION),
            "provenance": json.dumps({k: str(v) for k, v in weights.provenance.items()})}
    helper.set_model_props(model, meta)
    return model


def export_onnx(weights_path: str, out_path: str, *, mlm: bool = False, force: bool = False) -> str:
    """Builds the graph from the weights file, checks it with onnx's checker, writes it atomically.
    Returns the output's absolute path. OnnxExportError on a bad graph; weights.WeightsFileError on
    a bad weights file; FileExistsError when out_path exists without force."""
    onnx, _, _ = _onnx()
    loaded = load(weights_path)
    model = build_model(loaded, mlm=mlm)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:   # onnx raises its own ValidationError / InferenceError
        raise OnnxExportError(f"{out_path}: the graph fails onnx's checker: {e}") from e
    out = os.path.abspath(out_path)
    with atomic_output(out, force) as tmp:
        onnx.save_model(model, tmp)
    return out
