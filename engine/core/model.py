"""The readable model: its weights, and the calls of the Hub model on them.

    E   = word[ids] + position[:S] + type[type_ids]          [B,S,H]
    x   = LN(E)
    for each of the L blocks:
        x = LN_attn(x + TalkingHeadsAttention(x))           [B,S,H]
        x = LN_ffn(x + GEGLU(x))                             [B,S,H]
    pooled = tanh(x[:,0]·Wp + bp)                            [B,H]
    mlm    = LN(gelu(x[b,pos]·Wd + bd)) · word^T + bias      [B,P,V]

Standard BERT is the special case the config names (weights.format.ModelConfig): attention
"multi_head" mixes nothing (no pre/post-softmax weights), feed_forward "dense" is gelu(x·Wi+bi)·Wo+bo
(no gate), hidden_activation "gelu_erf" the exact GELU (Hugging Face's BERT checkpoints; the Hub's
SavedModels use Model Garden's tanh form).

The forward pass is written once, in engine/core/tape.py (encoder_forward, block_forward,
mlm_forward): `model(inputs)` and `model.mlm(inputs)` run it keeping nothing, `model.tape` keeping
what the backward needs, `model.trace` recording every intermediate. Letters: see
engine.core.kernels. engine.Encoder (engine/api.py) is this model plus the choice of a faster path.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.core import backend as backend_mod
from engine.core import tape as tape_mod
from engine.core import trace as trace_mod
from engine.core.inputs import validate
from weights.format import BLOCK_TENSORS, ModelConfig, block_path, block_tensor_names, expected_shapes


@dataclasses.dataclass
class AttentionWeights:
    """Attention weights of one block (arrays of the model's backend and dtype); the two mixing
    weights are None for multi-head attention (standard BERT)."""
    query_kernel: object          # [H,N,D]
    query_bias: object            # [N,D]
    key_kernel: object            # [H,N,D]
    key_bias: object              # [N,D]
    value_kernel: object          # [H,N,D]
    value_bias: object            # [N,D]
    output_kernel: object         # [N,D,H]
    output_bias: object           # [H]
    pre_softmax_weight: object    # [N,N] or None
    post_softmax_weight: object   # [N,N] or None


@dataclasses.dataclass
class FeedForwardWeights:
    """Feed-forward weights of one block: GEGLU, or with the gate None a dense GELU layer."""
    intermediate_kernel: object   # [H,I]  GELU branch ("intermediate_0")
    intermediate_bias: object     # [I]
    gate_kernel: object           # [H,I]  linear branch ("gate_0"), or None
    gate_bias: object             # [I] or None
    output_kernel: object         # [I,H]  ("output_0")
    output_bias: object           # [H]


@dataclasses.dataclass
class BlockWeights:
    attention: AttentionWeights
    attention_ln: tuple           # (gamma [H], beta [H])
    feedforward: FeedForwardWeights
    feedforward_ln: tuple         # (gamma [H], beta [H])


# Where each block tensor of weights.format.BLOCK_TENSORS lives in BlockWeights: (part, field or index).
BLOCK_FIELDS = {
    "attention/query/kernel": ("attention", "query_kernel"), "attention/query/bias": ("attention", "query_bias"),
    "attention/key/kernel": ("attention", "key_kernel"), "attention/key/bias": ("attention", "key_bias"),
    "attention/value/kernel": ("attention", "value_kernel"), "attention/value/bias": ("attention", "value_bias"),
    "attention/output/kernel": ("attention", "output_kernel"), "attention/output/bias": ("attention", "output_bias"),
    "attention/pre_softmax_weight": ("attention", "pre_softmax_weight"),
    "attention/post_softmax_weight": ("attention", "post_softmax_weight"),
    "attention_layer_norm/gamma": ("attention_ln", 0), "attention_layer_norm/beta": ("attention_ln", 1),
    "feedforward/intermediate/kernel": ("feedforward", "intermediate_kernel"),
    "feedforward/intermediate/bias": ("feedforward", "intermediate_bias"),
    "feedforward/gate/kernel": ("feedforward", "gate_kernel"), "feedforward/gate/bias": ("feedforward", "gate_bias"),
    "feedforward/output/kernel": ("feedforward", "output_kernel"),
    "feedforward/output/bias": ("feedforward", "output_bias"),
    "feedforward_layer_norm/gamma": ("feedforward_ln", 0), "feedforward_layer_norm/beta": ("feedforward_ln", 1),
}
assert set(BLOCK_FIELDS) == set(BLOCK_TENSORS), "BLOCK_FIELDS covers weights.format.BLOCK_TENSORS"
# The other tensors: HDF5 path -> (attribute of Model, None or the key of the entry in that attribute).
TOP_FIELDS = {
    "embeddings/word": ("word_table", None), "embeddings/position": ("position_table", None),
    "embeddings/type": ("type_table", None),
    "embeddings/layer_norm/gamma": ("embedding_ln", 0), "embeddings/layer_norm/beta": ("embedding_ln", 1),
    "pooler/kernel": ("pooler_kernel", None), "pooler/bias": ("pooler_bias", None),
    "mlm/transform/kernel": ("mlm_weights", "transform_kernel"),
    "mlm/transform/bias": ("mlm_weights", "transform_bias"),
    "mlm/layer_norm/gamma": ("mlm_weights", "ln_gamma"), "mlm/layer_norm/beta": ("mlm_weights", "ln_beta"),
    "mlm/output_bias": ("mlm_weights", "output_bias"),
}


def block_weights(i: int, tensor, config: ModelConfig) -> BlockWeights:
    """Block i's weights, each read as tensor(HDF5 dataset path); None for the tensors the config's
    family does without (weights.format.block_tensor_names)."""
    parts = {"attention": {}, "feedforward": {}, "attention_ln": [None, None], "feedforward_ln": [None, None]}
    present = block_tensor_names(config)
    for name, (part, key) in BLOCK_FIELDS.items():
        parts[part][key] = tensor(block_path(i, name)) if name in present else None
    return BlockWeights(AttentionWeights(**parts["attention"]), tuple(parts["attention_ln"]),
                        FeedForwardWeights(**parts["feedforward"]), tuple(parts["feedforward_ln"]))


def block_parameters(i: int, w: BlockWeights) -> dict:
    """{HDF5 dataset path: array} of block i's weights (those it has)."""
    out = {}
    for name, (part, key) in BLOCK_FIELDS.items():
        value = getattr(w, part)[key] if isinstance(key, int) else getattr(getattr(w, part), key)
        if value is not None:
            out[block_path(i, name)] = value
    return out


def block_arrays(w: BlockWeights) -> list:
    """Block weights' arrays in field order (attention, feed-forward, the two layer norms), the
    absent ones (a standard BERT's mixing and gate) left out."""
    return ([v for part in (w.attention, w.feedforward) for v in vars(part).values() if v is not None]
            + [*w.attention_ln, *w.feedforward_ln])


OUTPUT_NAMES = ("pooled_output", "sequence_output", "encoder_outputs", "default")


def output_names(outputs) -> tuple:
    """The names asked for (None: all four, as the Hub model), checked."""
    names = OUTPUT_NAMES if outputs is None else tuple(outputs)
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"outputs: unknown {unknown}; choose from {list(OUTPUT_NAMES)}")
    return names


def named_outputs(layers, pooled, names) -> dict:
    """The Hub model's output dict, restricted to `names`."""
    result = {"pooled_output": pooled, "sequence_output": layers[-1] if layers else None,
              "encoder_outputs": layers, "default": pooled}
    return {n: result[n] for n in OUTPUT_NAMES if n in names}


class Model:
    """A BERT-family encoder on NumPy or CuPy, called like the TF Hub SavedModel: talking-heads GEGLU
    BERT, standard BERT (multi-head attention, a dense GELU feed-forward) or a mix, as its config says.

        out = model({"input_word_ids": ids, "input_mask": mask, "input_type_ids": types})
        out["pooled_output"]    # [B,H]    (also out["default"])
        out["sequence_output"]  # [B,S,H]
        out["encoder_outputs"]  # L arrays [B,S,H], the last equal to sequence_output
        model.mlm({**inputs, "masked_lm_positions": pos})["mlm_logits"]   # [B,P,V]

    Outputs are arrays of the chosen backend (CuPy arrays on "cupy"); `engine.to_numpy(out)` or
    `model.to_numpy(out)` brings any output (or the whole dict) back to NumPy. Its arrays are its
    own, C order, as the file has them (np.asarray: no copy when the dtype matches).
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
        put = lambda path: self.xp.asarray(np.ascontiguousarray(tensors[path]), dtype=self.dtype)  # noqa: E731
        self.has_mlm = config.has_mlm
        parts = {"embedding_ln": [None, None], "mlm_weights": {}}
        for path, (attr, key) in TOP_FIELDS.items():
            if path in shapes:
                if key is None:
                    setattr(self, attr, put(path))
                else:
                    parts[attr][key] = put(path)
        self.embedding_ln, self.mlm_weights = tuple(parts["embedding_ln"]), parts["mlm_weights"]
        self.blocks = [block_weights(i, put, config) for i in range(config.num_layers)]

    # -------------------------------------------------------------------------------- forward

    def device_inputs(self, inputs, with_positions):
        """(ids, mask, types, positions or None) checked (engine.core.inputs) and on the backend."""
        ids, mask, types, positions = validate(inputs, self.config, with_positions)
        xp = self.xp
        return (xp.asarray(ids), xp.asarray(mask), xp.asarray(types),
                None if positions is None else xp.asarray(positions))

    def encode(self, ids, mask, types, record=None):
        """Embeddings, the L blocks and the pooler on device int arrays [B,S], by the readable
        forward (engine.core.tape.encoder_forward). -> (encoder_outputs [L x [B,S,H]], pooled [B,H])"""
        return tape_mod.encoder_forward(self, ids, mask, types, record=record)

    def __call__(self, inputs, outputs=None):
        """Encoder outputs for a dict of input_word_ids, input_mask, input_type_ids ([B,S] ints).
        outputs: the names to return (default: all four, as the Hub model)."""
        names = output_names(outputs)
        ids, mask, types, _ = self.device_inputs(inputs, with_positions=False)
        return named_outputs(*self.encode(ids, mask, types), names)

    def mlm(self, inputs, record=None):
        """The `.mlm` call: the encoder outputs plus mlm_logits [B,P,V] at masked_lm_positions [B,P].
        record(name, array), when given, receives every intermediate (engine/core/trace.py)."""
        self._check_mlm()
        ids, mask, types, positions = self.device_inputs(inputs, with_positions=True)
        return self.with_mlm_logits(*self.encode(ids, mask, types, record=record), positions, record=record)

    def _check_mlm(self):
        if not self.has_mlm:
            raise ValueError("this weights file is encoder-only (has_mlm false): no .mlm head")

    def with_mlm_logits(self, layers, pooled, positions, record=None) -> dict:
        """The .mlm call's outputs from the encoder's: mlm_logits by the readable head
        (engine.core.tape.mlm_forward) at positions [B,P] (device ints)."""
        logits = tape_mod.mlm_forward(self, layers[-1], positions, record=record)
        return {"mlm_logits": logits, "pooled_output": pooled, "sequence_output": layers[-1],
                "encoder_outputs": layers}

    def block_arrays(self, i: int) -> list:
        """Block i's arrays (engine.core.model.block_arrays)."""
        return block_arrays(self.blocks[i])

    def parameters(self) -> dict:
        """{HDF5 dataset path: the live array} of every weight, in the order of
        weights.format.expected_shapes. Updating these arrays in place (an optimizer does) changes
        the model."""
        shapes = expected_shapes(self.config)
        out = {}
        for path, (attr, key) in TOP_FIELDS.items():
            if path in shapes:
                out[path] = getattr(self, attr) if key is None else getattr(self, attr)[key]
        for i, w in enumerate(self.blocks):
            out.update(block_parameters(i, w))
        return {path: out[path] for path in shapes}

    # -------------------------------------------------------------------------------- backward

    def tape(self, inputs, dropout=None, seed: int = 0, dropout_masks: dict | None = None,
             kernels=None) -> tape_mod.Tape:
        """Records the forward pass for gradients (a persistent tape, engine/core/tape.py):
        tape.outputs, then tape.gradient(cotangents) as often as needed, then tape.release() (or use
        it in a `with` block). With masked_lm_positions in the inputs, mlm_logits is recorded too.
        dropout: None (off, the default), a rate for both, or {"hidden": r, "attention": r}; the masks
        are drawn from `seed` (or taken from dropout_masks, e.g. another tape's .dropout_masks).
        kernels: an engine.core.tape.TapeKernels for the element-wise stages and attention (None:
        the readable ones)."""
        return tape_mod.Tape(self, inputs, dropout=dropout, seed=seed, dropout_masks=dropout_masks, kernels=kernels)

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
