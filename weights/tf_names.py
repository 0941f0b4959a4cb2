"""The SavedModel's variable names and how they match the HDF5 layout: TensorFlow-free.

A TF Hub BERT names its variables after the Model Garden layers that exported it. Two layouts are
known, one per Model Garden encoder, each holding one model family of `weights.format`:

    talking-heads GGELU BERT  EncoderScaffold of TransformerScaffold(TalkingHeadsAttention,
                              GatedFeedforward): talking_heads + geglu (talkheads_ggelu_bert_en_*)
    standard BERT             BertEncoder (BertEncoderV2: the same names under one more scope):
                              multi_head + dense (bert_en_uncased_L-*_H-*_A-*, the small BERTs)

This module holds each layout's table from the datasets of `weights.format` to the variables they
come from, and the matching of a list of variables (names and shapes, as
`engine.tf.extract.read_savedmodel` lists them) to the datasets of a file:

    plan = match_variables(SourceModel(path, variables, ...))   # ExtractionError lists every problem
    plan.config, plan.mapping                                    # {dataset path: SourceVariable}

Variables are matched by structure, not by exact full names: transformer blocks are whatever prefix
precedes a known block-variable name (`transformer_scaffold_7`, `transformer/layer_7`, ...), sorted
by the prefix's numeric suffix (none = 0); the embeddings and pooler may sit under one scope
(BertEncoderV2's `bert_encoder_v2/`); the MLM scope may or may not start with `bert/`; the `:0`
suffix is ignored. The layout is the one whose own names (those the other layout lacks) most
variables carry, a tie going to the talking-heads one; a variable named after the other layout is a
problem, as is every expected tensor not found with its expected shape and dtype float32, and
anything left over. The sizes are inferred from the shapes (a majority vote over every tensor that
shows a dimension, then every shape is checked against it). The activation cannot be seen in any
shape: it is read from the Keras metadata the SavedModel records (`SourceModel.activations`,
`ACTIVATIONS`), else it takes `ModelConfig`'s default with a warning; the LayerNorm epsilon and the
mask constant take `ModelConfig`'s defaults (Model Garden's fixed values).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable

import numpy as np

from weights import format as fmt


class ExtractionError(ValueError):
    """The SavedModel cannot be extracted (wrong layout, missing pieces, bad values, bad output path)."""


# ---------------------------------------------------------------------------- the name tables
# Dataset name (a key of the weights.format tables) -> the TF variable it is read from. Block names
# are relative to the block's prefix; MLM names follow an optional "bert/" scope. The TF_* tables
# are the talking-heads layout's; the standard BERT's differ in the feed-forward and the pooler.

TF_EMBEDDING_NAMES = {
    "embeddings/word": "word_embeddings/embeddings",
    "embeddings/position": "position_embedding/embeddings",
    "embeddings/type": "type_embeddings/embeddings",
    "embeddings/layer_norm/gamma": "embeddings/layer_norm/gamma",
    "embeddings/layer_norm/beta": "embeddings/layer_norm/beta",
}
TF_BLOCK_NAMES = {
    "attention/query/kernel": "self_attention/query/kernel",
    "attention/query/bias": "self_attention/query/bias",
    "attention/key/kernel": "self_attention/key/kernel",
    "attention/key/bias": "self_attention/key/bias",
    "attention/value/kernel": "self_attention/value/kernel",
    "attention/value/bias": "self_attention/value/bias",
    "attention/output/kernel": "self_attention/attention_output/kernel",
    "attention/output/bias": "self_attention/attention_output/bias",
    "attention/pre_softmax_weight": "self_attention/pre_softmax_weight",
    "attention/post_softmax_weight": "self_attention/post_softmax_weight",
    "attention_layer_norm/gamma": "self_attention_layer_norm/gamma",
    "attention_layer_norm/beta": "self_attention_layer_norm/beta",
    "feedforward/intermediate/kernel": "feedforward/intermediate_0/kernel",
    "feedforward/intermediate/bias": "feedforward/intermediate_0/bias",
    "feedforward/gate/kernel": "feedforward/gate_0/kernel",
    "feedforward/gate/bias": "feedforward/gate_0/bias",
    "feedforward/output/kernel": "feedforward/output_0/kernel",
    "feedforward/output/bias": "feedforward/output_0/bias",
    "feedforward_layer_norm/gamma": "feedforward/output_layer_norm_0/gamma",
    "feedforward_layer_norm/beta": "feedforward/output_layer_norm_0/beta",
}
TF_POOLER_NAMES = {
    "pooler/kernel": "cls_transform/kernel",
    "pooler/bias": "cls_transform/bias",
}
TF_MLM_NAMES = {
    "mlm/transform/kernel": "cls/predictions/transform/dense/kernel",
    "mlm/transform/bias": "cls/predictions/transform/dense/bias",
    "mlm/layer_norm/gamma": "cls/predictions/transform/LayerNorm/gamma",
    "mlm/layer_norm/beta": "cls/predictions/transform/LayerNorm/beta",
    "mlm/output_bias": "cls/predictions/output_bias/bias",
}
# BertEncoder's TransformerEncoderBlock: the same attention without the mixing weights, a plain
# two-layer feed-forward.
BERT_BLOCK_NAMES = {
    **{name: tf for name, tf in TF_BLOCK_NAMES.items()
       if name.startswith("attention") and name not in fmt.MIXING_TENSORS},
    "feedforward/intermediate/kernel": "intermediate/kernel",
    "feedforward/intermediate/bias": "intermediate/bias",
    "feedforward/output/kernel": "output/kernel",
    "feedforward/output/bias": "output/bias",
    "feedforward_layer_norm/gamma": "output_layer_norm/gamma",
    "feedforward_layer_norm/beta": "output_layer_norm/beta",
}
BERT_POOLER_NAMES = {
    "pooler/kernel": "pooler_transform/kernel",
    "pooler/bias": "pooler_transform/bias",
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """One Model Garden encoder's variable names, and the model family they hold."""
    name: str                       # in messages: "the <name> layout"
    encoder: str                    # the Model Garden class that names them
    attention: str                  # the family's ModelConfig.attention
    feed_forward: str               # the family's ModelConfig.feed_forward
    block_names: dict               # block dataset name -> TF name after the block prefix
    top_names: dict                 # embedding and pooler dataset path -> TF name

    def tf_name(self, path: str, block_prefixes: list[str]) -> str:
        """The TF variable name a dataset path is read from (the MLM scope shown as `[bert/]`)."""
        block = fmt.split_block_path(path)
        if block:
            i, name = block
            return f"{block_prefixes[i] if i < len(block_prefixes) else '<block>'}/{self.block_names[name]}"
        if path in self.top_names:
            return self.top_names[path]
        return "[bert/]" + TF_MLM_NAMES[path]


TALKING_HEADS = Layout("talking-heads GGELU BERT",
                       "EncoderScaffold of TransformerScaffold(TalkingHeadsAttention, GatedFeedforward)",
                       "talking_heads", "geglu", TF_BLOCK_NAMES, {**TF_EMBEDDING_NAMES, **TF_POOLER_NAMES})
STANDARD_BERT = Layout("standard BERT", "BertEncoder", "multi_head", "dense", BERT_BLOCK_NAMES,
                       {**TF_EMBEDDING_NAMES, **BERT_POOLER_NAMES})
LAYOUTS = (TALKING_HEADS, STANDARD_BERT)  # the first wins a tie


def layout_of(config: fmt.ModelConfig) -> Layout | None:
    """The layout that holds a config's family; None for a family no Model Garden encoder exports."""
    return next((layout for layout in LAYOUTS
                 if (layout.attention, layout.feed_forward) == (config.attention, config.feed_forward)), None)


# The activations as the Keras metadata names them (tf_keras.activations.serialize) ->
# ModelConfig.hidden_activation. Model Garden's "gelu" (tf_utils.get_activation("gelu"), what
# export_tfhub_lib builds from a config's hidden_act "gelu") is registered as "Text>gelu" and is
# the tanh approximation; Keras' own "gelu" is exact by default (approximate=False).
ACTIVATIONS = {
    "Text>gelu": "gelu_tanh",
    "gelu": "gelu_erf",
}
_DEFAULT_ACTIVATION = fmt.ModelConfig.__dataclass_fields__["hidden_activation"].default


def _names(layout: Layout) -> frozenset:
    return frozenset(layout.top_names.values()) | frozenset(layout.block_names.values())


def _own_names(layout: Layout) -> frozenset:
    """The layout's TF names that no other layout has: they tell the layouts apart."""
    return _names(layout).difference(*(_names(other) for other in LAYOUTS if other is not layout))


# The names the matching reads: every layout's top and block TF names, and each layout's own.
_TOP_NAMES = frozenset(tf for layout in LAYOUTS for tf in layout.top_names.values())
_BLOCK_SUFFIXES = sorted({tf for layout in LAYOUTS for tf in layout.block_names.values()}, key=len, reverse=True)
_OWN_NAMES = {layout.name: _own_names(layout) for layout in LAYOUTS}
_MLM = {tf: path for path, tf in TF_MLM_NAMES.items()}
_MLM_RE = re.compile(r"(?:bert/)?(cls/predictions/.+)")
_MAX_LISTED = 40  # per category in an error message

# Which axis of which dataset shows which config size: format.expected_shapes with distinct
# stand-in sizes, so it follows the format.
_SYMBOLIC_SIZES = dict(hidden_size=15, num_heads=3, head_size=5, intermediate_size=7, vocab_size=11,
                       max_position_embeddings=13, type_vocab_size=17)
_SIZE_OF_VALUE = {v: k for k, v in _SYMBOLIC_SIZES.items()}
_SYMBOLIC_SHAPES = fmt.expected_shapes(fmt.ModelConfig(num_layers=1, **_SYMBOLIC_SIZES))


def _normalize(name: str) -> str:
    """`transformer_scaffold/x/kernel:0` -> `transformer_scaffold/x/kernel`."""
    return re.sub(r":\d+$", "", name)


def _shape_str(shape) -> str:
    return str(tuple(int(d) for d in shape))


@dataclasses.dataclass
class SourceVariable:
    """One float variable of the SavedModel, read lazily."""
    name: str                                   # as TF reports it, e.g. "transformer_scaffold/...:0"
    shape: tuple[int, ...]
    dtype: str                                  # numpy-style name, e.g. "float32"
    read: Callable[[], np.ndarray] = dataclasses.field(repr=False, default=None)


@dataclasses.dataclass
class SourceModel:
    """What a SavedModel holds, before any matching."""
    path: str
    variables: list[SourceVariable]             # float variables, deduplicated
    other_variables: list[tuple[str, str]]      # non-float (name, dtype) that are not do_lower_case
    has_mlm_object: bool
    do_lower_case: bool | None                  # None: no do_lower_case variable found
    do_lower_case_source: str | None
    vocab: list[str] | None
    vocab_source: str | None
    tensorflow_version: str = ""
    source_tensorflow_version: str = ""
    # The activations the Keras metadata records, as it names them ("Text>gelu", ...):
    # {"feedforward": [...], "mlm": [...]}; None where nobody read them (a list of variables made by
    # hand), which takes the default without a warning.
    activations: dict[str, list[str]] | None = None


@dataclasses.dataclass
class Plan:
    """The matching result: the inferred config and which variable goes to which dataset."""
    config: fmt.ModelConfig
    mapping: dict[str, SourceVariable]          # dataset path -> variable, in canonical order
    warnings: list[str]


class Problems:
    """Collects everything wrong, to raise it as ONE ExtractionError."""

    def __init__(self):
        self.items: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, category: str, text: str) -> None:
        self.items[category].append(text)

    def __bool__(self) -> bool:
        return any(self.items.values())

    def raise_if_any(self, where: str, headline: str, hints=()) -> None:
        if not self:
            return
        count = sum(len(v) for v in self.items.values())
        lines = [f"{where}: {headline} ({count} problem{'s' if count != 1 else ''}):"]
        lines += [f"  note: {hint}" for hint in hints]
        for category, entries in self.items.items():
            for text in entries[:_MAX_LISTED]:
                lines.append(f"  {category}: {text}")
            if len(entries) > _MAX_LISTED:
                lines.append(f"  {category}: ... and {len(entries) - _MAX_LISTED} more")
        raise ExtractionError("\n".join(lines))


def _block_key(prefix: str) -> tuple[str, int]:
    """`transformer_scaffold_7` -> ("transformer_scaffold", 7); no numeric suffix -> number 0."""
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", prefix)
    return m.group(1), int(m.group(2) or 0)


def _infer_sizes(found: dict[str, tuple[int, ...]]) -> dict[str, collections.Counter]:
    votes = collections.defaultdict(collections.Counter)
    for path, shape in found.items():
        block = fmt.split_block_path(path)
        symbolic = _SYMBOLIC_SHAPES.get(fmt.block_path(0, block[1]) if block else path)
        if symbolic is None or len(symbolic) != len(shape):
            continue
        for size, value in zip(symbolic, shape):
            votes[_SIZE_OF_VALUE[size]][int(value)] += 1
    return votes


def _sort_variables(source: SourceModel, problems: Problems):
    """(top-level {TF name: variable}, MLM {dataset path: variable}, {block prefix: {TF name after
    the prefix: variable}}, leftovers), by every layout's names."""
    top: dict[str, SourceVariable] = {}
    mlm: dict[str, SourceVariable] = {}
    blocks: dict[str, dict[str, SourceVariable]] = {}
    leftovers: list[SourceVariable] = []

    def claim(table: dict, key: str, var: SourceVariable) -> None:
        if key in table:
            problems.add("duplicate", f"{var.name} and {table[key].name} both match {key}")
        else:
            table[key] = var

    for var in source.variables:
        name = _normalize(var.name)
        unscoped = name.split("/", 1)[-1]       # BertEncoderV2 holds its embeddings and pooler under its scope
        if name in _TOP_NAMES or unscoped in _TOP_NAMES:
            claim(top, name if name in _TOP_NAMES else unscoped, var)
            continue
        m = _MLM_RE.fullmatch(name)
        if m and m.group(1) in _MLM:
            claim(mlm, _MLM[m.group(1)], var)
            continue
        for suffix in _BLOCK_SUFFIXES:
            if name.endswith("/" + suffix) and len(name) > len(suffix) + 1:
                claim(blocks.setdefault(name[: -len(suffix) - 1], {}), suffix, var)
                break
        else:
            leftovers.append(var)
    return top, mlm, blocks, leftovers


def _own_variables(top: dict, blocks: dict) -> dict[str, list[SourceVariable]]:
    """{layout name: the variables that carry one of its own names}."""
    found = list(top.items()) + [item for block in blocks.values() for item in block.items()]
    return {layout.name: [var for tf, var in found if tf in _OWN_NAMES[layout.name]] for layout in LAYOUTS}


def _choose_layout(own: dict[str, list[SourceVariable]]) -> Layout:
    """The layout whose own names most variables carry; the first of LAYOUTS on a tie."""
    return max(LAYOUTS, key=lambda layout: (len(own[layout.name]), -LAYOUTS.index(layout)))


def _mixed_layouts(layout: Layout, own: dict, problems: Problems) -> None:
    """Every variable named after another layout than the chosen one is a problem."""
    for other in LAYOUTS:
        foreign = own[other.name] if other is not layout else []
        if foreign:
            problems.add("mixed layouts", f"{len(own[layout.name])} variables carry names only the {layout.name} "
                                          f"layout ({layout.encoder}) has, {len(foreign)} names only the "
                                          f"{other.name} layout ({other.encoder}) has, e.g. {foreign[0].name}: "
                                          "one SavedModel holds one layout")
        for var in sorted(foreign, key=lambda v: v.name):
            problems.add("unexpected", f"{var.name} {_shape_str(var.shape)} {var.dtype} "
                                       f"(a name of the {other.name} layout)")


def _order_blocks(blocks: dict, problems: Problems) -> list[str]:
    """The block prefixes in order of their numeric suffix; mixed bases and equal numbers are problems."""
    keyed = {prefix: _block_key(prefix) for prefix in blocks}
    if len({base for base, _ in keyed.values()}) > 1:
        problems.add("unexpected", "transformer blocks under different prefixes: " + ", ".join(sorted(blocks)))
    numbers = collections.Counter(n for _, n in keyed.values())
    for prefix, (_, n) in sorted(keyed.items()):
        if numbers[n] > 1:
            problems.add("duplicate", f"block prefix {prefix} has the same number ({n}) as another block")
    return sorted(blocks, key=lambda p: (keyed[p][1], p))


def _layout_mapping(layout: Layout, top: dict, blocks: dict, ordered: list[str]) -> dict[str, SourceVariable]:
    """{dataset path: variable} of the variables named after the layout (the others are problems already)."""
    top_path = {tf: path for path, tf in layout.top_names.items()}
    block_name = {tf: name for name, tf in layout.block_names.items()}
    mapping = {top_path[tf]: var for tf, var in top.items() if tf in top_path}
    for i, prefix in enumerate(ordered):
        mapping.update({fmt.block_path(i, block_name[tf]): var for tf, var in blocks[prefix].items()
                        if tf in block_name})
    return mapping


def _notes(layout: Layout, own: dict) -> list[str]:
    """What the error message says first: which layout the variables were held against, and why."""
    if not any(own.values()):
        names = ", ".join(f"*/{other.block_names['feedforward/intermediate/kernel']}" for other in LAYOUTS)
        return [f"no variable carries a name of one layout alone (e.g. {names}): held against the {layout.name} "
                f"layout ({layout.encoder}); not a Model Garden BERT encoder?"]
    return [f"held against the {layout.name} layout ({layout.encoder}), whose own names "
            f"{len(own[layout.name])} variables carry"]


def _hidden_activation(source: SourceModel, has_mlm: bool, problems: Problems, warnings: list[str]) -> str:
    """ModelConfig.hidden_activation from the activations the Keras metadata records (ACTIVATIONS)."""
    if source.activations is None:
        return _DEFAULT_ACTIVATION
    feedforward = sorted(set(source.activations.get("feedforward", ())))
    if not feedforward:
        warnings.append(f"the SavedModel records no feed-forward activation (no Keras metadata): assuming "
                        f"hidden_activation={_DEFAULT_ACTIVATION} (Model Garden's gelu, the tanh approximation)")
        return _DEFAULT_ACTIVATION
    known = ", ".join(f"{name!r} ({kind})" for name, kind in ACTIVATIONS.items())
    for name in feedforward:
        if name not in ACTIVATIONS:
            problems.add("unsupported", f"the feed-forward's activation {name!r} (Keras metadata) is none the "
                                        f"engine runs: {known}")
    if len(feedforward) > 1:
        problems.add("inconsistent", f"the blocks' feed-forward activations differ: {feedforward}")
    if len(feedforward) != 1 or feedforward[0] not in ACTIVATIONS:
        return _DEFAULT_ACTIVATION
    activation = ACTIVATIONS[feedforward[0]]
    differing = sorted(name for name in set(source.activations.get("mlm", ())) if ACTIVATIONS.get(name) != activation)
    if has_mlm and differing:
        problems.add("inconsistent", f"the MLM transform's activation {differing[0]!r} is not the feed-forward's "
                                     f"{feedforward[0]!r}: the format has one hidden_activation for both")
    return activation


def match_variables(source: SourceModel) -> Plan:
    """Matches the SavedModel's variables to the HDF5 layout; raises one ExtractionError listing all problems."""
    problems = Problems()
    warnings: list[str] = []
    top, mlm, blocks, leftovers = _sort_variables(source, problems)
    own = _own_variables(top, blocks)
    layout = _choose_layout(own)
    _mixed_layouts(layout, own, problems)
    ordered = _order_blocks(blocks, problems)

    mapping = _layout_mapping(layout, top, blocks, ordered)
    has_mlm = bool(mlm) or source.has_mlm_object
    if has_mlm:
        mapping.update(mlm)
    else:
        warnings.append("the SavedModel has no .mlm sub-object and no MLM variables: "
                        "extracting the encoder only (has_mlm=False, no /mlm group)")
    if not ordered:
        problems.add("missing", "no transformer blocks (no variable named */" +
                     "self_attention/query/kernel or any other block variable)")

    votes = _infer_sizes({p: v.shape for p, v in mapping.items()})
    sizes = {}
    for size in _SYMBOLIC_SIZES:
        if votes.get(size):
            sizes[size] = votes[size].most_common(1)[0][0]
        else:
            problems.add("missing", f"cannot infer {size}: no tensor shows it")
    do_lower_case = source.do_lower_case
    if do_lower_case is None:
        do_lower_case = True
        warnings.append("the SavedModel has no do_lower_case variable: assuming do_lower_case=True "
                        "(the Hub model is uncased)")
    family = dict(attention=layout.attention, feed_forward=layout.feed_forward,
                  hidden_activation=_hidden_activation(source, has_mlm, problems, warnings))
    config = None
    if len(sizes) == len(_SYMBOLIC_SIZES) and ordered:
        try:
            config = fmt.ModelConfig(num_layers=len(ordered), do_lower_case=bool(do_lower_case),
                                     has_mlm=has_mlm, **family, **sizes)
        except ValueError as e:
            problems.add("inconsistent", f"{e} (sizes inferred from the shapes: {sizes})")

    if config is not None:
        expected = fmt.expected_shapes(config)
        for path, shape in expected.items():
            var = mapping.get(path)
            if var is None:
                problems.add("missing", f"{layout.tf_name(path, ordered)} {_shape_str(shape)} (for {path})")
            elif tuple(var.shape) != tuple(shape):
                problems.add("mis-shaped", f"{var.name} has shape {_shape_str(var.shape)}, "
                                           f"expected {_shape_str(shape)} (for {path})")
        mapping = {p: mapping[p] for p in expected if p in mapping}
        if source.vocab is not None and len(source.vocab) != config.vocab_size:
            problems.add("mis-shaped", f"vocab asset {source.vocab_source} has {len(source.vocab)} "
                                       f"tokens, the word embeddings have {config.vocab_size} rows")
    elif ordered:  # sizes unknown: still name every tensor that is missing, without shapes
        placeholder = fmt.ModelConfig(num_layers=len(ordered), hidden_size=1, num_heads=1, head_size=1,
                                      intermediate_size=1, vocab_size=1, max_position_embeddings=1,
                                      type_vocab_size=1, has_mlm=has_mlm, **family)
        for path in fmt.expected_shapes(placeholder):
            if path not in mapping:
                problems.add("missing", f"{layout.tf_name(path, ordered)} (for {path})")
    for path, var in mapping.items():
        if var.dtype != "float32":
            problems.add("wrong dtype", f"{var.name} has dtype {var.dtype}, expected float32 (for {path})")
    for var in sorted(leftovers, key=lambda v: v.name):
        problems.add("unexpected", f"{var.name} {_shape_str(var.shape)} {var.dtype}")
    for name, dtype in source.other_variables:
        problems.add("unexpected", f"{name} ({dtype}, not float)")
    problems.raise_if_any(source.path, f"the SavedModel does not match the {layout.name} layout",
                          _notes(layout, own) if problems else ())
    return Plan(config=config, mapping=mapping, warnings=warnings)
