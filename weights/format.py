"""The HDF5 weight format: one self-describing file per model. h5py and NumPy only.

Layout (format "talkheads-ggelu-bert", version 2; version 1 files, without the model-family
attributes, read as talking-heads GEGLU with the Hub model's defaults). Letters: L layers, H hidden, N heads, D head size,
I intermediate, V vocab, P positions, T type vocab. Every tensor is float32 in its natural shape.

    /                                       attrs: format, format_version, config (below), provenance
    /embeddings/word                        [V,H]   word_embeddings/embeddings (tied with the MLM output)
    /embeddings/position                    [P,H]   position_embedding/embeddings
    /embeddings/type                        [T,H]   type_embeddings/embeddings
    /embeddings/layer_norm/{gamma,beta}     [H]     embeddings/layer_norm
    /layers/<i>/attention/query/kernel      [H,N,D] <block i>/self_attention/query
    /layers/<i>/attention/query/bias        [N,D]
    /layers/<i>/attention/{key,value}/...   as query
    /layers/<i>/attention/output/kernel     [N,D,H] <block i>/self_attention/attention_output
    /layers/<i>/attention/output/bias       [H]
    /layers/<i>/attention/pre_softmax_weight  [N,N] axis 0 = input head, axis 1 = output head
    /layers/<i>/attention/post_softmax_weight [N,N]   (both only when attention = talking_heads)
    /layers/<i>/attention_layer_norm/{gamma,beta}   [H]  <block i>/self_attention_layer_norm
    /layers/<i>/feedforward/intermediate/kernel [H,I], bias [I]   (GELU branch, "intermediate_0")
    /layers/<i>/feedforward/gate/kernel         [H,I], bias [I]   (linear branch, "gate_0"; geglu only)
    /layers/<i>/feedforward/output/kernel       [I,H], bias [H]   ("output_0")
    /layers/<i>/feedforward_layer_norm/{gamma,beta} [H]  <block i>/feedforward/output_layer_norm_0
    /pooler/kernel [H,H], /pooler/bias [H]                       cls_transform
    /mlm/transform/kernel [H,H], /mlm/transform/bias [H]         cls/predictions/transform/dense
    /mlm/layer_norm/{gamma,beta} [H]                             cls/predictions/transform/LayerNorm
    /mlm/output_bias [V]                                         cls/predictions/output_bias/bias
    /vocab                                   [V] UTF-8 strings, line i of vocab.txt is id i
    /head/kernel [H,C], /head/bias [C]       optional: a fine-tuned classifier on pooled_output
    /head/labels                             [C] UTF-8 strings, the class names in order

`<i>` is 0..L-1 in block order. The `/mlm` group is absent in an encoder-only file (attr has_mlm
false). Each float dataset carries attrs `sha256` (of its little-endian float32 bytes) and `source`
(the TensorFlow variable name it came from). Datasets are stored contiguous and uncompressed.

Root attributes, all scalars:
- `format` = FORMAT_NAME, `format_version` = FORMAT_VERSION;
- the config: one attribute per `ModelConfig` field (`num_layers`, ..., `do_lower_case`, `has_mlm`,
  the model family `attention`, `feed_forward`, `hidden_activation`, and the sentence-embedding
  defaults `pooling`, `normalize`, `max_seq_length`). The integer sizes are inferred from tensor
  shapes at extraction; `hidden_activation`, `layer_norm_epsilon` and `attention_mask_constant` are
  NOT visible in any shape: the extractor reads the GELU from the SavedModel's Keras metadata
  (Model Garden's "gelu" is the tanh approximation) and writes the Hub's LayerNorm epsilon 1e-12 and
  mask constant -1e9 (the ModelConfig defaults below); a Hugging Face import writes its
  config.json's. The
  family and embedding attributes may be absent (version 1 files): the defaults below apply;
- provenance: every other root attribute (see PROVENANCE_ATTRS; readers must tolerate more).

`/vocab` is optional (absent when the SavedModel has no vocab asset); when present it has V
entries and attrs `sha256` (vocab_checksum) and `source` (the asset path it came from).
`/head` is optional (written by `finetune`): every command reads the encoder of such a file, and
`predict` its classifier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

FORMAT_NAME = "talkheads-ggelu-bert"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT_ATTRS = ("format", "format_version")
VOCAB_DATASET = "vocab"
HEAD_DATASETS = ("head/kernel", "head/bias", "head/labels")
# Provenance root attributes written by engine.tf.extract (all strings):
PROVENANCE_ATTRS = (
    "source_path",                 # absolute path of the SavedModel extracted
    "source_tensorflow_version",   # the TF version that saved it, when the SavedModel records one
    "tensorflow_version",          # the TF version that extracted it
    "extracted_at",                # UTC, ISO 8601
    "extractor",                   # "engine.tf.extract"
    "do_lower_case_source",        # the variable do_lower_case came from, or "default"
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's hyper-parameters, stored as root attributes of the HDF5 file."""
    num_layers: int                      # L
    hidden_size: int                     # H
    num_heads: int                       # N
    head_size: int                       # D = H / N
    intermediate_size: int               # I
    vocab_size: int                      # V
    max_position_embeddings: int         # P
    type_vocab_size: int                 # T
    hidden_activation: str = "gelu_tanh"   # the GELU of the feed-forward and of the MLM transform
    layer_norm_epsilon: float = 1e-12
    attention_mask_constant: float = -1e9  # added to masked logits (float32)
    do_lower_case: bool = True
    has_mlm: bool = True
    attention: str = "talking_heads"       # or "multi_head": standard BERT, no mixing weights
    feed_forward: str = "geglu"            # or "dense": standard BERT, one intermediate product, no gate
    pooling: str = "pooled"                # what `encode` returns: "pooled" (pooled_output), "cls", "mean"
    normalize: bool = False                # `encode` L2-normalizes its vectors
    max_seq_length: int = 0                # `encode` truncates to this many tokens (0: the position table)

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "head_size", "intermediate_size",
                     "vocab_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_heads * self.head_size != self.hidden_size:
            raise ValueError(f"model config: num_heads*head_size = {self.num_heads}*{self.head_size} "
                             f"!= hidden_size {self.hidden_size}")
        for name, allowed in FAMILY_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model config: {name} {getattr(self, name)!r} is not supported; "
                                 f"choose from {list(allowed)}")
        if not isinstance(self.max_seq_length, (int, np.integer)) or isinstance(self.max_seq_length, bool) \
                or not 0 <= self.max_seq_length <= self.max_position_embeddings:
            raise ValueError(f"model config: max_seq_length must be 0 or at most max_position_embeddings "
                             f"{self.max_position_embeddings}, got {self.max_seq_length!r}")

    @property
    def talking_heads(self) -> bool:
        """True when the blocks mix attention across heads (the pre/post-softmax weights exist)."""
        return self.attention == "talking_heads"

    @property
    def gated(self) -> bool:
        """True when the feed-forward is GEGLU (the gate weights exist)."""
        return self.feed_forward == "geglu"

    @property
    def family(self) -> str:
        """A short name of the block's kind, e.g. "talking_heads+geglu+gelu_tanh"."""
        return f"{self.attention}+{self.feed_forward}+{self.hidden_activation}"

    def to_attrs(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, attrs) -> "ModelConfig":
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name not in attrs:
                if field.name in OPTIONAL_ATTRS:
                    continue
                raise KeyError(field.name)
            value = attrs[field.name]
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, np.generic):
                value = value.item()
            if field.type == "bool" or isinstance(field.default, bool):
                value = bool(value)
            elif field.type == "int":
                value = int(value)
            kwargs[field.name] = value
        return cls(**kwargs)


# The choices of the string fields; each model family is a combination of the first three.
FAMILY_CHOICES = {
    "attention": ("talking_heads", "multi_head"),
    "feed_forward": ("geglu", "dense"),
    "hidden_activation": ("gelu_tanh", "gelu_erf"),
    "pooling": ("pooled", "cls", "mean"),
}
# The config attributes a version 1 file lacks: absent, they take the ModelConfig defaults.
OPTIONAL_ATTRS = ("attention", "feed_forward", "pooling", "normalize", "max_seq_length")
# The block tensors each variant does without.
MIXING_TENSORS = ("attention/pre_softmax_weight", "attention/post_softmax_weight")
GATE_TENSORS = ("feedforward/gate/kernel", "feedforward/gate/bias")


# ---------------------------------------------------------------------------- the one name table
# Every float dataset of the file, with its shape in the letters above. Model, tape, extract, ONNX
# and SavedModel export read their paths from here (block tensors relative to `block_prefix(i)`).

EMBEDDING_TENSORS = {
    "embeddings/word": ("V", "H"),
    "embeddings/position": ("P", "H"),
    "embeddings/type": ("T", "H"),
    "embeddings/layer_norm/gamma": ("H",),
    "embeddings/layer_norm/beta": ("H",),
}
BLOCK_TENSORS = {
    "attention/query/kernel": ("H", "N", "D"),
    "attention/query/bias": ("N", "D"),
    "attention/key/kernel": ("H", "N", "D"),
    "attention/key/bias": ("N", "D"),
    "attention/value/kernel": ("H", "N", "D"),
    "attention/value/bias": ("N", "D"),
    "attention/output/kernel": ("N", "D", "H"),
    "attention/output/bias": ("H",),
    "attention/pre_softmax_weight": ("N", "N"),
    "attention/post_softmax_weight": ("N", "N"),
    "attention_layer_norm/gamma": ("H",),
    "attention_layer_norm/beta": ("H",),
    "feedforward/intermediate/kernel": ("H", "I"),
    "feedforward/intermediate/bias": ("I",),
    "feedforward/gate/kernel": ("H", "I"),
    "feedforward/gate/bias": ("I",),
    "feedforward/output/kernel": ("I", "H"),
    "feedforward/output/bias": ("H",),
    "feedforward_layer_norm/gamma": ("H",),
    "feedforward_layer_norm/beta": ("H",),
}
POOLER_TENSORS = {
    "pooler/kernel": ("H", "H"),
    "pooler/bias": ("H",),
}
MLM_TENSORS = {
    "mlm/transform/kernel": ("H", "H"),
    "mlm/transform/bias": ("H",),
    "mlm/layer_norm/gamma": ("H",),
    "mlm/layer_norm/beta": ("H",),
    "mlm/output_bias": ("V",),
}


_BLOCK_PATH = re.compile(r"layers/(\d+)/(.+)")


def block_prefix(i: int) -> str:
    """The path prefix of block i's tensors (and of its trace steps): "layers/<i>/"."""
    return f"layers/{i}/"


def block_path(i: int, name: str) -> str:
    """The dataset path of block tensor `name` (a key of BLOCK_TENSORS) in block i."""
    if name not in BLOCK_TENSORS:
        raise KeyError(f"{name!r} is not a block tensor; see weights.format.BLOCK_TENSORS")
    return block_prefix(i) + name


def block_tensor_names(config: ModelConfig) -> tuple[str, ...]:
    """The BLOCK_TENSORS a block of this config has: no mixing weights for multi_head attention,
    no gate for a dense feed-forward."""
    absent = (() if config.talking_heads else MIXING_TENSORS) + (() if config.gated else GATE_TENSORS)
    return tuple(name for name in BLOCK_TENSORS if name not in absent)


def split_block_path(path: str) -> tuple[int, str] | None:
    """(i, name) for the dataset path of block i's tensor `name`; None for any other path."""
    m = _BLOCK_PATH.fullmatch(path)
    return (int(m.group(1)), m.group(2)) if m and m.group(2) in BLOCK_TENSORS else None


def dimension_sizes(config: ModelConfig) -> dict[str, int]:
    """The size of each dimension letter for a config."""
    return {"V": config.vocab_size, "P": config.max_position_embeddings, "T": config.type_vocab_size,
            "H": config.hidden_size, "N": config.num_heads, "D": config.head_size,
            "I": config.intermediate_size, "L": config.num_layers}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every float dataset path of a file with this config, in canonical order, with its shape."""
    size = dimension_sizes(config)
    shape = lambda letters: tuple(size[c] for c in letters)  # noqa: E731
    shapes = {path: shape(letters) for path, letters in EMBEDDING_TENSORS.items()}
    for i in range(config.num_layers):
        shapes.update({block_path(i, name): shape(BLOCK_TENSORS[name]) for name in block_tensor_names(config)})
    shapes.update({path: shape(letters) for path, letters in POOLER_TENSORS.items()})
    if config.has_mlm:
        shapes.update({path: shape(letters) for path, letters in MLM_TENSORS.items()})
    return shapes


def block_weight_count(config: ModelConfig) -> int:
    """The number of weights in the L blocks (what a step's products scale with)."""
    return sum(int(np.prod(shape)) for path, shape in expected_shapes(config).items() if split_block_path(path))


def tensor_checksum(array: np.ndarray) -> str:
    """sha256 of the array's little-endian float32 bytes in C order."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return hashlib.sha256(data.tobytes()).hexdigest()


def config_attr_names() -> tuple[str, ...]:
    """The root attribute names that hold the ModelConfig."""
    return tuple(field.name for field in dataclasses.fields(ModelConfig))


def vocab_checksum(tokens) -> str:
    """sha256 of the vocab as vocab.txt would hold it: UTF-8, one token per line, each ending in \\n."""
    digest = hashlib.sha256()
    for token in tokens:
        digest.update(token.encode("utf-8") + b"\n")
    return digest.hexdigest()
