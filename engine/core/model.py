"""The encoder and the MLM model, assembled from `engine.core.kernels`.

    E   = word[ids] + position[:S] + type[type_ids]          [B,S,H]
    x   = LN(E)
    for each of the L blocks:
        x = LN_attn(x + TalkingHeadsAttention(x))           [B,S,H]
        x = LN_ffn(x + GEGLU(x))                             [B,S,H]
    pooled = tanh(x[:,0]·Wp + bp)                            [B,H]
    mlm    = LN(gelu(x[b,pos]·Wd + bd)) · word^T + bias      [B,P,V]

Letters: see engine.core.kernels. The API mirrors the Hub model: `enc(inputs)` and `enc.mlm(inputs)`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.core import backend as backend_mod
from engine.core import kernels as K
from engine.core import tape as tape_mod
from engine.core import trace as trace_mod
from engine.core.inputs import validate
from weights.format import ModelConfig, expected_shapes


@dataclasses.dataclass
class AttentionWeights:
    """Talking-heads attention weights of one block (arrays of the engine's backend and dtype)."""
    query_kernel: object          # [H,N,D]
    query_bias: object            # [N,D]
    key_kernel: object            # [H,N,D]
    key_bias: object              # [N,D]
    value_kernel: object          # [H,N,D]
    value_bias: object            # [N,D]
    output_kernel: object         # [N,D,H]
    output_bias: object           # [H]
    pre_softmax_weight: object    # [N,N]
    post_softmax_weight: object   # [N,N]


@dataclasses.dataclass
class FeedForwardWeights:
    """GEGLU weights of one block."""
    intermediate_kernel: object   # [H,I]  GELU branch ("intermediate_0")
    intermediate_bias: object     # [I]
    gate_kernel: object           # [H,I]  linear branch ("gate_0")
    gate_bias: object             # [I]
    output_kernel: object         # [I,H]  ("output_0")
    output_bias: object           # [H]


@dataclasses.dataclass
class BlockWeights:
    attention: AttentionWeights
    attention_ln: tuple           # (gamma [H], beta [H])
    feedforward: FeedForwardWeights
    feedforward_ln: tuple         # (gamma [H], beta [H])


def _block_weights(tensors, i, put) -> BlockWeights:
    """Reads block i from the HDF5 paths of weights/format.py."""
    t = lambda name: put(tensors[f"layers/{i}/{name}"])  # noqa: E731
    attention = AttentionWeights(
        query_kernel=t("attention/query/kernel"), query_bias=t("attention/query/bias"),
        key_kernel=t("attention/key/kernel"), key_bias=t("attention/key/bias"),
        value_kernel=t("attention/value/kernel"), value_bias=t("attention/value/bias"),
        output_kernel=t("attention/output/kernel"), output_bias=t("attention/output/bias"),
        pre_softmax_weight=t("attention/pre_softmax_weight"), post_softmax_weight=t("attention/post_softmax_weight"))
    feedforward = FeedForwardWeights(
        intermediate_kernel=t("feedforward/intermediate/kernel"), intermediate_bias=t("feedforward/intermediate/bias"),
        gate_kernel=t("feedforward/gate/kernel"), gate_bias=t("feedforward/gate/bias"),
        output_kernel=t("feedforward/output/kernel"), output_bias=t("feedforward/output/bias"))
    return BlockWeights(attention, (t("attention_layer_norm/gamma"), t("attention_layer_norm/beta")),
                        feedforward, (t("feedforward_layer_norm/gamma"), t("feedforward_layer_norm/beta")))


def transformer_block(x, mask_adder, w: BlockWeights, config: ModelConfig, record=None):
    """One post-LN block: attention, residual, LN; GEGLU, residual, LN. [B,S,H] -> [B,S,H]"""
    rec = record or (lambda name, value: None)
    a = K.talking_heads_attention(x, mask_adder, w.attention, record=record)        # [B,S,H]
    x = K.layer_norm(x + a, *w.attention_ln, config.layer_norm_epsilon)              # [B,S,H]
    rec("attention_layer_norm", x)
    f = K.geglu_feedforward(x, w.feedforward, record=record)            # [B,S,H]
    x = K.layer_norm(f + x, *w.feedforward_ln, config.layer_norm_epsilon)            # [B,S,H]
    rec("feedforward_layer_norm", x)
    return x


OUTPUT_NAMES = ("pooled_output", "sequence_output", "encoder_outputs", "default")


class Encoder:
    """Talking-heads GEGLU BERT on NumPy or CuPy, called like the TF Hub SavedModel.

        enc = engine.load("model.h5")
        out = enc({"input_word_ids": ids, "input_mask": mask, "input_type_ids": types})
        out["pooled_output"]    # [B,H]    (also out["default"])
        out["sequence_output"]  # [B,S,H]
        out["encoder_outputs"]  # L arrays [B,S,H], the last equal to sequence_output
        enc.mlm({**inputs, "masked_lm_positions": pos})["mlm_logits"]   # [B,P,V]

    Outputs are arrays of the chosen backend (CuPy arrays on "cupy"); `engine.to_numpy(out)` or
    `enc.to_numpy(out)` brings any output (or the whole dict) back to NumPy.
    """

    def __init__(self, config: ModelConfig, tensors: dict, *, backend: str | None = None,
                 dtype: str = "float32", vocab=None):
        self.config = config
        self.backend = backend_mod.resolve_name(backend)
        self.xp = backend_mod.get_xp(self.backend)
        self.dtype = backend_mod.check_dtype(dtype)
        self.vocab = vocab
        shapes = expected_shapes(config)
        missing = [k for k in shapes if k not in tensors]
        if missing:
            raise ValueError(f"weights: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        bad = [f"{k} {tuple(tensors[k].shape)} != {s}" for k, s in shapes.items() if tuple(tensors[k].shape) != s]
        if bad:
            raise ValueError(f"weights: mis-shaped tensors: {'; '.join(bad[:5])}")
        put = lambda a: self.xp.asarray(np.asarray(a), dtype=self.dtype)  # noqa: E731
        self.word_table = put(tensors["embeddings/word"])                  # [V,H]
        self.position_table = put(tensors["embeddings/position"])          # [P,H]
        self.type_table = put(tensors["embeddings/type"])                  # [T,H]
        self.embedding_ln = (put(tensors["embeddings/layer_norm/gamma"]), put(tensors["embeddings/layer_norm/beta"]))
        self.blocks = [_block_weights(tensors, i, put) for i in range(config.num_layers)]
        self.pooler_kernel, self.pooler_bias = put(tensors["pooler/kernel"]), put(tensors["pooler/bias"])
        self.has_mlm = config.has_mlm
        if self.has_mlm:
            self.mlm_weights = dict(
                transform_kernel=put(tensors["mlm/transform/kernel"]), transform_bias=put(tensors["mlm/transform/bias"]),
                ln_gamma=put(tensors["mlm/layer_norm/gamma"]), ln_beta=put(tensors["mlm/layer_norm/beta"]),
                output_bias=put(tensors["mlm/output_bias"]))
        # A faster forward of the same encoder (engine.fast or engine.gpu), attached by engine.Encoder:
        # its encode(ids, mask, types, skip_padding) replaces the readable one below when nothing is
        # recorded. The core itself never imports them.
        self.fast_forward = None
        # The tape's element-wise kernels when enc.tape(kernels=None): None is the readable set;
        # engine.Encoder(..., fast=True) attaches the fused set of engine/fast/tape_kernels.py.
        self.tape_kernels = None

    # -------------------------------------------------------------------------------- forward

    def _device_inputs(self, inputs, with_positions):
        ids, mask, types, positions = validate(inputs, self.config, with_positions)
        xp = self.xp
        return (xp.asarray(ids), xp.asarray(mask), xp.asarray(types),
                None if positions is None else xp.asarray(positions))

    def _encode(self, ids, mask, types, record=None, skip_padding=False, keep="all"):
        """Embeddings, the L blocks and the pooler. Returns (encoder_outputs, pooled). keep: "all"
        block outputs, the "last" one only, or none ("pooled"): a faster path may then skip
        materializing them (the readable path computes them all the same)."""
        if skip_padding and not getattr(self.fast_forward, "skips_padding", False):
            raise ValueError("skip_padding=True needs the fast path: engine.load(..., fast=True)")
        if self.fast_forward is not None and record is None:
            return self.fast_forward.encode(ids, mask, types, skip_padding=skip_padding, keep=keep)
        cfg = self.config
        rec = record or (lambda name, value: None)
        e = K.embed(ids, types, self.word_table, self.position_table, self.type_table)   # [B,S,H]
        rec("embeddings/sum", e)
        x = K.layer_norm(e, *self.embedding_ln, cfg.layer_norm_epsilon)                  # [B,S,H]
        rec("embeddings/layer_norm", x)
        mask_adder = K.attention_mask_adder(mask, self.dtype, cfg.attention_mask_constant)  # [B,1,1,T]
        outputs = []
        for i, w in enumerate(self.blocks):
            block_rec = (lambda name, value, i=i: rec(f"layers/{i}/{name}", value)) if record else None
            x = transformer_block(x, mask_adder, w, cfg, record=block_rec)               # [B,S,H]
            outputs.append(x)
        pooled = K.pooler(x, self.pooler_kernel, self.pooler_bias)                       # [B,H]
        rec("pooled_output", pooled)
        return outputs, pooled

    def __call__(self, inputs, skip_padding=False, outputs=None):
        """Encoder outputs for a dict of input_word_ids, input_mask, input_type_ids ([B,S] ints).
        skip_padding=True (fast path only): padded positions are not computed (zeros); see
        engine/fast/forward.py. outputs: the names to return (default: all four, as the Hub model);
        asking for fewer lets the fast path skip materializing the others, e.g.
        outputs=("pooled_output",) keeps no [B,S,H] array at all."""
        names = OUTPUT_NAMES if outputs is None else tuple(outputs)
        unknown = [n for n in names if n not in OUTPUT_NAMES]
        if unknown:
            raise ValueError(f"outputs: unknown {unknown}; choose from {list(OUTPUT_NAMES)}")
        keep = "all" if "encoder_outputs" in names else "last" if "sequence_output" in names else "pooled"
        ids, mask, types, _ = self._device_inputs(inputs, with_positions=False)
        layers, pooled = self._encode(ids, mask, types, skip_padding=skip_padding, keep=keep)
        result = {"pooled_output": pooled, "sequence_output": layers[-1] if layers else None,
                  "encoder_outputs": layers, "default": pooled}
        return {n: result[n] for n in OUTPUT_NAMES if n in names}

    def mlm(self, inputs, record=None, skip_padding=False):
        """The `.mlm` call: the encoder outputs plus mlm_logits [B,P,V] at masked_lm_positions [B,P]."""
        if not self.has_mlm:
            raise ValueError("this weights file is encoder-only (has_mlm false): no .mlm head")
        ids, mask, types, positions = self._device_inputs(inputs, with_positions=True)
        outputs, pooled = self._encode(ids, mask, types, record=record, skip_padding=skip_padding)
        gathered = K.gather_positions(outputs[-1], positions)                            # [B,P,H]
        if record:
            record("mlm/gathered", gathered)
        m = self.mlm_weights
        logits = K.mlm_logits(gathered, m["transform_kernel"], m["transform_bias"], m["ln_gamma"], m["ln_beta"],
                              self.word_table, m["output_bias"], self.config.layer_norm_epsilon,
                              record=(lambda n, v: record(f"mlm/{n}", v)) if record else None)
        if record:
            record("mlm/logits", logits)
        return {"mlm_logits": logits, "pooled_output": pooled, "sequence_output": outputs[-1],
                "encoder_outputs": outputs}

    def parameters(self) -> dict:
        """{HDF5 dataset path: the live array} of every weight, in the order of
        weights.format.expected_shapes. Updating these arrays in place (an optimizer does) changes
        the readable model; a fast or GPU path attached at load keeps its own derived copies, so
        reload the saved weights to use it afterwards."""
        out = {"embeddings/word": self.word_table, "embeddings/position": self.position_table,
               "embeddings/type": self.type_table, "embeddings/layer_norm/gamma": self.embedding_ln[0],
               "embeddings/layer_norm/beta": self.embedding_ln[1]}
        for i, w in enumerate(self.blocks):
            a, f = w.attention, w.feedforward
            for name in ("query", "key", "value", "output"):
                out[f"layers/{i}/attention/{name}/kernel"] = getattr(a, f"{name}_kernel")
                out[f"layers/{i}/attention/{name}/bias"] = getattr(a, f"{name}_bias")
            out[f"layers/{i}/attention/pre_softmax_weight"] = a.pre_softmax_weight
            out[f"layers/{i}/attention/post_softmax_weight"] = a.post_softmax_weight
            out[f"layers/{i}/attention_layer_norm/gamma"], out[f"layers/{i}/attention_layer_norm/beta"] = w.attention_ln
            for name in ("intermediate", "gate", "output"):
                out[f"layers/{i}/feedforward/{name}/kernel"] = getattr(f, f"{name}_kernel")
                out[f"layers/{i}/feedforward/{name}/bias"] = getattr(f, f"{name}_bias")
            out[f"layers/{i}/feedforward_layer_norm/gamma"], out[f"layers/{i}/feedforward_layer_norm/beta"] = w.feedforward_ln
        out["pooler/kernel"], out["pooler/bias"] = self.pooler_kernel, self.pooler_bias
        if self.has_mlm:
            m = self.mlm_weights
            out.update({"mlm/transform/kernel": m["transform_kernel"], "mlm/transform/bias": m["transform_bias"],
                        "mlm/layer_norm/gamma": m["ln_gamma"], "mlm/layer_norm/beta": m["ln_beta"],
                        "mlm/output_bias": m["output_bias"]})
        return {path: out[path] for path in expected_shapes(self.config)}

    # -------------------------------------------------------------------------------- backward

    def tape(self, inputs, dropout=None, seed: int = 0, dropout_masks: dict | None = None,
             kernels=None) -> tape_mod.Tape:
        """Records the forward pass for gradients (a persistent tape, engine/core/tape.py):
        tape.outputs, then tape.gradient(cotangents) as often as needed, then tape.release() (or use
        it in a `with` block). With masked_lm_positions in the inputs, mlm_logits is recorded too.
        dropout: None (off, the default), a rate for both, or {"hidden": r, "attention": r}; the masks
        are drawn from `seed` (or taken from dropout_masks, e.g. another tape's .dropout_masks).
        Runs the readable kernels, whatever path the encoder's forward uses, unless `kernels` (a
        engine.core.tape.TapeKernels, e.g. engine.fast.tape_kernels.for_encoder(enc)) says otherwise."""
        return tape_mod.Tape(self, inputs, dropout=dropout, seed=seed, dropout_masks=dropout_masks,
                             kernels=kernels if kernels is not None else self.tape_kernels)

    def vjp(self, inputs, cotangents: dict, dropout=None, seed: int = 0):
        """(outputs, grads): the outputs for `inputs` and, for every weight's HDF5 dataset path, the
        gradient of sum(cotangent * output) over the outputs named in `cotangents` (any of
        sequence_output, pooled_output, encoder_outputs as a list, mlm_logits with
        masked_lm_positions in the inputs): what tf.GradientTape.gradient(outputs, variables,
        output_gradients=cotangents) computes."""
        with self.tape(inputs, dropout=dropout, seed=seed) as tape:
            return tape.outputs, tape.gradient(cotangents)

    def trace(self, inputs):
        """Every intermediate, in order, as an engine.core.trace.Trace ({name: NumPy array}); names and
        shapes in engine/core/trace.py. Without masked_lm_positions the MLM steps take every position."""
        return trace_mod.trace(self, inputs)

    @staticmethod
    def to_numpy(x):
        return backend_mod.to_numpy(x)
