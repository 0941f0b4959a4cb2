"""The reference SavedModels: built with Model Garden's export code, shaped like the Hub model."""

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

BLOCK_VARIABLES = {
    "self_attention/query/kernel", "self_attention/query/bias",
    "self_attention/key/kernel", "self_attention/key/bias",
    "self_attention/value/kernel", "self_attention/value/bias",
    "self_attention/attention_output/kernel", "self_attention/attention_output/bias",
    "self_attention/pre_softmax_weight", "self_attention/post_softmax_weight",
    "self_attention_layer_norm/gamma", "self_attention_layer_norm/beta",
    "feedforward/intermediate_0/kernel", "feedforward/intermediate_0/bias",
    "feedforward/gate_0/kernel", "feedforward/gate_0/bias",
    "feedforward/output_0/kernel", "feedforward/output_0/bias",
    "feedforward/output_layer_norm_0/gamma", "feedforward/output_layer_norm_0/beta",
}
TOP_VARIABLES = {
    "word_embeddings/embeddings", "position_embedding/embeddings", "type_embeddings/embeddings",
    "embeddings/layer_norm/gamma", "embeddings/layer_norm/beta", "cls_transform/kernel", "cls_transform/bias",
}
MLM_VARIABLES = {
    "cls/predictions/transform/dense/kernel", "cls/predictions/transform/dense/bias",
    "cls/predictions/transform/LayerNorm/gamma", "cls/predictions/transform/LayerNorm/beta",
    "cls/predictions/output_bias/bias",
}


def _names(variables):
    return [v.name.split(":")[0] for v in variables]


def _check_structure(model, cfg):
    float_vars = [v for v in model.variables if v.dtype.is_floating]
    other = [v for v in model.variables if not v.dtype.is_floating]
    assert len(other) == 1 and other[0].dtype.name == "bool" and bool(other[0].numpy()) is True  # do_lower_case
    names = _names(float_vars)
    blocks = {}
    for name in names:
        m = re.fullmatch(r"(transformer_scaffold(?:_\d+)?)/(.+)", name)
        if m:
            blocks.setdefault(m.group(1), set()).add(m.group(2))
        else:
            assert name in TOP_VARIABLES, name
    assert len(blocks) == cfg.layers
    assert all(v == BLOCK_VARIABLES for v in blocks.values())
    assert set(n for n in names if n in TOP_VARIABLES) == TOP_VARIABLES
    mlm_only = [n for n in _names(model.mlm.variables) if n not in names]
    assert {re.sub(r"^bert/", "", n) for n in mlm_only} == MLM_VARIABLES
    assert model.vocab_file.asset_path.numpy().decode().endswith("vocab.txt")
    return float_vars


def _call(model, cfg, batch=2, seq=7, positions=3):
    import tensorflow as tf
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[0, seq - 2:] = 0
    types = np.zeros((batch, seq), np.int32)
    types[:, seq // 2:] = 1
    inputs = dict(input_word_ids=tf.constant(ids), input_mask=tf.constant(mask), input_type_ids=tf.constant(types))
    out = model(inputs)
    assert set(out) == {"pooled_output", "sequence_output", "encoder_outputs", "default"}
    assert out["pooled_output"].shape == (batch, cfg.hidden)
    assert out["sequence_output"].shape == (batch, seq, cfg.hidden)
    assert len(out["encoder_outputs"]) == cfg.layers
    assert all(x.shape == (batch, seq, cfg.hidden) for x in out["encoder_outputs"])
    np.testing.assert_array_equal(out["default"].numpy(), out["pooled_output"].numpy())
    np.testing.assert_array_equal(out["encoder_outputs"][-1].numpy(), out["sequence_output"].numpy())
    inputs["masked_lm_positions"] = tf.constant(rng.integers(0, seq, (batch, positions)).astype(np.int32))
    mlm = model.mlm(inputs)
    assert set(mlm) == {"pooled_output", "sequence_output", "encoder_outputs", "mlm_logits"}
    assert mlm["mlm_logits"].shape == (batch, positions, cfg.vocab)
    assert np.all(np.isfinite(mlm["mlm_logits"].numpy()))


def _check_randomized(variables):
    """No variable may keep an initializer's constant (zeros, ones): those hide bugs."""
    for v in variables:
        value = v.numpy()
        assert value.std() > 1e-3, f"{v.name} looks unrandomized (std {value.std()})"
        assert not np.any(value == 0.0), f"{v.name} has exact zeros"


def test_tiny_reference_structure_and_call(tf_tiny):
    from engine.tf.reference import CONFIGS
    cfg = CONFIGS["tiny"]
    float_vars = _check_structure(tf_tiny, cfg)
    assert len(float_vars) == 5 + 2 + 20 * cfg.layers
    _check_randomized([v for v in tf_tiny.mlm.variables if v.dtype.is_floating])
    _call(tf_tiny, cfg)


@pytest.mark.slow
def test_base_reference_has_the_real_sizes(tf_base):
    from engine.tf.reference import CONFIGS
    cfg = CONFIGS["base"]
    float_vars = _check_structure(tf_base, cfg)
    assert len(float_vars) == 247
    assert sum(int(np.prod(v.shape)) for v in float_vars) == 137_834_112
    mlm_extra = [v for v in tf_base.mlm.variables if v.name.split(":")[0] not in set(_names(float_vars))]
    assert sum(int(np.prod(v.shape)) for v in mlm_extra) == 622_650
    _check_randomized([v for v in tf_base.mlm.variables if v.dtype.is_floating])
    _call(tf_base, cfg, batch=1, seq=5, positions=2)


def test_cli_build_is_deterministic_per_seed(tmp_path):
    """`python -m engine.tf.reference` twice with one seed gives identical variables; another seed differs."""
    import tensorflow as tf
    args = ["--config", "tiny", "--layers", "1", "--hidden", "16", "--heads", "2", "--intermediate", "32",
            "--positions", "16"]
    paths = {}
    for tag, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / tag
        proc = subprocess.run([sys.executable, "-m", "engine.tf.reference", "--output", str(out), "--seed", str(seed), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "reference: wrote" in proc.stderr
        paths[tag] = tf.saved_model.load(str(out))
    a, b, c = ([v.numpy() for v in paths[t].mlm.variables] for t in "abc")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # An existing output is never replaced without --force.
    proc = subprocess.run([sys.executable, "-m", "engine.tf.reference", "--output", str(tmp_path / "a"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "exists" in proc.stderr


def test_reference_config_rejects_bad_sizes():
    from engine.tf.reference import ReferenceConfig
    with pytest.raises(ValueError, match="multiple of heads"):
        ReferenceConfig(hidden=10, heads=3)
    with pytest.raises(ValueError, match="layers"):
        ReferenceConfig(layers=0)
    assert dataclasses.asdict(ReferenceConfig())["hidden"] == 768


def test_import_engine_imports_no_tensorflow():
    code = "import sys, engine, weights.format, weights.vocab; " \
           "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')]; " \
           "assert not bad, bad"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
