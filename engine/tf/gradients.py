"""TensorFlow's gradients of the SavedModel, the reference for the engine's backward pass
(engine/core/tape.py): tf.GradientTape over the loaded SavedModel's trainable variables, with
output_gradients, keyed by the HDF5 dataset paths of an extraction of the same SavedModel.

    outputs, grads = tf_vjp(savedmodel_dir, h5_path, inputs, cotangents)
"""

from __future__ import annotations

import h5py
import numpy as np

from engine.tf.reference import load_savedmodel

OUTPUT_ORDER = ("sequence_output", "pooled_output", "default", "encoder_outputs", "mlm_logits")


def variable_paths(h5_path: str) -> dict[str, str]:
    """{TF variable name: HDF5 dataset path}, from the datasets' `source` attributes."""
    names = {}
    with h5py.File(h5_path, "r") as f:
        def visit(path, obj):
            if isinstance(obj, h5py.Dataset) and obj.attrs.get("source"):
                source = obj.attrs["source"]
                names[source.decode() if isinstance(source, bytes) else str(source)] = path
        f.visititems(visit)
    return names


def load(savedmodel_dir: str):
    """The loaded SavedModel, once per process and path (engine.tf.reference.load_savedmodel)."""
    return load_savedmodel(savedmodel_dir)


def tf_vjp(savedmodel_dir: str, h5_path: str, inputs: dict, cotangents: dict):
    """(outputs, grads) from TensorFlow in float32: the outputs of model.mlm(inputs) (with
    masked_lm_positions) or model(inputs), and {HDF5 path: gradient} of sum(cotangent * output) over
    the outputs named in `cotangents`, for every trainable variable of the called object."""
    import tensorflow as tf
    model = load(savedmodel_dir)
    mlm = "masked_lm_positions" in inputs
    callee = model.mlm if mlm else model
    variables = list(callee.trainable_variables)
    tensors = {k: tf.constant(np.asarray(v, np.int32)) for k, v in inputs.items()}
    with tf.GradientTape() as tape:
        out = callee(tensors)
        targets, output_gradients = [], []
        for name in OUTPUT_ORDER:
            if name not in cotangents or cotangents[name] is None:
                continue
            if name == "encoder_outputs":
                for t, g in zip(out[name], cotangents[name]):
                    if g is not None:
                        targets.append(t)
                        output_gradients.append(tf.constant(np.asarray(g, np.float32)))
            else:
                targets.append(out[name])
                output_gradients.append(tf.constant(np.asarray(cotangents[name], np.float32)))
    grads = tape.gradient(targets, variables, output_gradients=output_gradients)
    paths = variable_paths(h5_path)
    result = {}
    for var, grad in zip(variables, grads):
        path = paths.get(var.name)
        if path is None:
            raise KeyError(f"{var.name}: no dataset of {h5_path} has it as its source")
        result[path] = np.zeros(var.shape, np.float32) if grad is None else tf.convert_to_tensor(grad).numpy()
    numpy_out = {k: ([t.numpy() for t in v] if isinstance(v, (list, tuple)) else v.numpy()) for k, v in out.items()}
    return numpy_out, result
