"""SavedModel -> HDF5: extracts TF Hub's talkheads_ggelu_bert_en_base (or a reference model) once.

    python -m engine.tf.extract SAVEDMODEL_DIR --output OUT.h5 [--force]

Reads the SavedModel with `tf.saved_model.load`: the root's `.variables` (the encoder), `.mlm.variables`
(the encoder's variables again plus the masked-LM head), the non-float `do_lower_case` variable and
the `vocab.txt` asset, and the activations its Keras metadata records (read_activations), and
writes one self-describing HDF5 file in the layout of `weights.format`. A talking-heads GGELU BERT
(EncoderScaffold) gives a talking_heads + geglu file, a standard BERT (BertEncoder) a multi_head +
dense one (weights.tf_names.LAYOUTS).

Three steps, of which only the first needs TensorFlow:
- read_savedmodel (here): the variables' names, shapes and lazy values, do_lower_case, the vocab;
- weights.tf_names.match_variables: the variables matched to the datasets by the table of TF names
  of their layout, the config inferred from the shapes and the recorded activation; one
  `ExtractionError` lists everything missing,
  unexpected or mis-shaped. A SavedModel without `.mlm` extracts as an encoder-only file (has_mlm
  false, no `/mlm` group), with a warning;
- weights.write.write_weights: the atomic write (a temporary file in the output's folder, fsync,
  then a rename). An interrupted extraction leaves no half file at OUT.h5 (a SIGKILL can leave a
  hidden `.OUT.h5.extract-PID-*.tmp`, removed by the next extraction to the same output), and an
  existing OUT.h5 is only replaced with --force.

`cached_extraction` keeps one extraction per SavedModel under the reference cache
(engine.tools.cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import signal
import sys

import numpy as np

from weights import format as fmt
from weights import tf_names
from weights import write as weights_write
from weights.tf_names import ExtractionError, Plan, Problems, SourceModel, SourceVariable, match_variables
from weights.write import check_output_path
from engine.tools import cache
from engine.tools.progress import Progress

__all__ = ["ExtractionError", "ExtractionResult", "SourceModel", "SourceVariable", "Plan", "match_variables",
           "read_savedmodel", "read_activations", "read_tensors", "extract", "extractor_version", "cached_extraction", "main"]


@dataclasses.dataclass
class ExtractionResult:
    path: str
    config: fmt.ModelConfig
    num_tensors: int
    num_parameters: int
    warnings: list[str]


def _log(message: str, stream=None) -> None:
    print(f"extract: {message}", file=stream or sys.stderr, flush=True)


class _NullStream:
    def write(self, _):
        pass

    def flush(self):
        pass

    def isatty(self):
        return False


def _progress(total: int, label: str, progress: bool) -> Progress:
    return Progress(total, label, live=None if progress else False, stream=sys.stderr if progress else _NullStream())


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
        source_tensorflow_version=source_version if isinstance(source_version, str) else "",
        activations=read_activations(path))


# The Keras layers whose config names the feed-forward's activation, by class (package prefix
# dropped) and key: the block layers of BertEncoder, of older Model Garden and of EncoderScaffold.
_FEEDFORWARD_KEYS = {
    "Activation": ("activation",),      # the block's own activation layer, in every Model Garden block
    "TransformerEncoderBlock": ("inner_activation",),
    "Transformer": ("intermediate_activation", "inner_activation"),
    "TransformerScaffold": ("inner_activation", "intermediate_activation"),
    "GatedFeedforward": ("inner_activation", "intermediate_activation"),
}


def _keras_metadata(path: str) -> list[str]:
    """The Keras metadata of every object (JSON strings): keras_metadata.pb where Keras wrote one,
    else the SavedModel's object graph, where Keras kept it before that file existed."""
    from tensorflow.core.protobuf import saved_model_pb2
    meta_file = os.path.join(path, "keras_metadata.pb")
    if os.path.isfile(meta_file):
        try:
            from tf_keras.protobuf import saved_metadata_pb2
        except ImportError:
            saved_metadata_pb2 = None
        if saved_metadata_pb2 is not None:
            meta = saved_metadata_pb2.SavedMetadata()
            with open(meta_file, "rb") as f:
                meta.ParseFromString(f.read())
            return [node.metadata for node in meta.nodes]
    graph = os.path.join(path, "saved_model.pb")
    if not os.path.isfile(graph):
        return []
    saved = saved_model_pb2.SavedModel()
    with open(graph, "rb") as f:
        saved.ParseFromString(f.read())
    return [node.user_object.metadata for meta_graph in saved.meta_graphs
            for node in meta_graph.object_graph_def.nodes
            if node.WhichOneof("kind") == "user_object" and node.user_object.metadata]


def _activation_name(value) -> str | None:
    """An activation as tf_keras.activations.serialize names it: a string ("Text>gelu"), or in
    Keras' newer format a dict whose config is that string."""
    if isinstance(value, dict):
        value = value.get("config") if isinstance(value.get("config"), str) else value.get("registered_name")
    return value if isinstance(value, str) and value else None


def read_activations(path: str) -> dict[str, list[str]]:
    """{"feedforward": [...], "mlm": [...]}: the activations the SavedModel's Keras metadata records
    for the blocks' feed-forward and for the MLM transform (the Dense `transform/dense` of
    MaskedLM, or BertPretrainerV2's mlm_activation), as Keras names them; empty without metadata."""
    found = {"feedforward": [], "mlm": []}
    for text in _keras_metadata(path):
        try:
            meta = json.loads(text)
        except ValueError:
            continue
        config = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(config, dict):
            continue
        kind = str(meta.get("class_name", "")).split(">")[-1]
        values = [config.get(key) for key in _FEEDFORWARD_KEYS.get(kind, ()) if key in config]
        found["feedforward"] += [name for name in map(_activation_name, values) if name]
        if kind == "Dense" and config.get("name") == "transform/dense":
            found["mlm"] += [name for name in [_activation_name(config.get("activation"))] if name]
        elif "mlm_activation" in config:
            found["mlm"] += [name for name in [_activation_name(config["mlm_activation"])] if name]
    return found


def read_tensors(source: SourceModel, plan: Plan, *, progress: bool = True) -> dict[str, np.ndarray]:
    """Reads every matched variable as a float32 C-contiguous array; refuses non-finite values."""
    problems = Problems()
    total = sum(int(np.prod(v.shape)) * 4 for v in plan.mapping.values())
    tensors = {}
    with _progress(total, "extract: reading", progress) as bar:
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


def extract(savedmodel_dir: str, out_path: str, *, force: bool = False, progress: bool = True) -> ExtractionResult:
    """Extracts a SavedModel to an HDF5 file. Raises ExtractionError, weights.write.WeightsWriteError
    (an output path that cannot be written) or FileExistsError."""
    out = check_output_path(out_path, force)  # fail before the slow TensorFlow load
    _log(f"loading {os.path.abspath(savedmodel_dir)}")
    source = read_savedmodel(savedmodel_dir)
    plan = match_variables(source)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    c = plan.config
    _log(f"matched {len(plan.mapping)} tensors ({c.family}): L={c.num_layers} H={c.hidden_size} N={c.num_heads} "
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
    with _progress(sum(a.nbytes for a in tensors.values()), "extract: writing", progress) as bar:
        weights_write.write_weights(out, c, tensors, sources=sources, vocab=source.vocab,
                                    vocab_source=source.vocab_source or "", provenance=provenance, force=force,
                                    on_progress=bar.update)
    n_params = sum(int(a.size) for a in tensors.values())
    _log(f"wrote {out}: {len(tensors)} tensors, {n_params:,} parameters")
    return ExtractionResult(path=out, config=c, num_tensors=len(tensors), num_parameters=n_params,
                            warnings=plan.warnings)


def extractor_version() -> str:
    """A hash of the code that decides what an extracted file holds: this module, the name table and
    matching (weights/tf_names.py), the format (weights/format.py) and the writer (weights/write.py)."""
    h = hashlib.sha256()
    for path in (__file__, tf_names.__file__, fmt.__file__, weights_write.__file__):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def cached_extraction(savedmodel_dir: str, *, progress: bool = True) -> str:
    """The HDF5 extraction of `savedmodel_dir`, made once and kept under the cache
    (`engine.tools.cache.cache_dir()/extracted`), keyed by the SavedModel's path, the time of its
    saved_model.pb, the format version and the extractor's version (a hash of the code that decides
    the file's content: a changed extractor never serves a stale file). Concurrent callers wait for
    one extraction; the write is atomic, so an existing file is always complete."""
    savedmodel_dir = os.path.normpath(os.path.abspath(savedmodel_dir))
    graph = os.path.join(savedmodel_dir, "saved_model.pb")
    stamp = os.path.getmtime(graph) if os.path.isfile(graph) else 0  # extract() names what is missing
    key = hashlib.sha256(f"{savedmodel_dir}|{stamp}|{fmt.FORMAT_VERSION}|{extractor_version()}".encode()).hexdigest()[:16]
    return cache.cached_file("extracted", f"{os.path.basename(savedmodel_dir)}-{key}.h5",
                             lambda out: extract(savedmodel_dir, out, force=True, progress=progress))


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.tf.extract", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m engine.tf.extract talkheads/ --output talkheads.h5",
        description="Extract a TF Hub BERT SavedModel, talking-heads GGELU (talkheads_ggelu_bert_en_base) or "
                    "standard (bert_en_uncased_L-12_H-768_A-12, the small BERTs), into one HDF5 weight file.")
    parser.add_argument("savedmodel_dir", help="the SavedModel folder (with saved_model.pb)")
    parser.add_argument("--output", required=True, dest="out",
                        help="the .h5 file to write (refused if it exists, unless --force)")
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
