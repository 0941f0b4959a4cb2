"""Checks the Hub-style input dict before any arithmetic: one clear error, never a crash deep inside NumPy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ENCODER_KEYS = ("input_word_ids", "input_mask", "input_type_ids")
MLM_KEYS = ENCODER_KEYS + ("masked_lm_positions",)


class InputError(ValueError):
    """An input of the model is malformed; the message names the input and the problem."""


def _as_int_array(name, value):
    if hasattr(value, "get") and type(value).__module__.startswith("cupy"):
        value = value.get()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise InputError(f"{name}: cannot be read as a rectangular integer array ({e})") from None
    if array.dtype == object:
        flat = array.ravel().tolist()
        if array.ndim and flat and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in flat):
            # Python ints NumPy could not fit in int64/uint64: far outside any valid range
            huge = [int(v) for v in flat if not -2**63 <= int(v) < 2**63]
            if huge:
                raise InputError(f"{name}: values outside the int64 range, found {huge[:5]}")
            array = array.astype(np.int64)
        else:
            raise InputError(f"{name}: cannot be read as a rectangular integer array (ragged or mixed types)")
    if array.dtype.kind == "b":
        raise InputError(f"{name}: dtype bool is not accepted, expected integers (int32 like the Hub model)")
    if array.dtype.kind not in "iu":
        if array.size == 0 and array.dtype.kind == "f":  # np.asarray([]) is float64
            array = array.astype(np.int32)
        else:
            raise InputError(f"{name}: dtype {array.dtype} is not accepted, expected integers "
                             f"(int32 like the Hub model)")
    if array.ndim != 2:
        raise InputError(f"{name}: expected a 2-D array [batch, length], got shape {array.shape}")
    return array


def _check_range(name, array, low, high, what):
    if array.size and (array.min() < low or array.max() >= high):
        bad = array[(array < low) | (array >= high)]
        raise InputError(f"{name}: values must be in [{low}, {high}) ({what}), found {bad.ravel()[:5].tolist()}")


def validate(inputs, config, with_positions: bool = False):
    """Returns (word_ids, mask, type_ids, positions or None) as NumPy int64 arrays, or raises InputError."""
    if not isinstance(inputs, Mapping):
        raise InputError(f"inputs: expected a dict with keys {', '.join(ENCODER_KEYS)}, got {type(inputs).__name__}")
    expected = MLM_KEYS if with_positions else ENCODER_KEYS
    missing = [k for k in expected if k not in inputs]
    extra = [k for k in inputs if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if extra:
            parts.append("unexpected " + ", ".join(map(str, extra)))
        raise InputError(f"inputs: {'; '.join(parts)} (expected exactly {', '.join(expected)})")
    arrays = {k: _as_int_array(k, inputs[k]) for k in expected}
    ids = arrays["input_word_ids"]
    B, S = ids.shape
    for k in ("input_mask", "input_type_ids"):
        if arrays[k].shape != ids.shape:
            raise InputError(f"{k}: shape {arrays[k].shape} differs from input_word_ids {ids.shape}")
    if B == 0:
        raise InputError(f"input_word_ids: the batch is empty (shape {ids.shape})")
    if S == 0:
        raise InputError(f"input_word_ids: sequence length is 0 (shape {ids.shape}); at least [CLS] is needed")
    if S > config.max_position_embeddings:
        raise InputError(f"input_word_ids: sequence length {S} exceeds the model's "
                         f"{config.max_position_embeddings} positions")
    _check_range("input_word_ids", ids, 0, config.vocab_size, "vocab ids")
    _check_range("input_type_ids", arrays["input_type_ids"], 0, config.type_vocab_size, "token types")
    mask = arrays["input_mask"]
    if mask.size and not np.isin(mask, (0, 1)).all():
        raise InputError(f"input_mask: values must be 0 or 1, found {np.unique(mask[(mask != 0) & (mask != 1)])[:5].tolist()}")
    positions = None
    if with_positions:
        positions = arrays["masked_lm_positions"]
        if positions.shape[0] != B:
            raise InputError(f"masked_lm_positions: batch {positions.shape[0]} differs from input_word_ids batch {B}")
        _check_range("masked_lm_positions", positions, 0, S, "positions in the sequence")
        positions = positions.astype(np.int64)
    return (ids.astype(np.int64), mask.astype(np.int64), arrays["input_type_ids"].astype(np.int64), positions)
