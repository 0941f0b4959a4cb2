"""SavedModel -> HDF5 extraction (engine.tf.extract), the format, and the validating loader (weights.load)."""

import datetime
import io
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
from weights import LoadedWeights, WeightsFileError, format as fmt, load

# The test's own statement of the name mapping (independent of engine.tf.extract's tables).
H5_OF_BLOCK = {
    "self_attention/query/kernel": "attention/query/kernel",
    "self_attention/query/bias": "attention/query/bias",
    "self_attention/key/kernel": "attention/key/kernel",
    "self_attention/key/bias": "attention/key/bias",
    "self_attention/value/kernel": "attention/value/kernel",
    "self_attention/value/bias": "attention/value/bias",
    "self_attention/attention_output/kernel": "attention/output/kernel",
    "self_attention/attention_output/bias": "attention/output/bias",
    "self_attention/pre_softmax_weight": "attention/pre_softmax_weight",
    "self_attention/post_softmax_weight": "attention/post_softmax_weight",
    "self_attention_layer_norm/gamma": "attention_layer_norm/gamma",
    "self_attention_layer_norm/beta": "attention_layer_norm/beta",
    "feedforward/intermediate_0/kernel": "feedforward/intermediate/kernel",
    "feedforward/intermediate_0/bias": "feedforward/intermediate/bias",
    "feedforward/gate_0/kernel": "feedforward/gate/kernel",
    "feedforward/gate_0/bias": "feedforward/gate/bias",
    "feedforward/output_0/kernel": "feedforward/output/kernel",
    "feedforward/output_0/bias": "feedforward/output/bias",
    "feedforward/output_layer_norm_0/gamma": "feedforward_layer_norm/gamma",
    "feedforward/output_layer_norm_0/beta": "feedforward_layer_norm/beta",
}
H5_OF_TOP = {
    "word_embeddings/embeddings": "embeddings/word",
    "position_embedding/embeddings": "embeddings/position",
    "type_embeddings/embeddings": "embeddings/type",
    "embeddings/layer_norm/gamma": "embeddings/layer_norm/gamma",
    "embeddings/layer_norm/beta": "embeddings/layer_norm/beta",
    "cls_transform/kernel": "pooler/kernel",
    "cls_transform/bias": "pooler/bias",
}
H5_OF_MLM = {
    "cls/predictions/transform/dense/kernel": "mlm/transform/kernel",
    "cls/predictions/transform/dense/bias": "mlm/transform/bias",
    "cls/predictions/transform/LayerNorm/gamma": "mlm/layer_norm/gamma",
    "cls/predictions/transform/LayerNorm/beta": "mlm/layer_norm/beta",
    "cls/predictions/output_bias/bias": "mlm/output_bias",
}
# Shapes of the TF variables, in the letters of the README.
SHAPE_OF_BLOCK = {
    "self_attention/query/kernel": "HND", "self_attention/query/bias": "ND",
    "self_attention/key/kernel": "HND", "self_attention/key/bias": "ND",
    "self_attention/value/kernel": "HND", "self_attention/value/bias": "ND",
    "self_attention/attention_output/kernel": "NDH", "self_attention/attention_output/bias": "H",
    "self_attention/pre_softmax_weight": "NN", "self_attention/post_softmax_weight": "NN",
    "self_attention_layer_norm/gamma": "H", "self_attention_layer_norm/beta": "H",
    "feedforward/intermediate_0/kernel": "HI", "feedforward/intermediate_0/bias": "I",
    "feedforward/gate_0/kernel": "HI", "feedforward/gate_0/bias": "I",
    "feedforward/output_0/kernel": "IH", "feedforward/output_0/bias": "H",
    "feedforward/output_layer_norm_0/gamma": "H", "feedforward/output_layer_norm_0/beta": "H",
}
SHAPE_OF_TOP = {
    "word_embeddings/embeddings": "VH", "position_embedding/embeddings": "PH",
    "type_embeddings/embeddings": "TH", "embeddings/layer_norm/gamma": "H",
    "embeddings/layer_norm/beta": "H", "cls_transform/kernel": "HH", "cls_transform/bias": "H",
}
SHAPE_OF_MLM = {
    "cls/predictions/transform/dense/kernel": "HH", "cls/predictions/transform/dense/bias": "H",
    "cls/predictions/transform/LayerNorm/gamma": "H", "cls/predictions/transform/LayerNorm/beta": "H",
    "cls/predictions/output_bias/bias": "V",
}
SMALL = dict(L=3, H=8, N=2, D=4, I=16, V=12, P=16, T=2)
SMALL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "##s", "héllo", "日本", "naïve", "a b", "!"]


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


def _bad_plain_bert(encoder, mlm):
    """A plain BERT's block names: no talking-heads weights, no gated feedforward."""
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
    return ["not look like a talking-heads", "not look like a gated-GELU", "missing",
            "transformer/layer_1/self_attention/pre_softmax_weight", "unexpected",
            "transformer/layer_0/intermediate/kernel:0 (8, 16)"]


def _bad_vocab(encoder, mlm):
    return ["vocab asset", "has 11 tokens, the word embeddings have 12 rows"]


@pytest.mark.parametrize("breaker", [_bad_removed, _bad_extra, _bad_shape, _bad_mlm_missing, _bad_mlm_twice,
                                     _bad_all_three, _bad_nan, _bad_plain_bert, _bad_vocab],
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
# The write: never a half file, never a silent replacement.

def _small_config(**over):
    s = dict(SMALL, **over)
    return fmt.ModelConfig(num_layers=s["L"], hidden_size=s["H"], num_heads=s["N"], head_size=s["D"],
                           intermediate_size=s["I"], vocab_size=s["V"], max_position_embeddings=s["P"],
                           type_vocab_size=s["T"])


def _small_tensors(config, seed=0):
    rng = np.random.default_rng(seed)
    return {p: rng.normal(0, 1, shape).astype(np.float32) for p, shape in fmt.expected_shapes(config).items()}


def _write_small(path, seed=0, **kwargs):
    extract = _extract_module()
    config = _small_config()
    tensors = _small_tensors(config, seed)
    kwargs.setdefault("vocab", SMALL_VOCAB)
    extract.write_weights(str(path), config, tensors, progress=False, **kwargs)
    return config, tensors


def test_refuses_to_replace_without_force(tiny_savedmodel, tmp_path):
    out = tmp_path / "out.h5"
    _write_small(out)
    before = out.read_bytes()
    stat = out.stat()
    proc = subprocess.run([sys.executable, "-m", "engine.tf.extract", tiny_savedmodel, str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "exists" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == before and out.stat().st_mtime_ns == stat.st_mtime_ns
    extract = _extract_module()
    with pytest.raises(FileExistsError):
        _write_small(out, seed=1)
    assert out.read_bytes() == before
    # With force, it is replaced (through the same atomic path).
    _write_small(out, seed=1, force=True)
    assert out.read_bytes() != before and os.listdir(tmp_path) == ["out.h5"]
    assert extract.main([tiny_savedmodel, str(tmp_path)]) == 2  # a folder as output: clear error


def test_cli_extracts_with_progress(tiny_savedmodel, tmp_path):
    out = tmp_path / "cli.h5"
    proc = subprocess.run([sys.executable, "-m", "engine.tf.extract", tiny_savedmodel, str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "extract: reading: 100%" in proc.stderr and "extract: writing: 100%" in proc.stderr
    assert f"extract: wrote {out}" in proc.stderr
    assert load(out, verify_checksums=True).config.num_layers == 2
    assert os.listdir(tmp_path) == ["cli.h5"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError, OSError])
@pytest.mark.parametrize("old", [True, False], ids=["old-output", "no-output"])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, exc, old):
    extract = _extract_module()
    out = tmp_path / "out.h5"
    if old:
        _write_small(out)
    before = out.read_bytes() if old else None
    import weights.write as weights_write   # the writer extract uses (no TensorFlow)
    original = weights_write._write_dataset
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 30:
            raise exc("halfway")
        return original(*args, **kwargs)

    monkeypatch.setattr(weights_write, "_write_dataset", flaky)
    with pytest.raises(exc, match="halfway"):
        _write_small(out, seed=2, force=True)
    assert len(calls) == 30
    assert os.listdir(tmp_path) == (["out.h5"] if old else [])
    if old:
        assert out.read_bytes() == before


_KILL_SCRIPT = """
import sys, time
import engine.tf.extract as e
import weights.write as w
original, count = w._write_dataset, [0]
def slow(*args, **kwargs):
    original(*args, **kwargs)
    count[0] += 1
    if count[0] == 25:
        print("HALFWAY", flush=True)
        time.sleep(300)
w._write_dataset = slow
sys.exit(e.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_extraction_leaves_old_output_intact(tiny_savedmodel, tmp_path, sig):
    extract = _extract_module()
    out = tmp_path / "out.h5"
    _write_small(out)
    before = out.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, tiny_savedmodel, str(out), "--force"],
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
        assert extract.remove_stale_temps(str(out)) == temps
        assert os.listdir(tmp_path) == ["out.h5"]


def test_write_weights_checks_its_input(tmp_path):
    extract = _extract_module()
    config = _small_config()
    tensors = _small_tensors(config)
    tensors["layers/0/attention/query/kernel"] = tensors["layers/0/attention/query/kernel"][..., :3]
    del tensors["pooler/bias"]
    tensors["extra"] = np.zeros(3, np.float32)
    with pytest.raises(extract.ExtractionError) as info:
        extract.write_weights(str(tmp_path / "x.h5"), config, tensors, progress=False)
    msg = str(info.value)
    assert "missing: pooler/bias" in msg and "unexpected: extra" in msg
    assert "layers/0/attention/query/kernel has shape (8, 2, 3), expected (8, 2, 4)" in msg
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# The loader: every failure is a WeightsFileError naming the file (and the dataset).

@pytest.fixture
def small_h5(tmp_path):
    path = tmp_path / "model.h5"
    config, tensors = _write_small(path, provenance={"source_path": "/nowhere", "extractor": "test"})
    return path, config, tensors


def test_load_small_file(small_h5):
    path, config, tensors = small_h5
    w = load(path, verify_checksums=True)
    assert w.config == config and w.vocab == SMALL_VOCAB and w.path == str(path)
    assert w.provenance == {"source_path": "/nowhere", "extractor": "test"}
    assert list(w.tensors) == list(fmt.expected_shapes(config))
    for k, v in tensors.items():
        assert np.array_equal(w.tensors[k], v) and w.tensors[k].flags.c_contiguous


def _load_error(path, **kwargs):
    with pytest.raises(WeightsFileError) as info:
        load(path, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_load_truncated(small_h5):
    path, _, _ = small_h5
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 100, 100):
        path.write_bytes(data[:keep])
        msg = _load_error(path)
        assert msg.startswith(f"{path}: ") and "truncated" in msg, msg


def test_load_truncated_real_file(tiny_h5, tmp_path):
    path = tmp_path / "tiny.h5"
    with open(tiny_h5, "rb") as f:
        path.write_bytes(f.read(5_000_000))
    assert _load_error(path).startswith(f"{path}: ")


def test_load_flipped_bytes(small_h5):
    path, _, tensors = small_h5
    name = "layers/1/feedforward/gate/kernel"
    with h5py.File(path, "r") as f:
        offset = f[name].id.get_offset()
        assert offset is not None  # contiguous storage
    with open(path, "r+b") as f:
        f.seek(offset + 4 * 37)  # the low mantissa byte of element 37: stays finite
        byte = f.read(1)
        f.seek(offset + 4 * 37)
        f.write(bytes([byte[0] ^ 0x01]))
    w = load(path)  # without checksums the value is plausible...
    assert not np.array_equal(w.tensors[name], tensors[name])
    msg = _load_error(path, verify_checksums=True)  # ...with them, it is caught
    assert msg == f"{path}: dataset {name} fails its sha256 checksum (corrupt data)"


def _rewrite(path, name, data):
    with h5py.File(path, "r+") as f:
        attrs = dict(f[name].attrs)
        del f[name]
        ds = f.create_dataset(name, data=data)
        ds.attrs.update(attrs)


def test_load_wrong_shape(small_h5):
    path, _, _ = small_h5
    _rewrite(path, "layers/2/attention/query/kernel", np.ones((8, 2, 3), np.float32))
    assert _load_error(path) == (f"{path}: dataset layers/2/attention/query/kernel has shape (8, 2, 3), "
                                 f"expected (8, 2, 4)")


def test_load_wrong_dtype(small_h5):
    path, _, tensors = small_h5
    _rewrite(path, "pooler/bias", tensors["pooler/bias"].astype(np.float64))
    assert _load_error(path) == f"{path}: dataset pooler/bias has dtype float64, expected float32"


def test_load_nan(small_h5):
    path, _, _ = small_h5
    with h5py.File(path, "r+") as f:
        f["layers/0/feedforward/output/bias"][5] = np.nan
    msg = _load_error(path)
    assert msg == f"{path}: dataset layers/0/feedforward/output/bias has 1 non-finite values (NaN/inf), first at (5,)"


def test_load_missing_and_unexpected_datasets(small_h5):
    path, _, _ = small_h5
    with h5py.File(path, "r+") as f:
        del f["mlm/output_bias"]
        f["layers/3/attention/query/kernel"] = np.ones((8, 2, 4), np.float32)
    msg = _load_error(path)
    assert msg.startswith(f"{path}: 2 problems:")
    assert "dataset mlm/output_bias is missing (expected shape (12,))" in msg
    assert "dataset layers/3/attention/query/kernel is unexpected" in msg


@pytest.mark.parametrize("attr, value, expected", [
    ("format", "something-else", "format is 'something-else', expected 'talkheads-ggelu-bert'"),
    ("format_version", 2, "format_version 2 (written by a newer version of this project)"),
    ("num_heads", 3, "inconsistent config attributes"),
    ("hidden_size", 8.5, "config attribute 'hidden_size' = 8.5 is not an integer"),
    ("has_mlm", None, "config attribute 'has_mlm' is missing"),
    ("format", None, "no 'format' attribute"),
    # the engine implements the Hub model's tanh GELU only; no extracted file names another
    ("hidden_activation", "gelu_erf", "hidden_activation 'gelu_erf' is not supported (the model uses gelu_tanh)"),
])
def test_load_bad_attributes(small_h5, attr, value, expected):
    path, _, _ = small_h5
    with h5py.File(path, "r+") as f:
        if value is None:
            del f.attrs[attr]
        else:
            f.attrs[attr] = value
    msg = _load_error(path)
    assert msg.startswith(f"{path}: ") and expected in msg, msg


def test_load_not_hdf5_directory_missing(tmp_path):
    text = tmp_path / "model.h5"
    text.write_text("not hdf5 at all\n" * 100)
    assert _load_error(text) == f"{text}: not an HDF5 file (no HDF5 signature)"
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    assert "is empty" in _load_error(empty)
    assert _load_error(tmp_path) == f"{tmp_path}: is a directory, not an HDF5 weight file"
    assert _load_error(tmp_path / "missing.h5") == f"{tmp_path / 'missing.h5'}: no such file"
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.ones(3)
    assert "no 'format' attribute" in _load_error(tmp_path / "other.h5")


def test_load_no_permission(small_h5, monkeypatch):
    path, _, _ = small_h5
    load_module = sys.modules["weights.load"]

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(load_module, "open", denied, raising=False)
    assert _load_error(path) == f"{path}: permission denied (cannot read the file)"
    monkeypatch.undo()
    if os.geteuid() != 0:  # root reads anything: the real chmod case only means something otherwise
        os.chmod(path, 0)
        try:
            assert "permission denied" in _load_error(path)
        finally:
            os.chmod(path, 0o644)


def test_loader_and_extract_module_import_no_tensorflow():
    code = ("import sys, weights, engine.tf.extract, weights.load, engine.tools.progress; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_progress_line():
    from engine.tools.progress import Progress
    live = io.StringIO()
    with Progress(1000, "reading", stream=live, live=True, min_interval=0) as bar:  # tqdm's bar
        for _ in range(4):
            bar.update(250, "x")
    text = live.getvalue()
    assert text.count("\r") >= 4 and text.endswith("\n") and text.count("\n") == 1
    assert "reading: 100%" in text and "1.00k/1.00k" in text and "B/s" in text
    quiet = io.StringIO()
    with Progress(10, "writing", stream=quiet) as bar:  # not a terminal: only the final line
        bar.update(10)
    assert quiet.getvalue().count("\n") == 1 and "\r" not in quiet.getvalue()
    assert quiet.getvalue().startswith("writing: 100% 10 B/10 B in ")
    slow = io.StringIO()
    with Progress(10, "encoding", stream=slow, bytes_unit=False, quiet_every=0) as bar:  # a line per update
        for _ in range(5):
            bar.update(2)
    assert slow.getvalue().count("\n") == 5 and slow.getvalue().splitlines()[-1].startswith("encoding: 100% 10/10")
