"""Hugging Face BERT tensor names matched to the HDF5 layout, and how each tensor is reshaped.

The one table from each tensor of a transformers `BertModel` / `BertForMaskedLM` /
`BertForPreTraining` state dict to its dataset of `weights.format`, and the matching of a
checkpoint's names and shapes to it (`weights.hf_import` reads the folder around it):

    plan = match_names({name: shape, ...}, config)    # HfImportError lists every problem
    plan.mapping                                      # {dataset path: (HF name, transform)}

Names are matched with or without the "bert." prefix (BertModel saves none, the heads' models do),
and LayerNorm parameters by either spelling (`weight`/`bias`, or `gamma`/`beta` in checkpoints
converted from TensorFlow). HF's nn.Linear stores its weight as [out, in] and computes x·W^T + b,
so every kernel is transposed; the attention kernels are then split into heads: the output feature
n*D + d of query/key/value is head n, position d.

Kept out of the file, and listed in the provenance: the `position_ids` / `token_type_ids` buffers
(arange and zeros, not weights) and the task heads beside the MLM head, `cls.<head>.weight` and
`.bias` (BertForPreTraining's next-sentence head `cls.seq_relationship`, a custom model's
classifiers on the pooled output): they read the encoder's outputs and change none of them. The
MLM decoder weight is the word table (tied) and must equal it; the decoder bias is the MLM output
bias. Anything else is refused by name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from weights import format as fmt


class HfImportError(ValueError):
    """The folder cannot be imported; the message names the file, the setting or the tensors."""


# ---------------------------------------------------------------------------- transforms
# Each takes the HF tensor and the config; the shapes are in weights.format's letters.

def copy(w, c):
    return w                                                      # same shape


def transpose(w, c):
    return w.T                                                    # [out,in] -> [in,out]


def heads_in(w, c):
    return w.T.reshape(c.hidden_size, c.num_heads, c.head_size)   # [N*D,H] -> [H,N,D]


def heads_bias(b, c):
    return b.reshape(c.num_heads, c.head_size)                    # [N*D] -> [N,D]


def heads_out(w, c):
    return w.T.reshape(c.num_heads, c.head_size, c.hidden_size)   # [H,N*D] -> [N,D,H]


def hf_shape(shape: tuple[int, ...], transform: Callable) -> tuple[int, ...]:
    """The HF tensor's shape for one of ours (the transform run backwards on the shape)."""
    if transform is copy:
        return shape
    if transform is transpose:
        return shape[::-1]
    if transform is heads_in:
        return (shape[1] * shape[2], shape[0])
    if transform is heads_bias:
        return (shape[0] * shape[1],)
    return (shape[2], shape[0] * shape[1])                        # heads_out


# ---------------------------------------------------------------------------- the name table
# HF name (without "bert.") -> (dataset path, transform). Block names follow "encoder.layer.<i>.".

HF_EMBEDDING_NAMES = {
    "embeddings.word_embeddings.weight": ("embeddings/word", copy),
    "embeddings.position_embeddings.weight": ("embeddings/position", copy),
    "embeddings.token_type_embeddings.weight": ("embeddings/type", copy),
    "embeddings.LayerNorm.weight": ("embeddings/layer_norm/gamma", copy),
    "embeddings.LayerNorm.bias": ("embeddings/layer_norm/beta", copy),
}
HF_BLOCK_NAMES = {
    "attention.self.query.weight": ("attention/query/kernel", heads_in),
    "attention.self.query.bias": ("attention/query/bias", heads_bias),
    "attention.self.key.weight": ("attention/key/kernel", heads_in),
    "attention.self.key.bias": ("attention/key/bias", heads_bias),
    "attention.self.value.weight": ("attention/value/kernel", heads_in),
    "attention.self.value.bias": ("attention/value/bias", heads_bias),
    "attention.output.dense.weight": ("attention/output/kernel", heads_out),
    "attention.output.dense.bias": ("attention/output/bias", copy),
    "attention.output.LayerNorm.weight": ("attention_layer_norm/gamma", copy),
    "attention.output.LayerNorm.bias": ("attention_layer_norm/beta", copy),
    "intermediate.dense.weight": ("feedforward/intermediate/kernel", transpose),
    "intermediate.dense.bias": ("feedforward/intermediate/bias", copy),
    "output.dense.weight": ("feedforward/output/kernel", transpose),
    "output.dense.bias": ("feedforward/output/bias", copy),
    "output.LayerNorm.weight": ("feedforward_layer_norm/gamma", copy),
    "output.LayerNorm.bias": ("feedforward_layer_norm/beta", copy),
}
HF_POOLER_NAMES = {
    "pooler.dense.weight": ("pooler/kernel", transpose),
    "pooler.dense.bias": ("pooler/bias", copy),
}
HF_MLM_NAMES = {
    "cls.predictions.transform.dense.weight": ("mlm/transform/kernel", transpose),
    "cls.predictions.transform.dense.bias": ("mlm/transform/bias", copy),
    "cls.predictions.transform.LayerNorm.weight": ("mlm/layer_norm/gamma", copy),
    "cls.predictions.transform.LayerNorm.bias": ("mlm/layer_norm/beta", copy),
    "cls.predictions.bias": ("mlm/output_bias", copy),
}
MLM_PREFIX = "cls.predictions."
DECODER_WEIGHT = "cls.predictions.decoder.weight"   # [V,H]: the word table, tied
DECODER_BIAS = "cls.predictions.decoder.bias"       # [V]: the same parameter as cls.predictions.bias
# Not weights of the encoder: left out of the file, listed in its provenance.
IGNORED_NAMES = ("embeddings.position_ids", "embeddings.token_type_ids")   # buffers: arange, zeros
TASK_HEAD = re.compile(r"cls\.(?!predictions\.)\w+\.(weight|bias)")            # cls.seq_relationship, ...
_MAX_LISTED = 20


def canonical_name(name: str) -> str:
    """A checkpoint's tensor name as the table spells it: no "bert." prefix, LayerNorm weight/bias."""
    if name.startswith("bert."):
        name = name[len("bert."):]
    if ".LayerNorm." in name:
        name = re.sub(r"\.LayerNorm\.gamma$", ".LayerNorm.weight", name)
        name = re.sub(r"\.LayerNorm\.beta$", ".LayerNorm.bias", name)
    return name


def name_table(config: fmt.ModelConfig) -> dict[str, tuple[str, Callable]]:
    """Every HF name (canonical) of a checkpoint with this config -> (dataset path, transform);
    the pooler's included, the MLM head's when config.has_mlm."""
    table = dict(HF_EMBEDDING_NAMES)
    for i in range(config.num_layers):
        table.update({f"encoder.layer.{i}.{hf}": (fmt.block_path(i, ours), t)
                      for hf, (ours, t) in HF_BLOCK_NAMES.items()})
    table.update(HF_POOLER_NAMES)
    if config.has_mlm:
        table.update(HF_MLM_NAMES)
    return table


def _listed(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{kind} ({len(items)}): {shown}{more}"


@dataclasses.dataclass
class Plan:
    """How a checkpoint's tensors become the file's datasets."""
    mapping: dict[str, tuple[str, Callable]]   # dataset path -> (checkpoint name, transform)
    ignored: list[str]                         # checkpoint names left out (buffers, NSP head)
    decoder_weight: str | None                 # the tied decoder weight's checkpoint name, when present
    decoder_bias: str | None                   # a second copy of the output bias, when present
    pooler_missing: bool                       # no pooler in the checkpoint (BertForMaskedLM saves none)


def canonical_names(path: str, shapes: dict[str, tuple]) -> dict[str, str]:
    """{canonical name: checkpoint name}; a name present with and without "bert." is refused."""
    found, twice = {}, []
    for name in shapes:
        key = canonical_name(name)
        if key in found:
            twice.append(f"{found[key]} and {name}")
        found[key] = name
    if twice:
        raise HfImportError(f"{path}: {_listed('tensors present twice under two spellings', twice)}")
    return found


def match_names(path: str, shapes: dict[str, tuple], config: fmt.ModelConfig) -> Plan:
    """Matches the checkpoint's {name: shape} to the datasets of `config` (whose has_mlm says
    whether the MLM head is read); every missing, mis-shaped or unknown tensor is listed in one
    HfImportError."""
    names = canonical_names(path, shapes)
    table = name_table(config)
    expected = fmt.expected_shapes(config)
    mapping, missing, misshaped = {}, [], []
    pooler_missing = not any(hf in names for hf in HF_POOLER_NAMES)
    for hf, (ours, transform) in table.items():
        if hf in HF_POOLER_NAMES and pooler_missing:
            continue
        if hf == "cls.predictions.bias" and hf not in names and DECODER_BIAS in names:
            hf = DECODER_BIAS   # a checkpoint may keep only the decoder's name for the shared bias
        if hf not in names:
            missing.append(hf)
            continue
        want, got = hf_shape(expected[ours], transform), tuple(shapes[names[hf]])
        if got != want:
            misshaped.append(f"{names[hf]} has shape {list(got)}, expected {list(want)}")
            continue
        mapping[ours] = (names[hf], transform)
    used = {names[hf] for hf in names if hf in table} | {h for h, _ in mapping.values()}
    ignored = [names[hf] for hf in names if hf in IGNORED_NAMES or TASK_HEAD.fullmatch(hf)]
    extra = {DECODER_WEIGHT, DECODER_BIAS} if config.has_mlm else set()
    unknown = [name for hf, name in names.items() if name not in used and name not in ignored and hf not in extra]
    problems = [_listed(kind, items) for kind, items in
                (("missing", missing), ("mis-shaped", misshaped), ("unknown tensors", sorted(unknown))) if items]
    if problems:
        raise HfImportError(f"{path}: the checkpoint does not fit its config.json ({config.family}, "
                            f"L={config.num_layers} H={config.hidden_size} N={config.num_heads} "
                            f"I={config.intermediate_size} V={config.vocab_size}):\n  " + "\n  ".join(problems))
    bias_name = mapping["mlm/output_bias"][0] if config.has_mlm else None
    second_bias = names.get(DECODER_BIAS) if config.has_mlm and names.get(DECODER_BIAS) != bias_name else None
    return Plan(mapping=mapping, ignored=ignored, decoder_weight=names.get(DECODER_WEIGHT) if config.has_mlm else None,
                decoder_bias=second_bias, pooler_missing=pooler_missing)


def convert(path: str, plan: Plan, read: Callable[[str], np.ndarray], config: fmt.ModelConfig) -> dict[str, np.ndarray]:
    """The datasets, read with read(checkpoint name) -> float32 and reshaped; the tied decoder
    weight and a second output bias checked against what they must equal; a tensor with NaN or
    infinite values refused by name."""
    tensors, bad = {}, []
    for ours, (name, transform) in plan.mapping.items():
        array = np.ascontiguousarray(transform(read(name), config), dtype=np.float32)
        if not np.isfinite(array).all():
            bad.append(name)
        tensors[ours] = array
    if bad:
        raise HfImportError(f"{path}: {_listed('tensors with NaN or infinite values', bad)}")
    if plan.decoder_weight is not None and not np.array_equal(read(plan.decoder_weight), tensors["embeddings/word"]):
        raise HfImportError(f"{path}: {plan.decoder_weight} differs from the word embeddings (an untied MLM decoder): "
                            f"the format ties the MLM output to embeddings/word, so it cannot hold this checkpoint")
    if plan.decoder_bias is not None and not np.array_equal(read(plan.decoder_bias), tensors["mlm/output_bias"]):
        raise HfImportError(f"{path}: {plan.decoder_bias} differs from {plan.mapping['mlm/output_bias'][0]}: "
                            f"the MLM head has one output bias")
    if plan.pooler_missing:   # zeros: pooled_output is then exactly 0, never a plausible-looking vector
        tensors["pooler/kernel"] = np.zeros((config.hidden_size, config.hidden_size), np.float32)
        tensors["pooler/bias"] = np.zeros(config.hidden_size, np.float32)
    return tensors
