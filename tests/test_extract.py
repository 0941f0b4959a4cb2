"""SavedModel -> HDF5 extraction: engine.tf.extract reading TensorFlow's variables, weights.tf_names matching
them to the format's datasets; the command, and a killed extraction."""

import datetime
import os
import re
import signal
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

from tests.conftest import REPO
from tests.test_weights_file import SMALL, SMALL_VOCAB, write_small
from weights import LoadedWeights, format as fmt, load
from weights import write as weights_write

# The test's own statement of the TF variables (independent of weights.tf_names): the dataset each
# one goes to, and its shape in the letters of the README.
BLOCK = {
    "self_attention/query/kernel": ("attention/query/kernel", "HND"),
    "self_attention/query/bias": ("attention/query/bias", "ND"),
    "self_attention/key/kernel": ("attention/key/kernel", "HND"),
    "self_attention/key/bias": ("attention/key/bias", "ND"),
    "self_attention/value/kernel": ("attention/value/kernel", "HND"),
    "self_attention/value/bias": ("attention/value/bias", "ND"),
    "self_attention/attention_output/kernel": ("attention/output/kernel", "NDH"),
    "self_attention/attention_output/bias": ("attention/output/bias", "H"),
    "self_attention/pre_softmax_weight": ("attention/pre_softmax_weight", "NN"),
    "self_attention/post_softmax_weight": ("attention/post_softmax_weight", "NN"),
    "self_attention_layer_norm/gamma": ("attention_layer_norm/gamma", "H"),
    "self_attention_layer_norm/beta": ("attention_layer_norm/beta", "H"),
    "feedforward/intermediate_0/kernel": ("feedforward/intermediate/kernel", "HI"),
    "feedforward/intermediate_0/bias": ("feedforward/intermediate/bias", "I"),
    "feedforward/gate_0/kernel": ("feedforward/gate/kernel", "HI"),
    "feedforward/gate_0/bias": ("feedforward/gate/bias", "I"),
    "feedforward/output_0/kernel": ("feedforward/output/kernel", "IH"),
    "feedforward/output_0/bias": ("feedforward/output/bias", "H"),
    "feedforward/output_layer_norm_0/gamma": ("feedforward_layer_norm/gamma", "H"),
    "feedforward/output_layer_norm_0/beta": ("feedforward_layer_norm/beta", "H"),
}
TOP = {
    "word_embeddings/embeddings": ("embeddings/word", "VH"),
    "position_embedding/embeddings": ("embeddings/position", "PH"),
    "type_embeddings/embeddings": ("embeddings/type", "TH"),
    "embeddings/layer_norm/gamma": ("embeddings/layer_norm/gamma", "H"),
    "embeddings/layer_norm/beta": ("embeddings/layer_norm/beta", "H"),
    "cls_transform/kernel": ("pooler/kernel", "HH"),
    "cls_transform/bias": ("pooler/bias", "H"),
}
MLM = {
    "cls/predictions/transform/dense/kernel": ("mlm/transform/kernel", "HH"),
    "cls/predictions/transform/dense/bias": ("mlm/transform/bias", "H"),
    "cls/predictions/transform/LayerNorm/gamma": ("mlm/layer_norm/gamma", "H"),
    "cls/predictions/transform/LayerNorm/beta": ("mlm/layer_norm/beta", "H"),
    "cls/predictions/output_bias/bias": ("mlm/output_bias", "V"),
}
H5_OF_BLOCK, H5_OF_TOP, H5_OF_MLM = ({tf: h5 for tf, (h5, _) in t.items()} for t in (BLOCK, TOP, MLM))
SHAPE_OF_BLOCK, SHAPE_OF_TOP, SHAPE_OF_MLM = ({tf: letters for tf, (_, letters) in t.items()} for t in (BLOCK, TOP, MLM))


def _extract_module():
    import importlib
    return importlib.import_module("engine.tf.extract")


def _tf_name_to_h5(names):
    """{TF name without :0 -> dataset path}, blocks ordered by their numeric suffix (none = 0)."""
    prefixes = {}
    out = {}
    for name in names:
        if name in H5_OF_TOP:
            out[name] = H5_OF_TOP[name]
            continue
        stripped = re.sub(r"^bert/", "", name)
        if stripped in H5_OF_MLM:
            out[name] = H5_OF_MLM[stripped]
            continue
        prefix, rel = name.split("/", 1)
        m = re.fullmatch(r".*?(?:_(\d+))?", prefix)
        prefixes[prefix] = int(m.group(1) or 0)
    order = sorted(prefixes, key=prefixes.get)
    for name in names:
        if name not in out:
            prefix, rel = name.split("/", 1)
            out[name] = f"layers/{order.index(prefix)}/{H5_OF_BLOCK[rel]}"
    return out


def _check_extraction_matches_tf(model, h5_path, savedmodel, cfg):
    """Every dataset bit-exactly equals what TF holds; config, vocab, do_lower_case, provenance."""
    import tensorflow as tf
    variables = {}
    for v in list(model.variables) + list(model.mlm.variables):
        if v.dtype.is_floating:
            variables[v.name.split(":")[0]] = v
    mapping = _tf_name_to_h5(list(variables))
    with h5py.File(h5_path, "r") as f:
        datasets = []
        f.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert sorted(datasets) == sorted(list(mapping.values()) + ["vocab"])
        for name, var in variables.items():
            ds = f[mapping[name]]
            value = var.numpy()
            assert ds.dtype == np.dtype("<f4") and ds.shape == value.shape, name
            assert np.array_equal(ds[()], value), name
            assert ds.attrs["source"] == var.name
            assert ds.attrs["sha256"] == fmt.tensor_checksum(value)
        attrs = dict(f.attrs)
        assert attrs["format"] == fmt.FORMAT_NAME and attrs["format_version"] == fmt.FORMAT_VERSION
        config = fmt.ModelConfig.from_attrs(attrs)
        assert config == fmt.ModelConfig(
            num_layers=cfg.layers, hidden_size=cfg.hidden, num_heads=cfg.heads,
            head_size=cfg.hidden // cfg.heads, intermediate_size=cfg.intermediate, vocab_size=cfg.vocab,
            max_position_embeddings=cfg.positions, type_vocab_size=cfg.type_vocab,
            hidden_activation="gelu_tanh", layer_norm_epsilon=1e-12, attention_mask_constant=-1e9,
            do_lower_case=True, has_mlm=True)
        assert bool(attrs["do_lower_case"]) is bool(model.do_lower_case.numpy()) is True
        assert attrs["do_lower_case_source"] == "Variable:0"
        asset = model.vocab_file.asset_path.numpy().decode()
        with open(asset, "rb") as fh:
            lines = fh.read().decode("utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        assert list(f["vocab"].asstr()[()]) == lines and len(lines) == cfg.vocab
        assert attrs["source_path"] == os.path.abspath(savedmodel)
        assert attrs["tensorflow_version"] == tf.__version__
        stamp = datetime.datetime.fromisoformat(attrs["extracted_at"])
        assert stamp.utcoffset() == datetime.timedelta(0)
    loaded = load(h5_path, verify_checksums=True)
    assert isinstance(loaded, LoadedWeights) and loaded.config == config and loaded.vocab == lines
    assert list(loaded.tensors) == list(fmt.expected_shapes(config))
    for name, var in variables.items():
        array = loaded.tensors[mapping[name]]
        assert array.dtype == np.float32 and array.flags.c_contiguous
        assert np.array_equal(array, var.numpy())
    assert loaded.provenance["source_path"] == os.path.abspath(savedmodel)


def test_tiny_extraction_is_bit_exact(tf_tiny, tiny_savedmodel, tmp_path, capfd):
    from engine.tf.reference import CONFIGS
    extract = _extract_module()
    out = tmp_path / "tiny.h5"
    result = extract.extract(tiny_savedmodel, str(out))
    assert result.path == str(out) and result.num_tensors == 5 + 2 + 20 * 2 + 5
    err = capfd.readouterr().err
    assert "extract: writing: 100%" in err and "warning" not in err
    _check_extraction_matches_tf(tf_tiny, out, tiny_savedmodel, CONFIGS["tiny"])


def test_tiny_h5_fixture_is_the_extraction(tf_tiny, tiny_h5, tiny_savedmodel):
    from engine.tf.reference import CONFIGS
    _check_extraction_matches_tf(tf_tiny, tiny_h5, tiny_savedmodel, CONFIGS["tiny"])


@pytest.mark.slow
def test_base_extraction_is_bit_exact(tf_base, base_h5, base_savedmodel):
    from engine.tf.reference import CONFIGS
    _check_extraction_matches_tf(tf_base, base_h5, base_savedmodel, CONFIGS["base"])
    w = load(base_h5)
    assert len(w.tensors) == 247 + 5
    assert sum(a.size for a in w.tensors.values()) == 137_834_112 + 622_650


# ----------------------------------------------------------------------------------------------
# Test-only SavedModels: tf.Module-like trackables holding tf.Variables under chosen names.

def _small_values(block_prefixes=("transformer_scaffold_7", "transformer_scaffold_9", "transformer_scaffold_10"),
                  mlm_scope="cls/predictions", seed=0, **sizes):
    s = dict(SMALL, **sizes)
    rng = np.random.default_rng(seed)

    def value(letters):
        return rng.normal(0, 1, tuple(s[c] for c in letters)).astype(np.float32)

    encoder = {name: value(letters) for name, letters in SHAPE_OF_TOP.items()}
    for prefix in block_prefixes:
        for rel, letters in SHAPE_OF_BLOCK.items():
            encoder[f"{prefix}/{rel}"] = value(letters)
    mlm = {name.replace("cls/predictions", mlm_scope, 1): value(letters) for name, letters in SHAPE_OF_MLM.items()}
    return encoder, mlm


def _save_module(path, encoder, mlm=None, *, do_lower_case=False, vocab=SMALL_VOCAB, shuffle=True, extra_root=()):
    """Saves a SavedModel shaped like the Hub export: .variables, .mlm.variables, do_lower_case, vocab asset."""
    import tensorflow as tf
    from tensorflow.python.trackable.autotrackable import AutoTrackable
    names = list(encoder)
    if shuffle:
        names = [names[i] for i in np.random.default_rng(1).permutation(len(names))]
    enc_vars = [tf.Variable(encoder[n], name=n) for n in names]
    root = AutoTrackable()
    dlc = tf.Variable(do_lower_case, trainable=False)
    root.variables = enc_vars + [dlc] + list(extra_root)
    root.do_lower_case = dlc
    if mlm is not None:
        sub = AutoTrackable()
        sub.variables = enc_vars + [tf.Variable(v, name=n) for n, v in mlm.items()]
        root.mlm = sub
    if vocab is not None:
        vocab_path = os.path.join(os.path.dirname(str(path)), f"{os.path.basename(str(path))}-vocab.txt")
        with open(vocab_path, "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in vocab))
        root.vocab_file = tf.saved_model.Asset(vocab_path)
    tf.saved_model.save(root, str(path))
    return str(path)


def test_renamed_prefixes_extract_in_numeric_block_order(tmp_path):
    """Blocks `transformer_scaffold_{7,9,10}` (lexically 10 < 7 < 9), MLM scope without `bert/`."""
    extract = _extract_module()
    encoder, mlm = _small_values()
    sm = _save_module(tmp_path / "renamed", encoder, mlm, do_lower_case=False)
    out = tmp_path / "renamed.h5"
    result = extract.extract(sm, str(out), progress=False)
    assert result.config == fmt.ModelConfig(num_layers=3, hidden_size=8, num_heads=2, head_size=4,
                                            intermediate_size=16, vocab_size=12, max_position_embeddings=16,
                                            type_vocab_size=2, do_lower_case=False, has_mlm=True)
    w = load(out, verify_checksums=True)
    assert w.config == result.config and w.config.do_lower_case is False
    assert w.vocab == SMALL_VOCAB
    for i, prefix in enumerate(("transformer_scaffold_7", "transformer_scaffold_9", "transformer_scaffold_10")):
        for rel, h5_rel in H5_OF_BLOCK.items():
            assert np.array_equal(w.tensors[f"layers/{i}/{h5_rel}"], encoder[f"{prefix}/{rel}"]), (i, rel)
    for name, h5 in H5_OF_TOP.items():
        assert np.array_equal(w.tensors[h5], encoder[name])
    for name, h5 in H5_OF_MLM.items():
        assert np.array_equal(w.tensors[h5], mlm[name])
    with h5py.File(out, "r") as f:
        assert f["layers/2/attention/query/kernel"].attrs["source"] == \
            "transformer_scaffold_10/self_attention/query/kernel:0"
        assert f["mlm/output_bias"].attrs["source"] == "cls/predictions/output_bias/bias:0"


def test_unnumbered_first_block_and_bert_scope(tmp_path):
    """`blk`, `blk_1`, `blk_2` with `bert/cls/predictions` extract too (no suffix = block 0)."""
    extract = _extract_module()
    encoder, mlm = _small_values(block_prefixes=("blk_2", "blk", "blk_1"), mlm_scope="bert/cls/predictions")
    sm = _save_module(tmp_path / "m", encoder, mlm)
    extract.extract(sm, str(tmp_path / "m.h5"), progress=False)
    w = load(tmp_path / "m.h5")
    for i, prefix in enumerate(("blk", "blk_1", "blk_2")):
        assert np.array_equal(w.tensors[f"layers/{i}/feedforward/gate/kernel"], encoder[f"{prefix}/feedforward/gate_0/kernel"])
    assert np.array_equal(w.tensors["mlm/output_bias"], mlm["bert/cls/predictions/output_bias/bias"])


def _bad_removed(encoder, mlm):
    del encoder["transformer_scaffold_9/feedforward/gate_0/bias"]
    return ["missing", "transformer_scaffold_9/feedforward/gate_0/bias", "layers/1/feedforward/gate/bias"]


def _bad_extra(encoder, mlm):
    encoder["transformer_scaffold_9/self_attention/extra_scale"] = np.ones(3, np.float32)
    return ["unexpected", "transformer_scaffold_9/self_attention/extra_scale:0 (3,)"]


def _bad_shape(encoder, mlm):
    encoder["transformer_scaffold_10/self_attention/key/kernel"] = np.ones((8, 2, 3), np.float32)
    return ["mis-shaped", "transformer_scaffold_10/self_attention/key/kernel:0 has shape (8, 2, 3), expected (8, 2, 4)",
            "layers/2/attention/key/kernel"]


def _bad_mlm_missing(encoder, mlm):
    del mlm["cls/predictions/transform/LayerNorm/beta"]
    return ["missing", "[bert/]cls/predictions/transform/LayerNorm/beta (8,)"]


def _bad_mlm_twice(encoder, mlm):
    mlm["bert/cls/predictions/output_bias/bias"] = mlm["cls/predictions/output_bias/bias"]
    return ["duplicate", "cls/predictions/output_bias/bias", "bert/cls/predictions/output_bias/bias"]


def _bad_all_three(encoder, mlm):
    return _bad_removed(encoder, mlm) + _bad_extra(encoder, mlm) + _bad_shape(encoder, mlm) + ["3 problems"]


def _bad_nan(encoder, mlm):
    encoder["transformer_scaffold_7/feedforward/output_0/kernel"][3, 1] = np.nan
    return ["non-finite", "transformer_scaffold_7/feedforward/output_0/kernel:0 has 1 NaN/inf", "(3, 1)"]


def _bad_bert_blocks_scaffold_pooler(encoder, mlm):
    """A standard BERT's block names (BertEncoder) beside the talking-heads pooler name: two layouts."""
    encoder.clear()
    encoder.update({name: np.ones([SMALL[c] for c in s], np.float32) for name, s in SHAPE_OF_TOP.items()})
    for i in range(2):
        p = f"transformer/layer_{i}"
        for rel in ("query", "key", "value"):
            encoder[f"{p}/self_attention/{rel}/kernel"] = np.ones((8, 2, 4), np.float32)
            encoder[f"{p}/self_attention/{rel}/bias"] = np.ones((2, 4), np.float32)
        encoder[f"{p}/self_attention/attention_output/kernel"] = np.ones((2, 4, 8), np.float32)
        encoder[f"{p}/self_attention/attention_output/bias"] = np.ones(8, np.float32)
        encoder[f"{p}/self_attention_layer_norm/gamma"] = np.ones(8, np.float32)
        encoder[f"{p}/self_attention_layer_norm/beta"] = np.ones(8, np.float32)
        encoder[f"{p}/intermediate/kernel"] = np.ones((8, 16), np.float32)
        encoder[f"{p}/intermediate/bias"] = np.ones(16, np.float32)
        encoder[f"{p}/output/kernel"] = np.ones((16, 8), np.float32)
        encoder[f"{p}/output/bias"] = np.ones(8, np.float32)
        encoder[f"{p}/output_layer_norm/gamma"] = np.ones(8, np.float32)
        encoder[f"{p}/output_layer_norm/beta"] = np.ones(8, np.float32)
    return ["does not match the standard BERT layout", "mixed layouts: 12 variables carry names only the standard "
            "BERT layout (BertEncoder) has, 2 names only the talking-heads GGELU BERT layout",
            "unexpected: cls_transform/kernel:0 (8, 8) float32 (a name of the talking-heads GGELU BERT layout)",
            "missing: pooler_transform/kernel (8, 8) (for pooler/kernel)"]


def _bad_vocab(encoder, mlm):
    return ["vocab asset", "has 11 tokens, the word embeddings have 12 rows"]


@pytest.mark.parametrize("breaker", [_bad_removed, _bad_extra, _bad_shape, _bad_mlm_missing, _bad_mlm_twice,
                                     _bad_all_three, _bad_nan, _bad_bert_blocks_scaffold_pooler, _bad_vocab],
                         ids=lambda f: f.__name__[5:])
def test_bad_savedmodels_fail_with_one_clear_error(tmp_path, breaker):
    extract = _extract_module()
    encoder, mlm = _small_values()
    expected = breaker(encoder, mlm)
    vocab = SMALL_VOCAB[:-1] if breaker is _bad_vocab else SMALL_VOCAB
    sm = _save_module(tmp_path / "bad", encoder, mlm, vocab=vocab)
    out = tmp_path / "bad.h5"
    with pytest.raises(extract.ExtractionError) as info:
        extract.extract(sm, str(out), progress=False)
    message = str(info.value)
    assert message.startswith(os.path.abspath(sm) + ": "), message
    for piece in expected:
        assert piece in message, f"{piece!r} not in:\n{message}"
    assert isinstance(info.value, ValueError)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_extra_non_float_variable_is_unexpected(tmp_path):
    import tensorflow as tf
    extract = _extract_module()
    encoder, mlm = _small_values()
    sm = _save_module(tmp_path / "m", encoder, mlm, extra_root=[tf.Variable(np.int64(3), name="global_step")])
    with pytest.raises(extract.ExtractionError, match=r"unexpected: global_step:0 \(int64, not float\)"):
        extract.extract(sm, str(tmp_path / "m.h5"), progress=False)


def test_no_mlm_gives_an_encoder_only_file(tmp_path, capfd):
    extract = _extract_module()
    encoder, _ = _small_values()
    sm = _save_module(tmp_path / "enc", encoder, mlm=None, do_lower_case=True)
    out = tmp_path / "enc.h5"
    result = extract.extract(sm, str(out), progress=False)
    err = capfd.readouterr().err
    assert "warning: " in err and "encoder only" in err and "has_mlm=False" in err
    assert result.config.has_mlm is False and result.warnings
    with h5py.File(out, "r") as f:
        assert "mlm" not in f and bool(f.attrs["has_mlm"]) is False
    w = load(out, verify_checksums=True)
    assert w.config.has_mlm is False and not any(k.startswith("mlm/") for k in w.tensors)
    assert len(w.tensors) == 7 + 20 * 3 and w.config.do_lower_case is True


def test_not_a_savedmodel(tmp_path):
    extract = _extract_module()
    with pytest.raises(extract.ExtractionError, match="not a SavedModel"):
        extract.extract(str(tmp_path), str(tmp_path / "x.h5"), progress=False)
    with pytest.raises(extract.ExtractionError, match="not a folder"):
        extract.extract(str(tmp_path / "nope"), str(tmp_path / "x.h5"), progress=False)


# ----------------------------------------------------------------------------------------------
# The matching alone (weights.tf_names): no TensorFlow.

def test_the_name_table_is_this_tests_mapping_over_the_formats_datasets():
    from weights import tf_names
    assert set(tf_names.TF_BLOCK_NAMES) == set(fmt.BLOCK_TENSORS)
    assert set(tf_names.TF_EMBEDDING_NAMES) == set(fmt.EMBEDDING_TENSORS)
    assert set(tf_names.TF_POOLER_NAMES) == set(fmt.POOLER_TENSORS)
    assert set(tf_names.TF_MLM_NAMES) == set(fmt.MLM_TENSORS)
    assert {tf: h5 for h5, tf in tf_names.TF_BLOCK_NAMES.items()} == H5_OF_BLOCK
    assert {tf: h5 for t in (tf_names.TF_EMBEDDING_NAMES, tf_names.TF_POOLER_NAMES) for h5, tf in t.items()} == H5_OF_TOP
    assert {tf: h5 for h5, tf in tf_names.TF_MLM_NAMES.items()} == H5_OF_MLM


def _source(encoder, mlm, **over):
    from weights.tf_names import SourceModel, SourceVariable
    variables = [SourceVariable(f"{name}:0", value.shape, str(value.dtype), read=lambda v=value: v)
                 for name, value in {**encoder, **mlm}.items()]
    fields = dict(path="/hand-made", variables=variables, other_variables=[], has_mlm_object=True,
                  do_lower_case=False, do_lower_case_source="do_lower_case:0", vocab=SMALL_VOCAB, vocab_source="v.txt")
    return SourceModel(**{**fields, **over})


def test_matching_by_hand_without_tensorflow():
    """Variables listed by hand (as read_savedmodel lists them): blocks in numeric order, the config from
    the shapes; a mis-shaped and a missing variable are both named in one ExtractionError."""
    from weights.tf_names import ExtractionError, match_variables
    encoder, mlm = _small_values()
    plan = match_variables(_source(encoder, mlm))
    assert plan.config == fmt.ModelConfig(num_layers=3, hidden_size=8, num_heads=2, head_size=4, intermediate_size=16,
                                          vocab_size=12, max_position_embeddings=16, type_vocab_size=2,
                                          do_lower_case=False, has_mlm=True)
    assert list(plan.mapping) == list(fmt.expected_shapes(plan.config)) and not plan.warnings
    assert plan.mapping[fmt.block_path(2, "feedforward/gate/kernel")].name == \
        "transformer_scaffold_10/feedforward/gate_0/kernel:0"
    encoder["transformer_scaffold_9/self_attention/key/kernel"] = np.ones((8, 2, 3), np.float32)
    del mlm["cls/predictions/output_bias/bias"]
    with pytest.raises(ExtractionError) as info:
        match_variables(_source(encoder, mlm))
    message = str(info.value)
    assert message.startswith("/hand-made: the SavedModel does not match the talking-heads GGELU BERT layout "
                              "(2 problems):"), message
    assert "missing: [bert/]cls/predictions/output_bias/bias (12,) (for mlm/output_bias)" in message
    assert ("mis-shaped: transformer_scaffold_9/self_attention/key/kernel:0 has shape (8, 2, 3), expected (8, 2, 4) "
            "(for layers/1/attention/key/kernel)") in message


# ----------------------------------------------------------------------------------------------
# The command: never a silent replacement, never a half file.

def test_refuses_to_replace_without_force(tiny_savedmodel, tmp_path):
    out = tmp_path / "out.h5"
    write_small(out)
    before = out.read_bytes()
    stat = out.stat()
    proc = subprocess.run([sys.executable, "-m", "engine.tf.extract", tiny_savedmodel, "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {out} exists; pass --force to replace it" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == before and out.stat().st_mtime_ns == stat.st_mtime_ns
    assert _extract_module().main([tiny_savedmodel, "--output", str(tmp_path)]) == 2  # a folder as output: clear error


def test_cli_extracts_with_progress(tiny_savedmodel, tmp_path):
    out = tmp_path / "cli.h5"
    proc = subprocess.run([sys.executable, "-m", "engine.tf.extract", tiny_savedmodel, "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "extract: reading: 100%" in proc.stderr and "extract: writing: 100%" in proc.stderr
    assert f"extract: wrote {out}" in proc.stderr
    assert load(out, verify_checksums=True).config.num_layers == 2
    assert os.listdir(tmp_path) == ["cli.h5"]


_KILL_SCRIPT = """
import sys, time
import engine.tf.extract as e
import weights.write as w
original, count = w.write_dataset, [0]
def slow(*args, **kwargs):
    original(*args, **kwargs)
    count[0] += 1
    if count[0] == 25:
        print("HALFWAY", flush=True)
        time.sleep(300)
w.write_dataset = slow
sys.exit(e.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_extraction_leaves_old_output_intact(tiny_savedmodel, tmp_path, sig):
    out = tmp_path / "out.h5"
    write_small(out)
    before = out.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, tiny_savedmodel, "--output", str(out), "--force"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HALFWAY", proc.stderr.read()[-3000:]
        temps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].startswith(".out.h5.extract-")  # the write is under way
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        stderr = proc.stderr.read()
    finally:
        watchdog.cancel()
        proc.kill()
    assert out.read_bytes() == before
    load(out)  # still the complete old file
    if sig == signal.SIGTERM:  # handled: cleaned up, clear message, no traceback
        assert rc == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
        assert os.listdir(tmp_path) == ["out.h5"]
    else:  # nothing can run on SIGKILL: the temp file stays, the next extraction removes it
        assert rc == -signal.SIGKILL
        assert weights_write.remove_stale_temps(str(out)) == temps
        assert os.listdir(tmp_path) == ["out.h5"]


def test_loader_and_extract_module_import_no_tensorflow():
    code = ("import sys, weights, engine.tf.extract, weights.load, weights.tf_names, engine.tools.progress; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

