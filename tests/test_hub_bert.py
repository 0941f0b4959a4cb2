"""Standard BERT through TensorFlow: Model Garden's BertEncoder (what the Hub's bert_en_uncased_L-*_H-*_A-*
and small BERTs were exported with), built by `reference --family bert`, extracted to a multi_head +
dense file with the activation its Keras metadata records, verified against TF (outputs and every
intermediate), exported back; and weights.tf_names' matching of both layouts on hand-listed variables
(no TensorFlow)."""

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import engine
from engine.cli.main import main as cli
from tests.conftest import REPO
from tests.random_weights import random_tensors
from weights import format as fmt, load
from weights import tf_names
from weights.tf_names import ExtractionError, SourceModel, SourceVariable, match_variables
from weights.write import write_weights

# The test's own statement of BertEncoder's variables (independent of weights.tf_names): the dataset
# each one goes to. Block names follow `transformer/layer_<i>/`, the MLM's `bert/`.
BERT_BLOCK = {
    "self_attention/query/kernel": "attention/query/kernel", "self_attention/query/bias": "attention/query/bias",
    "self_attention/key/kernel": "attention/key/kernel", "self_attention/key/bias": "attention/key/bias",
    "self_attention/value/kernel": "attention/value/kernel", "self_attention/value/bias": "attention/value/bias",
    "self_attention/attention_output/kernel": "attention/output/kernel",
    "self_attention/attention_output/bias": "attention/output/bias",
    "self_attention_layer_norm/gamma": "attention_layer_norm/gamma",
    "self_attention_layer_norm/beta": "attention_layer_norm/beta",
    "intermediate/kernel": "feedforward/intermediate/kernel", "intermediate/bias": "feedforward/intermediate/bias",
    "output/kernel": "feedforward/output/kernel", "output/bias": "feedforward/output/bias",
    "output_layer_norm/gamma": "feedforward_layer_norm/gamma", "output_layer_norm/beta": "feedforward_layer_norm/beta",
}
BERT_TOP = {
    "word_embeddings/embeddings": "embeddings/word", "position_embedding/embeddings": "embeddings/position",
    "type_embeddings/embeddings": "embeddings/type", "embeddings/layer_norm/gamma": "embeddings/layer_norm/gamma",
    "embeddings/layer_norm/beta": "embeddings/layer_norm/beta", "pooler_transform/kernel": "pooler/kernel",
    "pooler_transform/bias": "pooler/bias",
}
BERT_MLM = {
    "bert/cls/predictions/transform/dense/kernel": "mlm/transform/kernel",
    "bert/cls/predictions/transform/dense/bias": "mlm/transform/bias",
    "bert/cls/predictions/transform/LayerNorm/gamma": "mlm/layer_norm/gamma",
    "bert/cls/predictions/transform/LayerNorm/beta": "mlm/layer_norm/beta",
    "bert/cls/predictions/output_bias/bias": "mlm/output_bias",
}
SMALL = dict(H=8, N=2, D=4, I=16, V=12, P=16, T=2)
SHAPES = {"attention/query/kernel": "HND", "attention/query/bias": "ND", "attention/key/kernel": "HND",
          "attention/key/bias": "ND", "attention/value/kernel": "HND", "attention/value/bias": "ND",
          "attention/output/kernel": "NDH", "attention/output/bias": "H", "attention_layer_norm/gamma": "H",
          "attention_layer_norm/beta": "H", "feedforward/intermediate/kernel": "HI",
          "feedforward/intermediate/bias": "I", "feedforward/output/kernel": "IH", "feedforward/output/bias": "H",
          "feedforward_layer_norm/gamma": "H", "feedforward_layer_norm/beta": "H",
          "embeddings/word": "VH", "embeddings/position": "PH", "embeddings/type": "TH",
          "embeddings/layer_norm/gamma": "H", "embeddings/layer_norm/beta": "H", "pooler/kernel": "HH",
          "pooler/bias": "H", "mlm/transform/kernel": "HH", "mlm/transform/bias": "H", "mlm/layer_norm/gamma": "H",
          "mlm/layer_norm/beta": "H", "mlm/output_bias": "V"}


def _dataset_of(name: str) -> str:
    """The dataset a BertEncoder SavedModel's variable goes to, by this test's tables."""
    name = name.split(":")[0]
    if name in BERT_TOP:
        return BERT_TOP[name]
    if name in BERT_MLM:
        return BERT_MLM[name]
    m = re.fullmatch(r"transformer/layer_(\d+)/(.+)", name)
    return f"layers/{m.group(1)}/{BERT_BLOCK[m.group(2)]}"


def _config(cfg, activation="gelu_tanh") -> fmt.ModelConfig:
    return fmt.ModelConfig(num_layers=cfg.layers, hidden_size=cfg.hidden, num_heads=cfg.heads,
                           head_size=cfg.hidden // cfg.heads, intermediate_size=cfg.intermediate, vocab_size=cfg.vocab,
                           max_position_embeddings=cfg.positions, type_vocab_size=cfg.type_vocab,
                           hidden_activation=activation, attention="multi_head", feed_forward="dense")


@pytest.fixture(scope="session")
def tiny_bert_savedmodel():
    """The tiny reference model (L=2, H=64, N=4, I=256, real vocab) built with BertEncoder, seed 0."""
    from engine.tf import reference
    return reference.cached("tiny", seed=0, family="bert")


@pytest.fixture(scope="session")
def tiny_bert_h5(tiny_bert_savedmodel):
    from engine.tf import extract
    return extract.cached_extraction(tiny_bert_savedmodel)


@pytest.fixture(scope="session")
def tiny_bert_erf_savedmodel():
    """As tiny_bert_savedmodel, with Keras' exact GELU in the blocks and the MLM transform."""
    from engine.tf import reference
    return reference.cached("tiny", seed=0, family="bert", activation="gelu_erf")


def _check_bert_extraction(savedmodel, h5_path, cfg, activation):
    """Every dataset equals the TF variable of the same name, one dataset per variable; the config is
    multi_head + dense with the activation."""
    import tensorflow as tf
    model = tf.saved_model.load(savedmodel)
    variables = {v.name: v for v in list(model.variables) + list(model.mlm.variables) if v.dtype.is_floating}
    with h5py.File(h5_path, "r") as f:
        config = fmt.ModelConfig.from_attrs(dict(f.attrs))
        assert config == _config(cfg, activation)
        datasets = []
        f.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert sorted(datasets) == sorted(list(fmt.expected_shapes(config)) + ["vocab"])
        assert sorted(_dataset_of(name) for name in variables) == sorted(fmt.expected_shapes(config))
        for name, var in variables.items():
            ds = f[_dataset_of(name)]
            assert ds.attrs["source"] == name
            assert ds.dtype == np.dtype("<f4") and np.array_equal(ds[()], var.numpy()), name
    assert not set(fmt.MIXING_TENSORS + fmt.GATE_TENSORS) & set(fmt.block_tensor_names(config))


# ---------------------------------------------------------------------------------------------- extraction

def test_tiny_bert_extracts_to_a_multi_head_dense_file(tiny_bert_savedmodel, tmp_path, capfd):
    from engine.tf import extract
    from engine.tf.reference import CONFIGS
    result = extract.extract(tiny_bert_savedmodel, str(tmp_path / "bert.h5"), progress=False)
    err = capfd.readouterr().err
    assert "warning" not in err and "(multi_head+dense+gelu_tanh)" in err, err
    assert result.num_tensors == 5 + 2 + 16 * 2 + 5 and not result.warnings
    assert set(extract.read_activations(tiny_bert_savedmodel)["feedforward"]) == {"Text>gelu"}
    _check_bert_extraction(tiny_bert_savedmodel, result.path, CONFIGS["tiny"], "gelu_tanh")
    load(result.path, verify_checksums=True)


def test_the_exact_gelu_is_read_from_the_keras_metadata(tiny_bert_erf_savedmodel, tmp_path):
    """Keras' exact gelu is recorded as "gelu" (Model Garden's tanh one as "Text>gelu") and gives a
    gelu_erf file; the engine with the tanh GELU on the same weights is far from TF, the erf one at noise."""
    from engine.tf import extract, reference
    from engine.tf.reference import CONFIGS
    activations = extract.read_activations(tiny_bert_erf_savedmodel)
    assert set(activations["feedforward"]) == {"gelu"} and set(activations["mlm"]) == {"gelu"}
    out = extract.extract(tiny_bert_erf_savedmodel, str(tmp_path / "erf.h5"), progress=False).path
    _check_bert_extraction(tiny_bert_erf_savedmodel, out, CONFIGS["tiny"], "gelu_erf")
    shutil.copy(out, tmp_path / "tanh.h5")
    with h5py.File(tmp_path / "tanh.h5", "r+") as f:
        f.attrs["hidden_activation"] = "gelu_tanh"
    rng = np.random.default_rng(0)
    inputs = {"input_word_ids": rng.integers(1000, 30000, (2, 12)).astype(np.int32),
              "input_mask": np.ones((2, 12), np.int32), "input_type_ids": np.zeros((2, 12), np.int32),
              "masked_lm_positions": np.array([[1, 5], [2, 9]], np.int32)}
    theirs = reference.run_savedmodel(tiny_bert_erf_savedmodel, inputs)["mlm_logits"]
    erf = np.abs(engine.load(out).mlm(inputs)["mlm_logits"] - theirs).max()
    tanh = np.abs(engine.load(str(tmp_path / "tanh.h5")).mlm(inputs)["mlm_logits"] - theirs).max()
    assert erf < 1e-5 * np.abs(theirs).max() and tanh > 30 * erf, (erf, tanh)


def test_activations_are_read_where_older_keras_kept_them(tiny_bert_erf_savedmodel, tmp_path):
    """Before keras_metadata.pb, Keras kept the metadata in the object graph of saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tf_keras.protobuf import saved_metadata_pb2

    from engine.tf import extract
    copy = tmp_path / "older"
    shutil.copytree(tiny_bert_erf_savedmodel, copy)
    meta = saved_metadata_pb2.SavedMetadata()
    meta.ParseFromString((copy / "keras_metadata.pb").read_bytes())
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((copy / "saved_model.pb").read_bytes())
    nodes = saved.meta_graphs[0].object_graph_def.nodes
    for node in meta.nodes:
        nodes[node.node_id].user_object.metadata = node.metadata
    (copy / "saved_model.pb").write_bytes(saved.SerializeToString())
    (copy / "keras_metadata.pb").unlink()
    assert extract.read_activations(str(copy)) == extract.read_activations(tiny_bert_erf_savedmodel)
    assert extract.read_activations(str(tmp_path)) == {"feedforward": [], "mlm": []}


def test_the_talking_heads_reference_extracts_as_before(tiny_h5):
    with h5py.File(tiny_h5, "r") as f:
        config = fmt.ModelConfig.from_attrs(dict(f.attrs))
        assert config.family == "talking_heads+geglu+gelu_tanh"
        gate = f["layers/1/feedforward/gate/kernel"].attrs["source"]
        assert gate == "transformer_scaffold_1/feedforward/gate_0/kernel:0"
        assert f["pooler/kernel"].attrs["source"] == "cls_transform/kernel:0"
    assert list(load(tiny_h5).tensors) == list(fmt.expected_shapes(config))


def test_cache_entries_name_the_family(tiny_savedmodel, tiny_bert_savedmodel, tiny_bert_erf_savedmodel):
    names = [os.path.basename(p) for p in (tiny_savedmodel, tiny_bert_savedmodel, tiny_bert_erf_savedmodel)]
    assert names[0].startswith("tiny-random-seed0-")
    assert names[1].startswith("bert-gelu_tanh-tiny-random-seed0-")
    assert names[2].startswith("bert-gelu_erf-tiny-random-seed0-")
    for path, family in zip((tiny_savedmodel, tiny_bert_savedmodel), ("talking_heads", "bert")):
        with open(os.path.join(path, "reference.json")) as f:
            assert json.load(f).get("family", "talking_heads") == family


def test_reference_command_builds_the_bert_family(tmp_path):
    import tensorflow as tf

    from engine.tf import extract
    out = tmp_path / "bert"
    proc = subprocess.run([sys.executable, "-m", "engine", "reference", "--family", "bert", "--activation", "gelu_erf",
                           "--output", str(out), "--layers", "1", "--hidden", "16", "--heads", "2",
                           "--intermediate", "32", "--positions", "16"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "reference.json") as f:
        built = json.load(f)
    assert (built["family"], built["activation"]) == ("bert", "gelu_erf")
    names = {v.name for v in tf.saved_model.load(str(out)).mlm.variables}
    assert "transformer/layer_0/intermediate/kernel:0" in names and "pooler_transform/kernel:0" in names
    plan = match_variables(extract.read_savedmodel(str(out)))
    assert plan.config.family == "multi_head+dense+gelu_erf" and plan.config.num_layers == 1


# ---------------------------------------------------------------------------------------------- verify

def test_verify_passes_on_tiny_bert(tiny_bert_savedmodel, tiny_bert_h5, tiny_bert_erf_savedmodel, capsys):
    from engine.tf import verify
    for trace in (False, True):
        result = verify.run(verify.VerifyOptions(savedmodel=tiny_bert_savedmodel, weights=tiny_bert_h5, batch=4,
                                                 seq_length=32, trace=trace))
        assert result.ok, "\n".join(result.sections)
    assert len(result.report["cases"][0]["intermediates"]) == 2 + 2 * 13 + 1 + 4  # no mixing, no gate steps
    result = verify.run(verify.VerifyOptions(savedmodel=tiny_bert_erf_savedmodel, batch=4, seq_length=32))
    assert result.ok, "\n".join(result.sections)
    assert cli(["verify", "--family", "bert", "--batch", "2", "--seq-length", "16"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("PASS")


def test_verify_passes_on_tiny_bert_with_trained_like_weights():
    from engine.tf import reference, verify
    savedmodel = reference.cached("tiny", seed=0, conditioning="trained", family="bert")
    result = verify.run(verify.VerifyOptions(savedmodel=savedmodel, batch=4, seq_length=32))
    assert result.ok, "\n".join(result.sections)


@pytest.mark.slow
def test_base_bert_extracts_and_verify_passes():
    from engine.tf import extract, reference, verify
    savedmodel = reference.cached("base", seed=0, family="bert")
    h5 = extract.cached_extraction(savedmodel)
    config = load(h5).config
    assert config == _config(reference.CONFIGS["base"])
    assert sum(int(np.prod(s)) for s in fmt.expected_shapes(config).values()) == 109_482_240 + 622_650
    result = verify.run(verify.VerifyOptions(savedmodel=savedmodel, weights=h5, batch=2, seq_length=64))
    assert result.ok, "\n".join(result.sections)


# ---------------------------------------------------------------------------------------------- export

def test_export_round_trips(tiny_bert_h5, tiny_bert_erf_savedmodel, tmp_path):
    """A multi_head + dense file goes out through BertEncoder: extracting the export gives the same
    tensors and config (the exact GELU included), and verify PASSes on the export."""
    from engine.tf import export, extract
    out = str(tmp_path / "exported")
    assert cli(["export-savedmodel", "--weights", tiny_bert_h5, "--output", out]) == 0
    assert export.check_roundtrip(tiny_bert_h5, out) == []
    assert cli(["verify", "--savedmodel", out, "--weights", tiny_bert_h5, "--batch", "2", "--seq-length", "16"]) == 0
    erf_h5 = extract.cached_extraction(tiny_bert_erf_savedmodel)
    erf_out = str(tmp_path / "exported_erf")
    export.export_savedmodel(erf_h5, erf_out)
    assert export.check_roundtrip(erf_h5, erf_out) == []
    assert set(extract.read_activations(erf_out)["mlm"]) == {"gelu"}


def _small_config(num_layers=1, **family) -> fmt.ModelConfig:
    return fmt.ModelConfig(num_layers=num_layers, hidden_size=8, num_heads=2, head_size=4, intermediate_size=16,
                           vocab_size=12, max_position_embeddings=16, type_vocab_size=2, **family)


@pytest.mark.parametrize("family", [dict(attention="multi_head", feed_forward="geglu"),
                                    dict(attention="talking_heads", feed_forward="dense")],
                         ids=lambda f: f["attention"])
def test_export_refuses_a_family_without_a_model_garden_encoder(family, tmp_path, capfd):
    config = _small_config(**family)
    path = write_weights(str(tmp_path / "m.h5"), config, random_tensors(config), vocab=[f"t{i}" for i in range(12)])
    assert cli(["export-savedmodel", "--weights", path, "--output", str(tmp_path / "out")]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and f"the {config.attention} + {config.feed_forward} family has no Model Garden encoder" \
        in err[0], err
    assert not (tmp_path / "out").exists()


def test_export_refuses_what_model_garden_fixes():
    from engine.tf import export
    assert export.reference_family(_small_config(attention="multi_head", feed_forward="dense")) == "bert"
    assert export.reference_family(_small_config(hidden_activation="gelu_erf")) == "talking_heads"
    with pytest.raises(export.ExportError, match="layer_norm_epsilon 1e-05"):
        export.reference_family(_small_config(attention="multi_head", feed_forward="dense", layer_norm_epsilon=1e-5))


# ---------------------------------------------------------------------------------------------- matching, no TF

def _variables(layers=2, scope="", extra=(), drop=()):
    """A standard BERT's variables as read_savedmodel lists them, SMALL sizes; `extra`: (name, letters)."""
    rng = np.random.default_rng(0)
    names = [(scope + tf, SHAPES[h5]) for tf, h5 in BERT_TOP.items()]
    names += [(f"{scope}transformer/layer_{i}/{tf}", SHAPES[h5])
              for i in range(layers) for tf, h5 in BERT_BLOCK.items()]
    names += [(tf, SHAPES[h5]) for tf, h5 in BERT_MLM.items()] + list(extra)
    out = []
    for name, letters in names:
        if name not in drop:
            value = rng.normal(0, 1, tuple(SMALL[c] for c in letters)).astype(np.float32)
            out.append(SourceVariable(f"{name}:0", value.shape, "float32", read=lambda v=value: v))
    return out


def _source(variables, activations=None):
    return SourceModel(path="/hand-made", variables=variables, other_variables=[], has_mlm_object=True,
                       do_lower_case=True, do_lower_case_source="Variable:0", vocab=None, vocab_source=None,
                       activations=activations)


@pytest.mark.parametrize("scope", ["", "bert_encoder_v2/"], ids=["BertEncoder", "BertEncoderV2"])
def test_bert_names_match_a_multi_head_dense_config(scope):
    plan = match_variables(_source(_variables(scope=scope)))
    assert plan.config == _small_config(2, attention="multi_head", feed_forward="dense")
    assert list(plan.mapping) == list(fmt.expected_shapes(plan.config)) and not plan.warnings
    for path, var in plan.mapping.items():
        assert _dataset_of(var.name[len(scope):] if scope and var.name.startswith(scope) else var.name) == path


def test_layouts_hold_exactly_their_familys_datasets():
    for layout in tf_names.LAYOUTS:
        config = _small_config(attention=layout.attention, feed_forward=layout.feed_forward)
        assert set(layout.block_names) == set(fmt.block_tensor_names(config))
        assert set(layout.top_names) == set(fmt.EMBEDDING_TENSORS) | set(fmt.POOLER_TENSORS)
        assert tf_names.layout_of(config) is layout
    assert {tf: h5 for h5, tf in tf_names.STANDARD_BERT.block_names.items()} == BERT_BLOCK
    assert tf_names.layout_of(_small_config(attention="multi_head", feed_forward="geglu")) is None


def test_a_missing_bert_tensor_is_named():
    with pytest.raises(ExtractionError) as info:
        match_variables(_source(_variables(drop=("transformer/layer_1/output/bias",))))
    message = str(info.value)
    assert message.startswith("/hand-made: the SavedModel does not match the standard BERT layout (1 problem):")
    assert "missing: transformer/layer_1/output/bias (8,) (for layers/1/feedforward/output/bias)" in message


def test_mixing_both_layouts_is_a_listed_problem():
    extra = [("transformer/layer_0/self_attention/pre_softmax_weight", "NN"), ("cls_transform/kernel", "HH")]
    with pytest.raises(ExtractionError) as info:
        match_variables(_source(_variables(extra=extra)))
    message = str(info.value)
    assert "does not match the standard BERT layout (3 problems)" in message
    assert "mixed layouts: 14 variables carry names only the standard BERT layout (BertEncoder) has, 2 names " \
           "only the talking-heads GGELU BERT layout" in message
    assert "unexpected: transformer/layer_0/self_attention/pre_softmax_weight:0 (2, 2) float32 (a name of the " \
           "talking-heads GGELU BERT layout)" in message
    assert "unexpected: cls_transform/kernel:0 (8, 8) float32" in message


@pytest.mark.parametrize("activations, expected, problem", [
    ({"feedforward": ["Text>gelu", "Text>gelu"], "mlm": ["Text>gelu"]}, "gelu_tanh", None),
    ({"feedforward": ["gelu"], "mlm": ["gelu"]}, "gelu_erf", None),
    ({"feedforward": [], "mlm": []}, "gelu_tanh", None),
    ({"feedforward": ["relu"], "mlm": []}, None, "unsupported: the feed-forward's activation 'relu'"),
    ({"feedforward": ["Text>gelu", "gelu"], "mlm": []}, None, "inconsistent: the blocks' feed-forward activations"),
    ({"feedforward": ["gelu"], "mlm": ["Text>gelu"]}, None, "inconsistent: the MLM transform's activation 'Text>gelu'"),
], ids=["tanh", "erf", "unrecorded", "relu", "two", "mlm"])
def test_the_activation_comes_from_the_metadata(activations, expected, problem):
    source = _source(_variables(), activations)
    if problem is None:
        plan = match_variables(source)
        assert plan.config.hidden_activation == expected
        assert bool(plan.warnings) == (not activations["feedforward"])
    else:
        with pytest.raises(ExtractionError, match=re.escape(problem)):
            match_variables(source)
