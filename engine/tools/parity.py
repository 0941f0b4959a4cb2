"""Parity between the engine and a reference (TensorFlow running the SavedModel): inputs and figures.

Pure NumPy: the caller runs the reference and hands its outputs in, so this module never needs
TensorFlow. Used by the test suite and by `python -m engine verify`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_RTOL = 1e-5   # the plain fixed tolerance: max|engine - TF| <= 1e-5 x max|TF|, per output
# (`verify --rtol`); the default verdict is engine.tools.verdict's, judged against float32 noise.
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


@dataclasses.dataclass
class Difference:
    name: str
    max_abs: float       # max |engine - reference|
    max_ref: float       # max |reference|
    rtol: float

    @property
    def relative(self) -> float:
        return self.max_abs / self.max_ref if self.max_ref else float(self.max_abs > 0) * np.inf

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.rtol * self.max_ref

    def as_dict(self) -> dict:
        return {"output": self.name, "max_abs_diff": self.max_abs, "max_abs_reference": self.max_ref,
                "relative_diff": self.relative, "tolerance": self.rtol, "ok": self.ok}


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


def compare(engine_outputs: dict, reference_outputs: dict, rtol: float = DEFAULT_RTOL,
            pooled_rtol: float | None = None) -> list[Difference]:
    """Per output: max |engine - reference| against rtol x max |reference| (pooled_rtol for the
    pooled output, when given). Shapes must agree."""
    ours, theirs = flatten_outputs(engine_outputs), flatten_outputs(reference_outputs)
    if set(ours) != set(theirs):
        raise ValueError(f"outputs differ: engine has {sorted(set(ours) - set(theirs))}, "
                         f"reference has {sorted(set(theirs) - set(ours))}")
    result = []
    for name in theirs:
        a, b = ours[name], theirs[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: engine shape {a.shape} != reference shape {b.shape}")
        diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
        if not np.all(np.isfinite(a)):
            diff = float("nan")
        tol = pooled_rtol if pooled_rtol is not None and name in POOLED_OUTPUTS else rtol
        result.append(Difference(name, diff, float(np.abs(b).max()) if b.size else 0.0, tol))
    return result


def format_table(differences: list[Difference]) -> str:
    """A fixed-width table of the figures, one output per line."""
    lines = [f"{'output':<22} {'max|diff|':>11} {'max|ref|':>11} {'relative':>10} {'tolerance':>10}  ok"]
    for d in differences:
        lines.append(f"{d.name:<22} {d.max_abs:>11.3e} {d.max_ref:>11.3e} {d.relative:>10.2e} "
                     f"{d.rtol:>10.0e}  {'yes' if d.ok else 'NO'}")
    return "\n".join(lines)
