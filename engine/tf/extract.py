"""SavedModel -> HDF5: extracts TF Hub's talkheads_ggelu_bert_en_base (or a reference model) once.

    python -m engine.tf.extract SAVEDMODEL_DIR OUT.h5 [--force]

Reads the SavedModel with `tf.saved_model.load`: the root's `.variables` (the encoder), `.mlm.variables`
(the encoder's variables again plus the masked-LM head), the non-float `do_lower_case` variable and
the `vocab.txt` asset, and writes one self-describing HDF5 file in the layout of `weights.format`.

Variables are matched by structure, not by exact full names: transformer blocks are whatever prefix
precedes a known block-variable name (`transformer_scaffold`, `transformer_scaffold_7`, ...), sorted
by the prefix's numeric suffix (none = 0); the MLM scope may or may not start with `bert/`; the `:0`
suffix is ignored. Every expected tensor must be found with its expected shape and dtype float32,
and nothing may be left over; otherwise one `ExtractionError` lists everything that is missing,
unexpected or mis-shaped. A SavedModel without `.mlm` extracts as an encoder-only file (has_mlm
false, no `/mlm` group), with a warning.

The model config is inferred from the tensor shapes (a majority vote over every tensor that shows a
dimension, then every shape is checked against it). The activation ("gelu_tanh"), the LayerNorm
epsilon (1e-12) and the attention-mask constant (-1e9) cannot be seen in any shape: they are the
fixed values of the Hub model and are written as `ModelConfig`'s defaults.

The write is atomic: a temporary file in the output's folder, fsync, then a rename; an interrupted
extraction leaves no half file at OUT.h5 (a SIGKILL can leave a hidden `.OUT.h5.extract-PID-*.tmp`,
removed by the next extraction to the same output), and an existing OUT.h5 is only replaced with
--force.

It lives in engine/tf/ with everything else that imports TensorFlow; `write_weights` and the
matching code do not need it (TensorFlow is imported inside `read_savedmodel`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import os
import re
import signal
import sys
import tempfile
from typing import Callable

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py
import numpy as np

from weights import format as fmt
from weights import write as weights_write
from weights.write import check_output_path, remove_stale_temps  # noqa: F401  (re-exported)
from engine.tools.progress import Progress


class ExtractionError(ValueError):
    """The SavedModel cannot be extracted (wrong layout, missing pieces, bad values, bad output path)."""


# TF variable names (relative to the block prefix, or absolute) -> HDF5 dataset paths.
BLOCK_VARIABLES = {
    "self_attention/query/kernel": "attention/query/kernel",
    "self_attention/query/bias": "attention/query/bias",
    "self_attention/key/kernel": "attention/key/kernel",
    "self_attention/key/bias": "attention/key/bias",
    "self_attention/value/kernel": "attention/value/kernel",
    "self_attention/value/bias": "attention/value/bias",
    "self_attention/attention_output/kernel": "attention/output/kernel",
    "self_attention/attention_output/bias": "attention/output/bias",
    "self_attention/pre_softmax_weight": "attention/pre_softmax_weight",
    "self_attention/post_softmax_weight": "attention/post_softmax_weight",
    "self_attention_layer_norm/gamma": "attention_layer_norm/gamma",
    "self_attention_layer_norm/beta": "attention_layer_norm/beta",
    "feedforward/intermediate_0/kernel": "feedforward/intermediate/kernel",
    "feedforward/intermediate_0/bias": "feedforward/intermediate/bias",
    "feedforward/gate_0/kernel": "feedforward/gate/kernel",
    "feedforward/gate_0/bias": "feedforward/gate/bias",
    "feedforward/output_0/kernel": "feedforward/output/kernel",
    "feedforward/output_0/bias": "feedforward/output/bias",
    "feedforward/output_layer_norm_0/gamma": "feedforward_layer_norm/gamma",
    "feedforward/output_layer_norm_0/beta": "feedforward_layer_norm/beta",
}
TOP_VARIABLES = {
    "word_embeddings/embeddings": "embeddings/word",
    "position_embedding/embeddings": "embeddings/position",
    "type_embeddings/embeddings": "embeddings/type",
    "embeddings/layer_norm/gamma": "embeddings/layer_norm/gamma",
    "embeddings/layer_norm/beta": "embeddings/layer_norm/beta",
    "cls_transform/kernel": "pooler/kernel",
    "cls_transform/bias": "pooler/bias",
}
MLM_VARIABLES = {  # after an optional "bert/" scope
    "cls/predictions/transform/dense/kernel": "mlm/transform/kernel",
    "cls/predictions/transform/dense/bias": "mlm/transform/bias",
    "cls/predictions/transform/LayerNorm/gamma": "mlm/layer_norm/gamma",
    "cls/predictions/transform/LayerNorm/beta": "mlm/layer_norm/beta",
    "cls/predictions/output_bias/bias": "mlm/output_bias",
}
_MLM_RE = re.compile(r"(?:bert/)?(cls/predictions/.+)")
_BLOCK_SUFFIXES = sorted(BLOCK_VARIABLES, key=len, reverse=True)
_H5_TO_BLOCK_TF = {v: k for k, v in BLOCK_VARIABLES.items()}
_H5_TO_TOP_TF = {v: k for k, v in TOP_VARIABLES.items()}
_H5_TO_MLM_TF = {v: k for k, v in MLM_VARIABLES.items()}
_MAX_LISTED = 40  # per category in an error message

# Which axis of which dataset shows which config size: derived from format.expected_shapes with
# distinct stand-in sizes, so it follows the format automatically.
_SYMBOLIC_SIZES = dict(hidden_size=15, num_heads=3, head_size=5, intermediate_size=7, vocab_size=11,
                       max_position_embeddings=13, type_vocab_size=17)
_SIZE_OF_VALUE = {v: k for k, v in _SYMBOLIC_SIZES.items()}
_SYMBOLIC_SHAPES = fmt.expected_shapes(fmt.ModelConfig(num_layers=1, **_SYMBOLIC_SIZES))


def _log(message: str, stream=None) -> None:
    print(f"extract: {message}", file=stream or sys.stderr, flush=True)


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
    """What `read_savedmodel` found, before any matching."""
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


@dataclasses.dataclass
class Plan:
    """The matching result: the inferred config and which variable goes to which dataset."""
    config: fmt.ModelConfig
    mapping: dict[str, SourceVariable]          # dataset path -> variable, in canonical order
    warnings: list[str]


@dataclasses.dataclass
class ExtractionResult:
    path: str
    config: fmt.ModelConfig
    num_tensors: int
    num_parameters: int
    warnings: list[str]


class _Problems:
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


# ----------------------------------------------------------------------------------------------
# Matching (no TensorFlow)

def _block_key(prefix: str) -> tuple[str, int]:
    """`transformer_scaffold_7` -> ("transformer_scaffold", 7); no numeric suffix -> number 0."""
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", prefix)
    return m.group(1), int(m.group(2) or 0)


def _infer_sizes(found: dict[str, tuple[int, ...]]) -> dict[str, collections.Counter]:
    votes = collections.defaultdict(collections.Counter)
    for path, shape in found.items():
        template = re.sub(r"^layers/\d+/", "layers/0/", path)
        symbolic = _SYMBOLIC_SHAPES.get(template)
        if symbolic is None or len(symbolic) != len(shape):
            continue
        for size, value in zip(symbolic, shape):
            votes[_SIZE_OF_VALUE[size]][int(value)] += 1
    return votes


def match_variables(source: SourceModel) -> Plan:
    """Matches the SavedModel's variables to the HDF5 layout; raises one ExtractionError listing all problems."""
    problems = _Problems()
    warnings: list[str] = []
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
        if name in TOP_VARIABLES:
            claim(top, TOP_VARIABLES[name], var)
            continue
        m = _MLM_RE.fullmatch(name)
        if m and m.group(1) in MLM_VARIABLES:
            claim(mlm, MLM_VARIABLES[m.group(1)], var)
            continue
        for suffix in _BLOCK_SUFFIXES:
            if name.endswith("/" + suffix) and len(name) > len(suffix) + 1:
                prefix = name[: -len(suffix) - 1]
                claim(blocks.setdefault(prefix, {}), BLOCK_VARIABLES[suffix], var)
                break
        else:
            leftovers.append(var)

    # Blocks in order of their prefix's numeric suffix.
    keyed = {prefix: _block_key(prefix) for prefix in blocks}
    bases = sorted({base for base, _ in keyed.values()})
    if len(bases) > 1:
        problems.add("unexpected", "transformer blocks under different prefixes: " +
                     ", ".join(sorted(blocks)))
    numbers = collections.Counter(n for _, n in keyed.values())
    for prefix, (base, n) in sorted(keyed.items()):
        if numbers[n] > 1:
            problems.add("duplicate", f"block prefix {prefix} has the same number ({n}) as another block")
    ordered = sorted(blocks, key=lambda p: (keyed[p][1], p))

    mapping: dict[str, SourceVariable] = {}
    for path, var in top.items():
        mapping[path] = var
    for i, prefix in enumerate(ordered):
        for rel, var in blocks[prefix].items():
            mapping[f"layers/{i}/{rel}"] = var
    has_mlm = bool(mlm) or source.has_mlm_object
    if has_mlm:
        mapping.update(mlm)
    else:
        warnings.append("the SavedModel has no .mlm sub-object and no MLM variables: "
                        "extracting the encoder only (has_mlm=False, no /mlm group)")

    hints = []
    names = [_normalize(v.name) for v in source.variables]
    if not any(n.endswith("pre_softmax_weight") for n in names):
        hints.append("no */self_attention/pre_softmax_weight variable: this does not look like a "
                     "talking-heads attention model (plain BERT?)")
    if not any(n.endswith("feedforward/gate_0/kernel") for n in names):
        hints.append("no */feedforward/gate_0/kernel variable: this does not look like a gated-GELU "
                     "feedforward model")
    if not ordered:
        problems.add("missing", "no transformer blocks (no variable named */" +
                     "self_attention/query/kernel or any other block variable)")

    # Infer the config from the shapes (majority vote), then check every shape against it.
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
    config = None
    if len(sizes) == len(_SYMBOLIC_SIZES) and ordered:
        try:
            config = fmt.ModelConfig(num_layers=len(ordered), do_lower_case=bool(do_lower_case),
                                     has_mlm=has_mlm, **sizes)
        except ValueError as e:
            problems.add("inconsistent", f"{e} (sizes inferred from the shapes: {sizes})")

    def tf_name(path: str) -> str:
        m = re.fullmatch(r"layers/(\d+)/(.+)", path)
        if m:
            i = int(m.group(1))
            prefix = ordered[i] if i < len(ordered) else "<block>"
            return f"{prefix}/{_H5_TO_BLOCK_TF[m.group(2)]}"
        if path in _H5_TO_TOP_TF:
            return _H5_TO_TOP_TF[path]
        return "[bert/]" + _H5_TO_MLM_TF[path]

    if config is not None:
        expected = fmt.expected_shapes(config)
        for path, shape in expected.items():
            var = mapping.get(path)
            if var is None:
                problems.add("missing", f"{tf_name(path)} {_shape_str(shape)} (for {path})")
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
                                      type_vocab_size=1, has_mlm=has_mlm)
        for path in fmt.expected_shapes(placeholder):
            if path not in mapping:
                problems.add("missing", f"{tf_name(path)} (for {path})")
    for path, var in mapping.items():
        if var.dtype != "float32":
            problems.add("wrong dtype", f"{var.name} has dtype {var.dtype}, expected float32 (for {path})")
    for var in sorted(leftovers, key=lambda v: v.name):
        problems.add("unexpected", f"{var.name} {_shape_str(var.shape)} {var.dtype}")
    for name, dtype in source.other_variables:
        problems.add("unexpected", f"{name} ({dtype}, not float)")
    problems.raise_if_any(source.path, "the SavedModel does not match the talking-heads GGELU BERT layout",
                          hints if problems else ())
    return Plan(config=config, mapping=mapping, warnings=warnings)


# ----------------------------------------------------------------------------------------------
# Reading the SavedModel (TensorFlow)

def read_savedmodel(savedmodel_dir: str) -> SourceModel:
    """Loads the SavedModel and lists its variables, do_lower_case and vocab (values read lazily)."""
    path = os.path.abspath(savedmodel_dir)
    if not os.path.isdir(path):
        raise ExtractionError(f"{path}: not a folder (a SavedModel is a folder with saved_model.pb)")
    if not (os.path.isfile(os.path.join(path, "saved_model.pb")) or
            os.path.isfile(os.path.join(path, "saved_model.pbtxt"))):
        raise ExtractionError(f"{path}: not a SavedModel (no saved_model.pb)")
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    try:
        model = tf.saved_model.load(path)
    except Exception as e:  # TF raises many kinds; the message is what matters
        raise ExtractionError(f"{path}: tf.saved_model.load failed: {type(e).__name__}: {e}") from e

    def variables_of(obj, what):
        try:
            return list(obj.variables)
        except (AttributeError, TypeError) as e:
            raise ExtractionError(f"{path}: {what} has no .variables list ({e}); "
                                  "not a Keras-exported TF Hub model") from e

    seen = set()
    all_vars = []
    for var in variables_of(model, "the SavedModel root"):
        if id(var) not in seen:
            seen.add(id(var))
            all_vars.append(var)
    has_mlm_object = hasattr(model, "mlm")
    if has_mlm_object:
        for var in variables_of(model.mlm, "the .mlm sub-object"):
            if id(var) not in seen:
                seen.add(id(var))
                all_vars.append(var)

    # do_lower_case: the root attribute if it is a bool variable, else the one bool scalar variable.
    dlc_var = getattr(model, "do_lower_case", None)
    if not (isinstance(dlc_var, tf.Variable) and dlc_var.dtype == tf.bool):
        bools = [v for v in all_vars if v.dtype == tf.bool and v.shape.rank == 0]
        dlc_var = bools[0] if len(bools) == 1 else None
    if dlc_var is not None and id(dlc_var) not in seen:
        seen.add(id(dlc_var))

    floats, others = [], []
    for var in all_vars:
        if var is dlc_var:
            continue
        if var.dtype.is_floating:
            floats.append(SourceVariable(name=var.name, shape=tuple(int(d) for d in var.shape),
                                         dtype=var.dtype.name, read=var.numpy))
        else:
            others.append((var.name, var.dtype.name))

    vocab = vocab_source = None
    vocab_file = getattr(model, "vocab_file", None)
    if vocab_file is not None:
        try:
            vocab_source = vocab_file.asset_path.numpy().decode("utf-8")
        except AttributeError as e:
            raise ExtractionError(f"{path}: .vocab_file is not an asset ({e})") from e
        from weights.vocab import read_vocab
        try:
            vocab = read_vocab(vocab_source)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ExtractionError(f"{path}: cannot read the vocab asset {vocab_source}: {e}") from e

    source_version = getattr(model, "tensorflow_version", "")
    return SourceModel(
        path=path, variables=floats, other_variables=others, has_mlm_object=has_mlm_object,
        do_lower_case=None if dlc_var is None else bool(dlc_var.numpy()),
        do_lower_case_source=None if dlc_var is None else dlc_var.name,
        vocab=vocab, vocab_source=vocab_source, tensorflow_version=tf.__version__,
        source_tensorflow_version=source_version if isinstance(source_version, str) else "")


def read_tensors(source: SourceModel, plan: Plan, *, progress: bool = True) -> dict[str, np.ndarray]:
    """Reads every matched variable as a float32 C-contiguous array; refuses non-finite values."""
    problems = _Problems()
    total = sum(int(np.prod(v.shape)) * 4 for v in plan.mapping.values())
    tensors = {}
    with Progress(total, "extract: reading", live=None if progress else False,
                  stream=sys.stderr if progress else _NullStream()) as bar:
        for path, var in plan.mapping.items():
            array = np.asarray(var.read())
            if array.dtype != np.float32 or array.shape != tuple(var.shape):
                problems.add("bad value", f"{var.name} read as {array.dtype} {array.shape}")
                continue
            bad = ~np.isfinite(array)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                problems.add("non-finite", f"{var.name} has {int(bad.sum())} NaN/inf values "
                                           f"(first at {first}) (for {path})")
            tensors[path] = np.ascontiguousarray(array)
            bar.update(array.nbytes, path)
    problems.raise_if_any(source.path, "the SavedModel's values cannot be extracted")
    return tensors


class _NullStream:
    def write(self, _):
        pass

    def flush(self):
        pass

    def isatty(self):
        return False


# ----------------------------------------------------------------------------------------------
# Writing (no TensorFlow): weights/write.py

def write_weights(out_path: str, config: fmt.ModelConfig, tensors: dict[str, np.ndarray], *,
                  sources: dict[str, str] | None = None, vocab: list[str] | None = None,
                  vocab_source: str = "", provenance: dict | None = None, force: bool = False,
                  progress: bool = True) -> str:
    """weights.write.write_weights with a progress bar; a mismatch raises ExtractionError."""
    expected = fmt.expected_shapes(config)
    total = sum(np.asarray(tensors[p]).nbytes for p in expected if p in tensors)
    with Progress(total, "extract: writing", live=None if progress else False,
                  stream=sys.stderr if progress else _NullStream()) as bar:
        try:
            return weights_write.write_weights(out_path, config, tensors, sources=sources, vocab=vocab,
                                               vocab_source=vocab_source, provenance=provenance, force=force,
                                               on_progress=bar.update)
        except weights_write.WeightsWriteError as e:
            raise ExtractionError(str(e)) from None


def extract(savedmodel_dir: str, out_path: str, *, force: bool = False, progress: bool = True) -> ExtractionResult:
    """Extracts a SavedModel to an HDF5 file. Raises ExtractionError or FileExistsError."""
    out = check_output_path(out_path, force)  # fail before the slow TensorFlow load
    _log(f"loading {os.path.abspath(savedmodel_dir)}")
    source = read_savedmodel(savedmodel_dir)
    plan = match_variables(source)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    c = plan.config
    _log(f"matched {len(plan.mapping)} tensors: L={c.num_layers} H={c.hidden_size} N={c.num_heads} "
         f"D={c.head_size} I={c.intermediate_size} V={c.vocab_size} P={c.max_position_embeddings} "
         f"T={c.type_vocab_size} mlm={c.has_mlm} do_lower_case={c.do_lower_case}")
    tensors = read_tensors(source, plan, progress=progress)
    provenance = {
        "source_path": source.path,
        "source_tensorflow_version": source.source_tensorflow_version,
        "tensorflow_version": source.tensorflow_version,
        "extracted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extractor": "engine.tf.extract",
        "do_lower_case_source": source.do_lower_case_source or "default",
    }
    sources = {path: var.name for path, var in plan.mapping.items()}
    write_weights(out, c, tensors, sources=sources, vocab=source.vocab, vocab_source=source.vocab_source or "",
                  provenance=provenance, force=force, progress=progress)
    n_params = sum(int(a.size) for a in tensors.values())
    _log(f"wrote {out}: {len(tensors)} tensors, {n_params:,} parameters")
    return ExtractionResult(path=out, config=c, num_tensors=len(tensors), num_parameters=n_params,
                            warnings=plan.warnings)


def extractor_version() -> str:
    """A hash of the code that decides what an extracted file holds: this module and weights/format.py."""
    import hashlib
    h = hashlib.sha256()
    for path in (__file__, fmt.__file__):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def cached_extraction(savedmodel_dir: str, *, progress: bool = True) -> str:
    """The HDF5 extraction of `savedmodel_dir`, made once and kept under the reference cache
    (`engine.tf.reference.cache_dir()/extracted`), keyed by the SavedModel's path, the time of its
    saved_model.pb, the format version and the extractor's version (a hash of this module's source
    and of weights/format.py: a changed extractor never serves a stale file). A file lock makes
    concurrent callers wait for one extraction; the write is atomic, so an existing file is always
    complete."""
    import fcntl
    import hashlib

    from engine.tf.reference import cache_dir
    savedmodel_dir = os.path.normpath(os.path.abspath(savedmodel_dir))
    graph = os.path.join(savedmodel_dir, "saved_model.pb")
    stamp = os.path.getmtime(graph) if os.path.isfile(graph) else 0  # extract() names what is missing
    key = hashlib.sha256(f"{savedmodel_dir}|{stamp}|{fmt.FORMAT_VERSION}|{extractor_version()}".encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir(), "extracted")
    out = os.path.join(folder, f"{os.path.basename(savedmodel_dir)}-{key}.h5")
    if os.path.isfile(out):
        return out
    os.makedirs(folder, exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(out):
            extract(savedmodel_dir, out, force=True, progress=progress)
    return out


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.tf.extract", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m engine.tf.extract talkheads/ talkheads.h5",
        description="Extract a talking-heads GGELU BERT SavedModel (TF Hub talkheads_ggelu_bert_en_base) "
                    "into one HDF5 weight file.")
    parser.add_argument("savedmodel_dir", help="the SavedModel folder (with saved_model.pb)")
    parser.add_argument("out", help="the .h5 file to write (refused if it exists, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # clean up on SIGTERM too
    except ValueError:  # not the main thread
        pass
    try:
        extract(args.savedmodel_dir, args.out, force=args.force, progress=not args.quiet)
    except (ExtractionError, weights_write.WeightsWriteError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {os.path.abspath(args.out)} was not written or changed", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
