"""Parity between the engine and a reference (TensorFlow running the SavedModel): inputs and figures.

Pure NumPy: the caller runs the reference and hands its outputs in, so this module never needs
TensorFlow. Used by the test suite and by `python -m engine verify`.
"""

from __future__ import annotations

import numpy as np

from engine.tools import verdict

POOLED_OUTPUTS = ("pooled_output", "default")

CLS_ID, SEP_ID = 101, 102


def random_inputs(rng: np.random.Generator, batch: int, seq_length: int, vocab_size: int, *,
                  padding: bool = True, all_padding_row: bool = False, segment_pairs: bool = True,
                  num_positions: int = 0, type_vocab_size: int = 2) -> dict:
    """Hub-style int32 inputs with the structures that matter for parity.

    Row 0 is always full length; with `padding`, later rows have random real lengths (>= 1); with
    `all_padding_row`, the last row (when batch > 1) is all padding; with `segment_pairs`, rows
    carry a second segment of type id 1. MLM positions are random real positions, zero-padded.
    """
    B, S = batch, seq_length
    ids = rng.integers(1000, vocab_size, (B, S)).astype(np.int32)
    mask = np.zeros((B, S), np.int32)
    types = np.zeros((B, S), np.int32)
    lengths = np.full(B, S)
    if padding and B > 1:
        lengths[1:] = rng.integers(1, S + 1, B - 1)
    if all_padding_row and B > 1:
        lengths[-1] = 0
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = 0
        if n >= 1:
            ids[b, 0] = CLS_ID
            ids[b, n - 1] = SEP_ID if n > 1 else CLS_ID
        if segment_pairs and n >= 4 and type_vocab_size > 1:
            split = int(rng.integers(2, n - 1))
            ids[b, split - 1] = SEP_ID
            types[b, split:n] = 1
    inputs = {"input_word_ids": ids, "input_mask": mask, "input_type_ids": types}
    if num_positions:
        pos = np.zeros((B, num_positions), np.int32)
        for b, n in enumerate(lengths):
            k = int(rng.integers(0, num_positions + 1)) if b else num_positions  # rows 1.. are zero-padded
            if n > 0 and k:
                pos[b, :k] = rng.integers(0, n, k)
        inputs["masked_lm_positions"] = pos
    return inputs


def flatten_outputs(outputs: dict) -> dict:
    """{'encoder_outputs': [a, b], 'x': c} -> {'encoder_outputs[0]': a, 'encoder_outputs[1]': b, 'x': c}."""
    flat = {}
    for key in sorted(outputs):
        value = outputs[key]
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                flat[f"{key}[{i}]"] = np.asarray(v)
        else:
            flat[key] = np.asarray(value)
    return flat


def compare(engine_outputs: dict, reference_outputs: dict, rtol: float = verdict.DEFAULT_RTOL,
            pooled_rtol: float | None = None) -> list[verdict.Judgement]:
    """Per output, the verdict's fixed tolerance (`verify --rtol`): max |engine - reference| <= rtol x
    max |reference| (pooled_rtol for the pooled output, when given). The outputs and their shapes
    must agree (ValueError). The default verdict is the noise rule (verdict.judge_all)."""
    ours, theirs = flatten_outputs(engine_outputs), flatten_outputs(reference_outputs)
    if set(ours) != set(theirs):
        raise ValueError(f"outputs differ: engine has {sorted(set(ours) - set(theirs))}, "
                         f"reference has {sorted(set(theirs) - set(ours))}")
    for name in theirs:
        if ours[name].shape != theirs[name].shape:
            raise ValueError(f"{name}: engine shape {ours[name].shape} != reference shape {theirs[name].shape}")
    return [verdict.judge_tolerance(name, ours[name], theirs[name],
                                    pooled_rtol if pooled_rtol is not None and name in POOLED_OUTPUTS else rtol)
            for name in theirs]
