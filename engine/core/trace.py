"""Trace: every intermediate tensor of the model, in order, for people who port or study it.

    import engine
    enc = engine.load("model.h5")
    t = enc.trace(inputs)                  # engine.core.trace.Trace: an ordered {name: NumPy array}
    t["layers/0/mixed_probs"]              # [B,N,S,T]

Writing and reading trace files is engine.tools.tracefile; comparing two traces is
engine.tools.compare; engine.tf.reference_trace takes the same intermediates from TensorFlow.


Names and shapes, in recording order. Letters: B batch, S query positions, T key positions (= S),
N heads, D head size, H hidden, I intermediate (GEGLU width), P masked positions, V vocab.

    name                              shape     what
    embeddings/sum                    B,S,H     word[ids] + position[:S] + type[type_ids]
    embeddings/layer_norm             B,S,H     LN(sum): the input of block 0
    layers/<i>/q                      B,S,N,D   x·Wq + bq
    layers/<i>/k                      B,T,N,D   x·Wk + bk
    layers/<i>/v                      B,T,N,D   x·Wv + bv
    layers/<i>/raw_scores             B,N,S,T   q·k over D, before the scale
    layers/<i>/scaled_scores          B,N,S,T   raw_scores / sqrt(D)
    layers/<i>/mixed_scores           B,N,S,T   pre-softmax talking-heads mix: einsum(bnst,nm->bmst, W_pre)
    layers/<i>/masked_scores          B,N,S,T   mixed_scores + (1 - mask[b,t]) * -1e9
    layers/<i>/probs                  B,N,S,T   softmax over t
    layers/<i>/mixed_probs            B,N,S,T   post-softmax talking-heads mix: einsum(bnst,nm->bmst, W_post)
    layers/<i>/context                B,S,N,D   sum_t mixed_probs[b,n,s,t] v[b,t,n,:]
    layers/<i>/attention_output       B,S,H     context·Wo + bo (before the residual)
    layers/<i>/attention_layer_norm   B,S,H     LN_attn(x + attention_output)
    layers/<i>/gelu_branch            B,S,I     gelu(x·Wi + bi)      ("intermediate_0")
    layers/<i>/gate_branch            B,S,I     x·Wg + bg            ("gate_0")
    layers/<i>/geglu                  B,S,I     gelu_branch * gate_branch
    layers/<i>/feedforward_output     B,S,H     geglu·Wout + bout    ("output_0", before the residual)
    layers/<i>/feedforward_layer_norm B,S,H     LN_ffn(feedforward_output + x): the block's output
    pooled_output                     B,H       tanh(x[:,0]·Wp + bp)
    mlm/gathered                      B,P,H     sequence_output[b, masked_lm_positions[b,p]]
    mlm/mlm_dense                     B,P,H     gelu(gathered·Wd + bd)
    mlm/mlm_transform                 B,P,H     LN_mlm(mlm_dense)
    mlm/logits                        B,P,V     mlm_transform · word^T + output_bias

`<i>` runs 0..L-1; the 17 block steps come in the order above, block after block. A standard BERT
block (multi-head attention, a dense feed-forward: weights.format.ModelConfig) has 13: no
mixed_scores or mixed_probs (masked_scores is scaled_scores + mask, context is probs · v), no
gate_branch or geglu (feedforward_output is gelu_branch·Wout + bout). The `mlm/` steps
are there when the model has the MLM head; without `masked_lm_positions` the trace takes every
position 0..S-1 (P = S).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from engine.core import backend as backend_mod
from engine.core.inputs import validate

EMBEDDING_STEPS = [
    ("embeddings/sum", "B,S,H", "word[ids] + position[:S] + type[type_ids]"),
    ("embeddings/layer_norm", "B,S,H", "LN(embeddings/sum): the input of block 0"),
]
BLOCK_STEPS = [
    ("q", "B,S,N,D", "x·Wq + bq"),
    ("k", "B,T,N,D", "x·Wk + bk"),
    ("v", "B,T,N,D", "x·Wv + bv"),
    ("raw_scores", "B,N,S,T", "q·k over D, before the 1/sqrt(D) scale"),
    ("scaled_scores", "B,N,S,T", "raw_scores / sqrt(D)"),
    ("mixed_scores", "B,N,S,T", "pre-softmax talking-heads mix over heads (W_pre)"),
    ("masked_scores", "B,N,S,T", "mixed_scores + (1 - mask) * -1e9"),
    ("probs", "B,N,S,T", "softmax over T"),
    ("mixed_probs", "B,N,S,T", "post-softmax talking-heads mix over heads (W_post)"),
    ("context", "B,S,N,D", "mixed_probs · v"),
    ("attention_output", "B,S,H", "context·Wo + bo, before the residual"),
    ("attention_layer_norm", "B,S,H", "LN_attn(x + attention_output)"),
    ("gelu_branch", "B,S,I", "gelu(x·Wi + bi)"),
    ("gate_branch", "B,S,I", "x·Wg + bg"),
    ("geglu", "B,S,I", "gelu_branch * gate_branch"),
    ("feedforward_output", "B,S,H", "geglu·Wout + bout, before the residual"),
    ("feedforward_layer_norm", "B,S,H", "LN_ffn(feedforward_output + x): the block output"),
]
POOLER_STEPS = [("pooled_output", "B,H", "tanh(x[:,0]·Wp + bp)")]
MLM_STEPS = [
    ("mlm/gathered", "B,P,H", "sequence_output at masked_lm_positions"),
    ("mlm/mlm_dense", "B,P,H", "gelu(gathered·Wd + bd)"),
    ("mlm/mlm_transform", "B,P,H", "LN_mlm(mlm_dense)"),
    ("mlm/logits", "B,P,V", "mlm_transform · word^T + output_bias"),
]


MIXING_STEPS = ("mixed_scores", "mixed_probs")
GATE_STEPS = ("gate_branch", "geglu")


def block_steps(talking_heads: bool = True, gated: bool = True) -> list[tuple[str, str, str]]:
    """BLOCK_STEPS of a block of that kind (without the mixing steps, without the gate's)."""
    absent = (() if talking_heads else MIXING_STEPS) + (() if gated else GATE_STEPS)
    return [step for step in BLOCK_STEPS if step[0] not in absent]


def steps(num_layers: int, with_mlm: bool = True, config=None) -> list[tuple[str, str, str]]:
    """(name, letters, description) of every traced intermediate, in recording order; `config` (a
    ModelConfig; None: talking-heads GEGLU) says which block steps exist."""
    out = list(EMBEDDING_STEPS)
    block = block_steps(config.talking_heads, config.gated) if config is not None else BLOCK_STEPS
    for i in range(num_layers):
        out += [(f"layers/{i}/{name}", letters, what) for name, letters, what in block]
    out += POOLER_STEPS
    if with_mlm:
        out += MLM_STEPS
    return out


def dims(config, batch: int, seq_length: int, num_positions: int | None) -> dict:
    """The value of each shape letter for a config and input sizes."""
    d = {"B": batch, "S": seq_length, "T": seq_length, "N": config.num_heads, "D": config.head_size,
         "H": config.hidden_size, "I": config.intermediate_size, "V": config.vocab_size}
    if num_positions is not None:
        d["P"] = num_positions
    return d


def expected_shape(letters: str, dim_values: dict) -> tuple[int, ...]:
    return tuple(int(dim_values[c]) for c in letters.split(","))



# ------------------------------------------------------------------------------------------ trace

@dataclasses.dataclass
class Trace:
    """An ordered {name: NumPy array} of intermediates, with the inputs and config that made it."""
    tensors: "OrderedDict[str, np.ndarray]"
    letters: dict                        # name -> "B,N,S,T"
    inputs: dict                         # the int32 inputs, NumPy
    config: dict                         # ModelConfig fields
    attrs: dict = dataclasses.field(default_factory=dict)   # backend, dtype, texts, ...

    def __getitem__(self, name):
        return self.tensors[name]

    def __contains__(self, name):
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def items(self):
        return self.tensors.items()


def complete_inputs(enc, inputs: dict) -> dict:
    """Checked NumPy int32 copies of the inputs; all positions 0..S-1 for the MLM when none are given."""
    with_positions = isinstance(inputs, Mapping) and "masked_lm_positions" in inputs
    ids, mask, types, positions = validate(inputs, enc.config, with_positions)  # InputError, never a cast
    out = {"input_word_ids": ids.astype(np.int32), "input_mask": mask.astype(np.int32),
           "input_type_ids": types.astype(np.int32)}
    if positions is not None:
        out["masked_lm_positions"] = positions.astype(np.int32)
    if enc.has_mlm and "masked_lm_positions" not in out:
        B, S = out["input_word_ids"].shape
        out["masked_lm_positions"] = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy()
    return out


def run(enc, inputs: dict, sink) -> dict:
    """Runs the model with `sink(name, numpy_array)` receiving every intermediate in order.

    Returns the completed NumPy inputs. Checks that the names come exactly as `steps()` says.
    """
    inputs = complete_inputs(enc, inputs)
    expected = [name for name, _, _ in steps(enc.config.num_layers, enc.has_mlm, enc.config)]
    seen = []

    def record(name, value):
        if len(seen) >= len(expected) or expected[len(seen)] != name:
            raise RuntimeError(f"trace: got {name!r} at step {len(seen)}, expected "
                               f"{expected[len(seen)] if len(seen) < len(expected) else 'nothing'!r}")
        seen.append(name)
        sink(name, backend_mod.to_numpy(value))

    if enc.has_mlm:
        enc.mlm(inputs, record=record)
    else:
        ids, mask, types, _ = enc.device_inputs(inputs, with_positions=False)
        enc.encode(ids, mask, types, record=record)
    if seen != expected:
        raise RuntimeError(f"trace: recorded {len(seen)} intermediates, expected {len(expected)}; "
                           f"first missing {expected[len(seen)]!r}")
    return inputs


def base_attrs(enc) -> dict:
    return {"backend": enc.backend, "dtype": enc.dtype}


def trace(enc, inputs: dict) -> Trace:
    """Every intermediate of `enc` on `inputs` (Hub-style dict), in memory. See the module docstring."""
    tensors = OrderedDict()
    done = run(enc, inputs, lambda name, value: tensors.__setitem__(name, value))
    letters = {name: l for name, l, _ in steps(enc.config.num_layers, enc.has_mlm, enc.config)}
    return Trace(tensors, letters, done, dataclasses.asdict(enc.config), base_attrs(enc))


