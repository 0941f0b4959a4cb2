"""A weights file back to a TF Hub SavedModel: a model trained with the engine goes back to TensorFlow.

    python -m engine export-savedmodel --weights trained.h5 --output DIR

Built with Model Garden's own classes and export code, as the reference models are
(engine/tf/reference.py: export_tfhub_lib, for the file's family), every variable then set from
the HDF5 file: the variables are matched to datasets by the extractor's own rules
(weights.tf_names.match_variables), so export and extraction are each other's inverse (tested:
extracting the export gives the file's tensors and config bit for bit, and `verify` PASSes). The
SavedModel has the Hub signatures: the encoder dict, and `.mlm` when the file has the MLM head. The
vocab goes in as the model's asset; do_lower_case as the file says.

A family goes out through the Model Garden encoder whose layout holds it (weights.tf_names.LAYOUTS):
talking_heads + geglu through EncoderScaffold of TransformerScaffold(TalkingHeadsAttention,
GatedFeedforward), multi_head + dense through BertEncoder, either with the tanh GELU (Model Garden's
"gelu") or the exact one (Keras' gelu), in the blocks and the MLM transform alike. A file of another
family (talking_heads + dense, multi_head + geglu), or with a LayerNorm epsilon or a mask constant
other than Model Garden's fixed ones, is refused (ExportError, one line).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

import weights
from weights import format as fmt
from weights.tf_names import STANDARD_BERT, ExtractionError, SourceModel, SourceVariable, layout_of, match_variables
from engine.tf import extract
from engine.tf import reference


class ExportError(ExtractionError):
    """The file holds a model that no Model Garden encoder expresses: a layout error, the other way
    round (the command line reports it in one line, as it does an ExtractionError)."""


def reference_family(config: fmt.ModelConfig, where: str = "export") -> str:
    """engine.tf.reference's family of a config (talking_heads or bert); ExportError, one line, for a
    model Model Garden's encoders cannot express."""
    layout = layout_of(config)
    if layout is None:
        raise ExportError(f"{where}: the {config.attention} + {config.feed_forward} family has no Model Garden "
                          "encoder (talking_heads + geglu: EncoderScaffold with TalkingHeadsAttention and "
                          "GatedFeedforward; multi_head + dense: BertEncoder)")
    fixed = fmt.ModelConfig(**{**config.to_attrs(), "layer_norm_epsilon": 1e-12, "attention_mask_constant": -1e9})
    if config != fixed:
        raise ExportError(f"{where}: layer_norm_epsilon {config.layer_norm_epsilon:g} and attention_mask_constant "
                          f"{config.attention_mask_constant:g}: Model Garden's encoders fix them at 1e-12 and -1e9")
    return "bert" if layout is STANDARD_BERT else "talking_heads"


def export_savedmodel(weights_path: str, out_dir: str, force: bool = False) -> str:
    import shutil

    loaded = weights.load(weights_path)
    c = loaded.config
    family = reference_family(c, f"export: {weights_path}")  # before the slow imports
    if loaded.vocab is None:
        raise ValueError(f"{weights_path}: has no vocab, which the SavedModel needs as its asset")
    out = os.path.abspath(out_dir)
    if os.path.exists(out):
        if not force:
            raise FileExistsError(f"{out} exists; pass --force to replace it")

    import tensorflow as tf
    import tf_keras
    from official.nlp.tools import export_tfhub_lib
    cfg = reference.ReferenceConfig(layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads,
                                    intermediate=c.intermediate_size, vocab=c.vocab_size,
                                    positions=c.max_position_embeddings, type_vocab=c.type_vocab_size)
    encoder_config = reference.encoder_config(cfg, c.hidden_activation)
    tf.get_logger().setLevel("ERROR")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with reference.family_scope(family), tempfile.TemporaryDirectory(prefix="export-", dir=parent) as tmp:
        tf_keras.backend.clear_session()
        _, pretrainer = export_tfhub_lib._create_model(encoder_config=encoder_config, with_mlm=True)
        floats = [v for v in pretrainer.variables if v.dtype.is_floating]
        source = SourceModel(
            path="(export)", variables=[SourceVariable(v.name, tuple(int(d) for d in v.shape), v.dtype.name, v.numpy)
                                        for v in floats],
            other_variables=[], has_mlm_object=True, do_lower_case=c.do_lower_case, do_lower_case_source=None,
            vocab=None, vocab_source=None)
        plan = match_variables(source)
        by_name = {v.name: v for v in floats}
        for path, var in plan.mapping.items():
            if path in loaded.tensors:
                by_name[var.name].assign(loaded.tensors[path])
            elif path not in fmt.MLM_TENSORS:
                raise ValueError(f"export: {path} has no dataset in {weights_path}")
        vocab_file = os.path.join(tmp, "vocab.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            f.write("\n".join(loaded.vocab) + "\n")
        checkpoint = tf.train.Checkpoint(**pretrainer.checkpoint_items).save(os.path.join(tmp, "ckpt"))
        del pretrainer
        tf_keras.backend.clear_session()
        staging = os.path.join(tmp, "savedmodel")
        export_tfhub_lib.export_model(staging, encoder_config=encoder_config, model_checkpoint_path=checkpoint,
                                      with_mlm=c.has_mlm, vocab_file=vocab_file, do_lower_case=c.do_lower_case)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    return out


# The config fields a SavedModel holds (the others are the engine's own `encode` settings).
_ROUNDTRIP_FIELDS = ("num_layers", "hidden_size", "num_heads", "head_size", "intermediate_size", "vocab_size",
                     "max_position_embeddings", "type_vocab_size", "hidden_activation", "layer_norm_epsilon",
                     "attention_mask_constant", "do_lower_case", "has_mlm", "attention", "feed_forward")


def check_roundtrip(weights_path: str, savedmodel_dir: str) -> list[str]:
    """The datasets whose extraction from the export differs from the file, and the config fields
    ("config: <field> ...") (empty: the same model, bit for bit)."""
    loaded = weights.load(weights_path)
    source = extract.read_savedmodel(savedmodel_dir)
    plan = match_variables(source)
    differing = [f"config: {name} {getattr(loaded.config, name)!r} -> {getattr(plan.config, name)!r}"
                 for name in _ROUNDTRIP_FIELDS if getattr(loaded.config, name) != getattr(plan.config, name)]
    return differing + [p for p, var in plan.mapping.items() if not np.array_equal(var.read(), loaded.tensors.get(p))]
