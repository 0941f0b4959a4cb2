"""Test helpers: the engine against TensorFlow running a SavedModel, judged by engine.tools.verdict
(the engine's own float64 run on the same inputs as the truth)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import engine
from engine.tools import parity, verdict

_ENGINES = {}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):   # ValueError: a module set to None in sys.modules (blocked)
        return False


# For the tests of a module that also has TensorFlow-free tests (a module-level importorskip would skip those).
needs_tensorflow = pytest.mark.skipif(not _importable("tensorflow"), reason="needs TensorFlow (the `tf` extra)")


def engines(h5: str, backend: str = "numpy") -> dict:
    """{"readable": float32, "fast": float32 fast path (numpy only), "float64": the truth}, loaded once per file."""
    key = (h5, backend)
    if key not in _ENGINES:
        got = {"readable": engine.load(h5, backend=backend), "float64": engine.load(h5, backend=backend, dtype="float64")}
        if backend == "numpy":
            got["fast"] = engine.load(h5, fast=True)
        _ENGINES.clear()  # one model at a time: base-size engines are large
        _ENGINES[key] = got
    return _ENGINES[key]


def tf_outputs(savedmodel: str, inputs: dict, mlm: bool = True) -> dict:
    from engine.tf import reference
    return reference.run_savedmodel(savedmodel, inputs, mlm=mlm)


def _without_rows(flat: dict, keep) -> dict:
    return {k: v[keep] for k, v in flat.items()}


def judge(savedmodel: str, h5: str, inputs: dict, path: str = "readable", backend: str = "numpy",
          label: str = "", theirs: dict | None = None, padding_rows_apart: bool = False) -> list:
    """The verdict on every output of `.mlm(inputs)` (the root call's when there are no positions),
    printed as a table; `theirs`: TF's outputs when already computed.

    padding_rows_apart: rows whose keys are all padding are checked finite on every side and left
    out of the noise statistics. On trained-like weights the pre-softmax mix pushes logits past
    +-32, where s + -1e9 no longer rounds to -1e9 in float32 (its ulp there is 64): such a row's
    attention is then a step function of its logits, and any two float32 implementations (TF's
    included) may fall on different sides of a step, an O(1) difference in a row that holds no
    text. Measured on the base trained-like model: the readable path's 2-D GEMMs (same math, other
    roundings) moved that row's block-3 output by 5e-3 while every real row stayed at float32 noise."""
    mlm = "masked_lm_positions" in inputs
    encs = engines(h5, backend)
    call = (lambda e: e.mlm) if mlm else (lambda e: e)
    theirs = theirs if theirs is not None else tf_outputs(savedmodel, inputs, mlm=mlm)
    ours = parity.flatten_outputs(engine.to_numpy(call(encs[path])(inputs)))
    exact = parity.flatten_outputs(engine.to_numpy(call(encs["float64"])(inputs)))
    others = [parity.flatten_outputs(engine.to_numpy(call(encs[p])(inputs)))
              for p in ("readable", "fast") if p != path and p in encs]
    theirs = parity.flatten_outputs(theirs)
    if padding_rows_apart:
        real = np.asarray(inputs["input_mask"]).sum(axis=1) > 0
        for side in [ours, exact, theirs] + others:
            for name, value in side.items():
                assert np.all(np.isfinite(value[~real])), f"{label}: {name} is not finite on an all-padding row"
        ours, exact, theirs = (_without_rows(x, real) for x in (ours, exact, theirs))
        others = [_without_rows(o, real) for o in others]
    judgements = verdict.judge_all(ours, theirs, exact, others=others)
    print(f"\n{label} {path}:\n{verdict.format_table(judgements)}")
    return judgements


def assert_pass(judgements) -> None:
    bad = [f"{j.name}: {j.status} {j.detail}" for j in judgements if not j.ok]
    assert not bad, "\n".join(bad)


def random_inputs(cfg, case: dict, seed: int, num_positions: int | None = None) -> dict:
    """parity.random_inputs for a case dict (batch, seq_length, optional padding, all_padding_row,
    segment_pairs); min(S, 32) MLM positions per row unless given."""
    rng = np.random.default_rng(seed)
    S = case["seq_length"]
    return parity.random_inputs(rng, case["batch"], S, cfg.vocab_size, padding=case.get("padding", True),
                                all_padding_row=case.get("all_padding_row", False),
                                segment_pairs=case.get("segment_pairs", True),
                                num_positions=num_positions if num_positions is not None else min(S, 32))
