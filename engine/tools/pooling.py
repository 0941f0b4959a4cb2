"""Sentence embeddings from the encoder's outputs, as `encode` writes them: the pooled output, the
[CLS] row, or the mean over the real tokens, each optionally L2-normalized. Mean and normalize are
what sentence-transformers' Pooling (pooling_mode_mean_tokens) and Normalize modules compute.

    vectors = embed(enc, inputs, "mean_embedding", normalize=True)     # [B,H] NumPy

The encoder is run as it is (readable, fast or GPU path); pooling only reads its outputs.
"""

from __future__ import annotations

import numpy as np

from engine.core import backend as backend_mod

# The file config's `pooling` -> the name of what encode writes (the .h5 dataset, the .jsonl key).
OUTPUT_NAMES = {"pooled": "pooled_output", "cls": "cls_embedding", "mean": "mean_embedding"}
POOLINGS = {name: pooling for pooling, name in OUTPUT_NAMES.items()}
# sentence-transformers' floors: a row of padding alone has no token to average; a zero vector stays zero.
MIN_TOKENS = 1e-9
MIN_NORM = 1e-12


def mean_tokens(sequence_output: np.ndarray, input_mask: np.ndarray) -> np.ndarray:
    """The mean of sequence_output [B,S,H] over the positions where input_mask [B,S] is 1 -> [B,H]."""
    mask = np.asarray(input_mask, sequence_output.dtype)[:, :, None]                 # [B,S,1]
    total = (sequence_output * mask).sum(axis=1)                                    # [B,H]
    return total / np.maximum(mask.sum(axis=1), MIN_TOKENS)                         # / count [B,1]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Each row of [B,H] divided by its L2 norm (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)                         # [B,1]
    return vectors / np.maximum(norms, MIN_NORM)


def embed(enc, inputs: dict, name: str, skip_padding: bool = False, normalize: bool = False) -> np.ndarray:
    """The rows encode writes under `name` (a value of OUTPUT_NAMES, or "sequence_output"), as NumPy:
    pooled_output [B,H]; cls_embedding = sequence_output[:, 0] [B,H]; mean_embedding [B,H];
    sequence_output [B,S,H]. normalize (pooled rows only) divides each row by its L2 norm."""
    if name == "pooled_output":
        rows = backend_mod.to_numpy(enc(inputs, skip_padding=skip_padding, outputs=(name,))[name])
    else:
        rows = backend_mod.to_numpy(enc(inputs, skip_padding=skip_padding,
                                        outputs=("sequence_output",))["sequence_output"])  # [B,S,H]
        if name == "cls_embedding":
            rows = np.ascontiguousarray(rows[:, 0])
        elif name == "mean_embedding":
            rows = mean_tokens(rows, backend_mod.to_numpy(inputs["input_mask"]))
        elif name != "sequence_output":
            raise ValueError(f"{name!r}: expected sequence_output or one of {list(POOLINGS)}")
    return l2_normalize(rows) if normalize and name != "sequence_output" else rows
