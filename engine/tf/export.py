"""A weights file back to a TF Hub SavedModel: a model trained with the engine goes back to TensorFlow.

    python -m engine export-savedmodel --weights trained.h5 --output DIR

Built with Model Garden's own classes and export code, as the reference models are
(engine/tf/reference.py: export_tfhub_lib with the talking-heads GEGLU bindings), every variable
then set from the HDF5 file: the variables are matched to datasets by the extractor's own rules
(weights.tf_names.match_variables), so export and extraction are each other's inverse (tested:
extracting the export gives the file's tensors bit for bit, and `verify` PASSes). The SavedModel
has the Hub signatures: the encoder dict, and `.mlm` when the file has the MLM head. The vocab
goes in as the model's asset; do_lower_case as the file says.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

import weights
from weights import format as fmt
from weights.tf_names import SourceModel, SourceVariable, match_variables
from engine.tf import extract
from engine.tf import reference


def export_savedmodel(weights_path: str, out_dir: str, force: bool = False) -> str:
    import shutil

    import tensorflow as tf
    import tf_keras
    from official.nlp.tools import export_tfhub_lib

    loaded = weights.load(weights_path)
    if loaded.vocab is None:
        raise ValueError(f"{weights_path}: has no vocab, which the SavedModel needs as its asset")
    out = os.path.abspath(out_dir)
    if os.path.exists(out):
        if not force:
            raise FileExistsError(f"{out} exists; pass --force to replace it")
    c = loaded.config
    cfg = reference.ReferenceConfig(layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads,
                                    intermediate=c.intermediate_size, vocab=c.vocab_size,
                                    positions=c.max_position_embeddings, type_vocab=c.type_vocab_size)
    encoder_config = reference.encoder_config(cfg)
    tf.get_logger().setLevel("ERROR")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with reference.talking_heads_gin_bindings(), tempfile.TemporaryDirectory(prefix="export-", dir=parent) as tmp:
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


def check_roundtrip(weights_path: str, savedmodel_dir: str) -> list[str]:
    """The datasets whose extraction from the export differs from the file (empty: the same bits)."""
    loaded = weights.load(weights_path)
    source = extract.read_savedmodel(savedmodel_dir)
    plan = match_variables(source)
    return [p for p, var in plan.mapping.items() if not np.array_equal(var.read(), loaded.tensors.get(p))]
