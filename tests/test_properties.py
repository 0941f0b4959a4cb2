"""Property tests (hypothesis) over random small configurations and inputs.

Each example builds `engine.Encoder(config, tensors)` from random tensors shaped by
weights.format.expected_shapes, then checks: the fast path (engine/fast/forward.py) agrees with the readable
path within 1e-5 relative; float32 agrees with float64 within a loose bound; permuting the batch
permutes the outputs; appending padded positions leaves the real tokens' outputs unchanged within
the parity tolerance 1e-5 x max|out|; every output is finite. Derandomized, so CI sees the same
examples every run.
"""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from weights.format import ModelConfig, expected_shapes

RTOL = 1e-5
POOLED_RTOL = RTOL   # tiny random configs: pooled_output needs no more (a looser 2e-5 is a base-size figure)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def model_and_inputs(draw, min_heads=1, min_head_size=1, min_intermediate=1):
    heads, head_size = draw(st.integers(min_heads, 4)), draw(st.integers(min_head_size, 8))
    config = ModelConfig(num_layers=draw(st.integers(1, 2)), hidden_size=heads * head_size, num_heads=heads,
                         head_size=head_size, intermediate_size=draw(st.integers(min_intermediate, 32)),
                         vocab_size=draw(st.integers(5, 50)), max_position_embeddings=draw(st.integers(4, 16)),
                         type_vocab_size=draw(st.integers(1, 3)), has_mlm=draw(st.booleans()))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.02, 0.2, 1.0]))
    tensors = {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in expected_shapes(config).items()}
    for k in tensors:                       # layer norm gammas around 1, as trained models have them
        if k.endswith("gamma"):
            tensors[k] += 1
    B = draw(st.integers(1, 4))
    S = draw(st.integers(1, config.max_position_embeddings - 1))   # room to pad one more
    lengths = [draw(st.integers(0 if b else 1, S)) for b in range(B)]  # row 0 real; others may be all padding
    ids = rng.integers(0, config.vocab_size, (B, S)).astype(np.int32)
    mask = (np.arange(S)[None] < np.array(lengths)[:, None]).astype(np.int32)
    types = rng.integers(0, config.type_vocab_size, (B, S)).astype(np.int32)
    positions = rng.integers(0, S, (B, draw(st.integers(1, 3)))).astype(np.int32)
    return config, tensors, {"input_word_ids": ids, "input_mask": mask, "input_type_ids": types}, positions


def _max(*arrays):
    return max(float(np.abs(a).max()) for a in arrays) or 1.0


def _close(a, b, rtol=RTOL):
    """max|a - b| <= rtol x max|a| (the parity tolerance)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max(initial=0)) <= rtol * _max(a) + 1e-30


def _outputs(out):
    return {"pooled_output": out["pooled_output"], "sequence_output": out["sequence_output"],
            **{f"encoder_outputs[{i}]": x for i, x in enumerate(out["encoder_outputs"])}}


@SETTINGS
@given(model_and_inputs())
def test_fast_path_agrees_and_everything_is_finite(example):
    config, tensors, inputs, positions = example
    ref = engine.Encoder(config, tensors)
    fast = engine.Encoder(config, tensors, fast=True)
    a, b = _outputs(ref(inputs)), _outputs(fast(inputs))
    for k in a:
        assert np.isfinite(a[k]).all() and np.isfinite(b[k]).all(), k
        rtol = POOLED_RTOL if k == "pooled_output" else RTOL
        assert _close(a[k], b[k], rtol), (k, np.abs(a[k] - b[k]).max(), _max(a[k]))
    if config.has_mlm:
        logits = ref.mlm(dict(inputs, masked_lm_positions=positions))["mlm_logits"]
        assert logits.shape == positions.shape + (config.vocab_size,) and np.isfinite(logits).all()
        fast_logits = fast.mlm(dict(inputs, masked_lm_positions=positions))["mlm_logits"]
        assert _close(logits, fast_logits)


@SETTINGS
@given(model_and_inputs(min_heads=2, min_head_size=4, min_intermediate=8))
def test_float32_agrees_with_float64(example):
    """On H >= 8, I >= 8. Degenerate sizes (H=3, I=1 seen) make layer norms of rows whose residual sum
    nearly cancels, which amplify float32 rounding by 1/std (6e-2 seen): float32 cannot do better, TF
    neither; the other properties cover those sizes."""
    config, tensors, inputs, _ = example
    a = _outputs(engine.Encoder(config, tensors)(inputs))
    b = _outputs(engine.Encoder(config, tensors, dtype="float64")(inputs))
    for k in a:
        # loose (float32 rounding through up to 2 blocks; 5e-3 seen at H=9, I=1 before the floor on I);
        # a bug gives errors of order 1
        assert _close(b[k], a[k], rtol=1e-3), (k, np.abs(a[k] - b[k]).max(), _max(b[k]))


@SETTINGS
@given(model_and_inputs(), st.randoms(use_true_random=False))
def test_permuting_the_batch_permutes_the_outputs(example, random):
    config, tensors, inputs, positions = example
    enc = engine.Encoder(config, tensors)
    B = inputs["input_word_ids"].shape[0]
    perm = np.array(random.sample(range(B), B))
    a = _outputs(enc(inputs))
    b = _outputs(enc({k: v[perm] for k, v in inputs.items()}))
    for k in a:
        assert _close(a[k][perm], b[k], POOLED_RTOL if k == "pooled_output" else RTOL), k
    if config.has_mlm:
        la = enc.mlm(dict(inputs, masked_lm_positions=positions))["mlm_logits"]
        lb = enc.mlm({**{k: v[perm] for k, v in inputs.items()}, "masked_lm_positions": positions[perm]})["mlm_logits"]
        assert _close(la[perm], lb)


@SETTINGS
@given(model_and_inputs(), st.integers(1, 8))
def test_more_padding_leaves_real_tokens_unchanged(example, extra):
    config, tensors, inputs, _ = example
    B, S = inputs["input_word_ids"].shape
    extra = min(extra, config.max_position_embeddings - S)
    padded = {k: np.concatenate([v, np.zeros((B, extra), v.dtype)], axis=1) for k, v in inputs.items()}
    mask = inputs["input_mask"].astype(bool)
    for enc in (engine.Encoder(config, tensors), engine.Encoder(config, tensors, fast=True)):
        a, b = enc(inputs), enc(padded)
        real = mask.any(axis=1)                     # rows with at least one real token
        assert _close(a["pooled_output"][real], b["pooled_output"][real], POOLED_RTOL)
        for x, y in zip(a["encoder_outputs"], b["encoder_outputs"]):
            assert _close(x[mask], y[:, :S][mask]), np.abs(x[mask] - y[:, :S][mask]).max()
            assert np.isfinite(y).all()
