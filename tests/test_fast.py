"""The fast path (engine/fast/forward.py) held to the readable one (engine/core/kernels.py + engine/core/model.py) and to TF.

- fast vs readable, tiny and base reference models: every output within 1e-5 x max|readable|;
- skip_padding=True vs the readable path on the real tokens (input_mask == 1) of every
  encoder output, pooled_output of rows whose position 0 is real, and mlm_logits; padded
  positions hold zeros;
- fast (dense and skip_padding) vs TensorFlow running the tiny SavedModel, at the parity
  tolerance of tests/test_parity.py.
"""

import numpy as np
import pytest

import engine
from engine.tools import parity

RTOL = parity.DEFAULT_RTOL  # pooled_output: parity.POOLED_RTOL, as in tests/test_parity.py

CASES = [
    dict(batch=1, seq_length=1),
    dict(batch=1, seq_length=128, padding=False),
    dict(batch=4, seq_length=33, all_padding_row=True),
    dict(batch=3, seq_length=77),
    dict(batch=8, seq_length=64),
    dict(batch=2, seq_length=512),
]
BASE_CASES = [
    dict(batch=3, seq_length=40, all_padding_row=True),
    dict(batch=8, seq_length=128, padding=False),
    dict(batch=4, seq_length=128),
]


def _inputs(cfg, case, seed):
    rng = np.random.default_rng(seed)
    return parity.random_inputs(rng, case["batch"], case["seq_length"], cfg.vocab_size,
                                padding=case.get("padding", True),
                                all_padding_row=case.get("all_padding_row", False), num_positions=5)


def _real_token_differences(ours, theirs, mask, positions=None):
    """Differences on real tokens only: encoder outputs at mask==1, pooled of rows with mask[:,0]==1,
    and mlm_logits at positions that are real tokens."""
    real = mask.astype(bool)
    first = real[:, 0]
    diffs = []
    for i, (a, b) in enumerate(zip(ours["encoder_outputs"], theirs["encoder_outputs"])):
        diffs.append(_diff(f"encoder_outputs[{i}]", a[real], b[real]))
    diffs.append(_diff("sequence_output", ours["sequence_output"][real], theirs["sequence_output"][real]))
    diffs.append(_diff("pooled_output", ours["pooled_output"][first], theirs["pooled_output"][first]))
    if "mlm_logits" in theirs:
        b_idx = np.arange(mask.shape[0])[:, None].repeat(positions.shape[1], 1)
        ok = real[b_idx, positions]
        diffs.append(_diff("mlm_logits", ours["mlm_logits"][ok], theirs["mlm_logits"][ok]))
    return diffs


def _diff(name, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return parity.Difference(name, float(np.abs(a - b).max()) if a.size else 0.0,
                             float(np.abs(b).max()) if b.size else 0.0, RTOL)


def _check(fast, ref, cfg, case, seed):
    inputs = _inputs(cfg, case, seed)
    want = engine.to_numpy(ref.mlm(inputs))
    got = engine.to_numpy(fast.mlm(inputs))
    diffs = parity.compare(got, want, RTOL, pooled_rtol=parity.POOLED_RTOL)
    print(f"\nfast vs readable {case}:\n" + parity.format_table(diffs))
    assert all(d.ok for d in diffs), [d.as_dict() for d in diffs if not d.ok]
    skipped = engine.to_numpy(fast.mlm(inputs, skip_padding=True))
    diffs = _real_token_differences(skipped, want, inputs["input_mask"], inputs["masked_lm_positions"])
    print("skip_padding vs readable, real tokens:\n" + parity.format_table(diffs))
    assert all(d.ok for d in diffs), [d.as_dict() for d in diffs if not d.ok]
    pad = ~inputs["input_mask"].astype(bool)
    for out in skipped["encoder_outputs"]:
        assert np.all(out[pad] == 0)
    # the root call agrees with the .mlm call
    enc_inputs = {k: v for k, v in inputs.items() if k != "masked_lm_positions"}
    root = engine.to_numpy(fast(enc_inputs))
    np.testing.assert_array_equal(root["sequence_output"], got["sequence_output"])
    np.testing.assert_array_equal(root["default"], root["pooled_output"])


@pytest.fixture(scope="module")
def tiny_pair(tiny_h5):
    return engine.load(tiny_h5, fast=True), engine.load(tiny_h5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['batch']}xS{c['seq_length']}")
def test_tiny_fast_matches_readable(tiny_pair, case):
    fast, ref = tiny_pair
    _check(fast, ref, ref.config, case, seed=case["seq_length"])


@pytest.mark.slow
def test_base_fast_matches_readable(base_h5):
    fast, ref = engine.load(base_h5, fast=True), engine.load(base_h5)
    for i, case in enumerate(BASE_CASES):
        _check(fast, ref, ref.config, case, seed=200 + i)


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: f"B{c['batch']}xS{c['seq_length']}")
def test_tiny_fast_matches_tensorflow(tf_tiny, tiny_pair, case):
    tf = pytest.importorskip("tensorflow")
    fast, _ = tiny_pair
    inputs = _inputs(fast.config, case, seed=1000 + case["seq_length"])
    out = tf_tiny.mlm({k: tf.constant(v) for k, v in inputs.items()})
    theirs = {k: ([t.numpy() for t in v] if isinstance(v, list) else v.numpy()) for k, v in out.items()}
    diffs = parity.compare(engine.to_numpy(fast.mlm(inputs)), theirs, RTOL, pooled_rtol=parity.POOLED_RTOL)
    print(f"\nfast vs TF {case}:\n" + parity.format_table(diffs))
    assert all(d.ok for d in diffs), [d.as_dict() for d in diffs if not d.ok]
    diffs = _real_token_differences(engine.to_numpy(fast.mlm(inputs, skip_padding=True)), theirs,
                                    inputs["input_mask"], inputs["masked_lm_positions"])
    print("skip_padding vs TF, real tokens:\n" + parity.format_table(diffs))
    assert all(d.ok for d in diffs), [d.as_dict() for d in diffs if not d.ok]


def test_skip_padding_needs_fast(tiny_h5):
    enc = engine.load(tiny_h5)
    inputs = _inputs(enc.config, dict(batch=2, seq_length=8), seed=0)
    inputs.pop("masked_lm_positions")
    with pytest.raises(ValueError, match="fast"):
        enc(inputs, skip_padding=True)


def test_fast_shares_weights_and_keeps_readable_path(tiny_h5):
    """The fast encoder holds no second copy of the fused kernels; its readable path (used by
    mlm(record=...)) still gives the readable results."""
    fast, ref = engine.load(tiny_h5, fast=True), engine.load(tiny_h5)
    a = fast.blocks[0].attention
    assert np.shares_memory(a.query_kernel, fast.fast_forward.blocks[0].qkv_kernel)
    assert np.shares_memory(fast.blocks[0].feedforward.gate_kernel, fast.fast_forward.blocks[0].ff_kernel)
    inputs = _inputs(ref.config, dict(batch=2, seq_length=16), seed=3)
    rec = []
    via_readable = engine.to_numpy(fast.mlm(inputs, record=lambda n, v: rec.append(n)))
    want = engine.to_numpy(ref.mlm(inputs))
    assert rec
    diffs = parity.compare(via_readable, want, RTOL, pooled_rtol=parity.POOLED_RTOL)
    assert all(d.ok for d in diffs)


def test_fast_numpy_only(tiny_h5):
    """Refused for what it is (the fast path is NumPy's), before CuPy is looked for: this holds on
    machines with and without CuPy (a BackendError for missing CuPy would not satisfy it)."""
    import weights
    loaded = weights.load(tiny_h5)
    with pytest.raises(ValueError, match="fast=True is the NumPy CPU path"):
        engine.Encoder(loaded.config, loaded.tensors, backend="cupy", fast=True)
