"""The trace. Every intermediate of the engine against TensorFlow's own, step by step.

- Layout: names, order, shapes and letters as engine/core/trace.py documents them; the HDF5 file.
- Every traced intermediate matches TF's step-by-step intermediate (engine/tf/reference_trace.py,
  Model Garden's layers called one method at a time) within the parity tolerance, 1e-5 x max|TF|
  per intermediate, on the tiny and (slow) base reference models. The TF steps first reproduce the
  SavedModel's outputs (faithfulness). Measured maxima are printed (pytest -s).
- `verify --trace` pinpoints a perturbed weight to its block and step; `compare` finds the first
  divergence between two trace files, also through a name map and another layout.
"""

import json
import re
import shutil

import h5py
import numpy as np
import pytest

import engine
from engine.cli import main as cli
from engine.tools import parity
from engine.core import trace as trace_mod
from engine.tools import compare, tracefile, verdict
from weights import format as fmt

RTOL = verdict.DEFAULT_RTOL


def _inputs(cfg, batch, seq_length, seed=3):
    return parity.random_inputs(np.random.default_rng(seed), batch, seq_length, cfg.vocab_size,
                                all_padding_row=batch > 2, num_positions=4, type_vocab_size=cfg.type_vocab_size)


# ------------------------------------------------------------------------------------------ layout

def test_trace_names_order_shapes_and_file_layout(tiny_h5, tmp_path):
    enc = engine.load(tiny_h5)
    cfg = enc.config
    inputs = _inputs(cfg, 3, 11)
    t = enc.trace(inputs)
    expected = trace_mod.steps(cfg.num_layers, with_mlm=True)
    assert t.names() == [name for name, _, _ in expected]
    assert len(t) == 2 + 17 * cfg.num_layers + 1 + 4
    d = trace_mod.dims(cfg, 3, 11, 4)
    for name, letters, _ in expected:
        assert t[name].shape == trace_mod.expected_shape(letters, d), name
        assert t[name].dtype == np.float32
        assert t.letters[name] == letters
    # The trace is the model: its last block output and logits are the normal call's outputs.
    out = enc.mlm(inputs)
    np.testing.assert_array_equal(t[f"layers/{cfg.num_layers - 1}/feedforward_layer_norm"], out["sequence_output"])
    np.testing.assert_array_equal(t["mlm/logits"], out["mlm_logits"])
    np.testing.assert_array_equal(t["pooled_output"], out["pooled_output"])

    path = tmp_path / "trace.h5"
    tracefile.write(t, str(path), texts=["a", "b", "c"])
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == tracefile.TRACE_FORMAT and f.attrs["format_version"] == 1
        assert [n.decode() if isinstance(n, bytes) else n for n in f.attrs["names"]] == t.names()
        assert json.loads(f.attrs["config"])["num_layers"] == cfg.num_layers
        assert f.attrs["config_hidden_size"] == cfg.hidden_size
        assert json.loads(f.attrs["dims"]) == d
        assert json.loads(f.attrs["texts"]) == ["a", "b", "c"]
        for k, v in inputs.items():
            np.testing.assert_array_equal(f[f"inputs/{k}"][()], v)
            np.testing.assert_array_equal(f.attrs[k], v)
        for i, (name, letters, _) in enumerate(expected):
            ds = f[name]
            assert ds.attrs["order"] == i and ds.attrs["letters"] == letters
            np.testing.assert_array_equal(ds[()], t[name])
    back = tracefile.read(str(path))
    assert back.names() == t.names() and back.letters == t.letters
    # Streaming writer: the same file content.
    path2 = tmp_path / "trace2.h5"
    assert tracefile.trace_to_file(enc, inputs, str(path2)) == t.names()
    assert all(compare.compare(back, tracefile.read(str(path2)).tensors, rtol=0.0)[i].ok for i in range(len(t)))


def test_documented_table_matches_the_steps():
    """The table in engine/core/trace.py's docstring lists exactly the recorded names and letters."""
    rows = re.findall(r"^    ((?:embeddings|layers/<i>|pooled_output|mlm)\S*)\s+([A-Z](?:,[A-Z])*)\s",
                      trace_mod.__doc__, re.M)
    documented = [(name.replace("<i>", "0"), letters) for name, letters in rows]
    assert documented == [(n, l) for n, l, _ in trace_mod.steps(1, with_mlm=True)]


def test_encoder_only_trace_has_no_mlm_steps(tiny_h5):
    loaded = __import__("weights").load(tiny_h5)
    cfg = fmt.ModelConfig(**{**loaded.config.to_attrs(), "has_mlm": False})
    tensors = {k: v for k, v in loaded.tensors.items() if not k.startswith("mlm/")}
    enc = engine.Encoder(cfg, tensors)
    t = enc.trace({k: v for k, v in _inputs(cfg, 2, 5).items() if k != "masked_lm_positions"})
    assert t.names()[-1] == "pooled_output" and not any(n.startswith("mlm/") for n in t)


# ------------------------------------------------------------------------------------------ vs TF

def _check_against_tf(savedmodel, h5, batch, seq_length, label):
    """Every intermediate judged against float32 noise (engine.tools.verdict), after TF's
    step-by-step trace is shown faithful to the SavedModel by the same rule."""
    from engine.tf import reference_trace
    enc, enc64 = engine.load(h5), engine.load(h5, dtype="float64")
    inputs = _inputs(enc.config, batch, seq_length)
    report = reference_trace.verify_trace(savedmodel, enc, inputs, enc64=enc64)
    print(f"\n{label}: TF steps vs the SavedModel's outputs:")
    print(verdict.format_table(report.faithfulness))
    assert report.faithful
    print(f"{label}: engine vs TF, every intermediate (B={batch}, S={seq_length}):")
    print(verdict.format_table(report.diffs))
    assert [d.name for d in report.diffs] == [n for n, _, _ in trace_mod.steps(enc.config.num_layers)]
    bad = [f"{d.name}: {d.status} {d.detail}" for d in report.diffs if not d.ok]
    assert not bad, "\n".join(bad)
    return report, inputs


def test_tiny_every_intermediate_matches_tensorflow(tiny_savedmodel, tiny_h5):
    from engine.tf import reference_trace
    report, inputs = _check_against_tf(tiny_savedmodel, tiny_h5, 4, 33, "tiny")
    # The rebuild is exact: the steps equal the rebuilt model's eager call, and the rebuilt model
    # as a tf.function equals the SavedModel; only eager-vs-graph float32 noise separates the two.
    theirs = reference_trace.tf_trace(tiny_savedmodel, inputs)
    exact = reference_trace.exactness(tiny_savedmodel, inputs, theirs)
    print("tiny exactness:", exact)
    assert all(v == 0.0 for v in exact.values())
    # The all-padding row (the last): in both traces every logit of it is exactly the mask constant
    # (-1e9 swallows the scores in float32) and its attention is uniform over the keys, never NaN;
    # elsewhere the masked keys coincide.
    ours = engine.load(tiny_h5).trace(inputs)
    padded = inputs["input_mask"] == 0
    assert padded[-1].all() and not padded[0].all()
    for i in range(ours.config["num_layers"]):
        for t in (ours.tensors, theirs):
            masked, probs = t[f"layers/{i}/masked_scores"], t[f"layers/{i}/probs"]
            assert np.all(masked[-1] == np.float32(-1e9))
            np.testing.assert_array_equal(probs[-1], np.float32(1.0 / padded.shape[1]))
            assert np.all(probs[:-1][np.broadcast_to(padded[:-1, None, None, :], probs[:-1].shape)] == 0)


def test_tiny_trained_like_every_intermediate_matches_tensorflow(tiny_trained_savedmodel, tiny_trained_h5):
    _check_against_tf(tiny_trained_savedmodel, tiny_trained_h5, 4, 33, "tiny trained-like")


@pytest.mark.slow
@pytest.mark.exhaustive
def test_base_every_intermediate_matches_tensorflow(base_savedmodel, base_h5):
    _check_against_tf(base_savedmodel, base_h5, 3, 40, "base")


@pytest.mark.slow
def test_base_trained_like_every_intermediate_matches_tensorflow(base_trained_savedmodel, base_trained_h5):
    _check_against_tf(base_trained_savedmodel, base_trained_h5, 3, 40, "base trained-like")


# ------------------------------------------------------------------------------------------ pinpointing

def _perturbed_copy(h5, tmp_path, dataset, delta=0.05, index=(0, 1)):
    path = tmp_path / "perturbed.h5"
    shutil.copy(h5, path)
    with h5py.File(path, "r+") as f:
        ds = f[dataset]
        value = ds[()]
        value[index] += np.float32(delta)
        ds[...] = value
        ds.attrs["sha256"] = fmt.tensor_checksum(value)   # keep the file valid
    return str(path)


def test_verify_trace_pinpoints_a_perturbed_weight(tiny_savedmodel, tiny_h5, tmp_path, capsys):
    from engine.tf import reference_trace
    bad = _perturbed_copy(tiny_h5, tmp_path, "layers/1/attention/post_softmax_weight")
    enc, enc64 = engine.load(bad, verify_checksums=True), engine.load(bad, dtype="float64")
    for report in (reference_trace.verify_trace(tiny_savedmodel, enc, _inputs(enc.config, 3, 17), enc64=enc64),
                   reference_trace.verify_trace(tiny_savedmodel, enc, _inputs(enc.config, 3, 17), rtol=RTOL)):
        first = report.first
        print(f"\nperturbed post_softmax_weight[0,1] of block 1 by 0.05: first failure {first.name}: {first.detail}")
        assert report.faithful
        assert first is not None and first.name == "layers/1/mixed_probs"
        names = [d.name for d in report.diffs]
        assert all(d.ok for d in report.diffs[:names.index("layers/1/mixed_probs")])
    assert report.diffs[names.index("layers/1/mixed_probs")].relative > 1e-3   # far above float32 noise
    # The command line says the same.
    rc = cli.main(["verify", "--trace", "--savedmodel", tiny_savedmodel, "--weights", bad,
                   "--batch", "2", "--seq-length", "12"])
    out = capsys.readouterr().out
    assert rc == cli.EXIT_MISMATCH
    assert "first divergence at layers/1/mixed_probs" in out


def test_compare_finds_first_divergence_between_trace_files(tiny_h5, tmp_path, capsys):
    enc = engine.load(tiny_h5)
    inputs = _inputs(enc.config, 2, 9)
    ours = tmp_path / "ours.h5"
    tracefile.trace_to_file(enc, inputs, str(ours))
    # Same file: all agree.
    assert cli.main(["compare", str(ours), str(ours)]) == cli.EXIT_OK
    assert "all 41 intermediates agree" in capsys.readouterr().out
    # A port with a wrong gate bias in block 0: the first divergence is its gate branch.
    bad = engine.load(_perturbed_copy(tiny_h5, tmp_path, "layers/0/feedforward/gate/bias", 0.01, (3,)))
    theirs = tmp_path / "theirs.h5"
    tracefile.trace_to_file(bad, inputs, str(theirs))
    assert cli.main(["compare", str(ours), str(theirs)]) == cli.EXIT_MISMATCH
    out = capsys.readouterr().out
    assert "first divergence at layers/0/gate_branch" in out
    assert re.search(r"layers/0/gelu_branch .* PASS\n", out)
    diffs = compare.compare(tracefile.read(str(ours)), tracefile.read(str(theirs)).tensors)
    assert verdict.first_failure(diffs).name == "layers/0/gate_branch"


def test_compare_with_a_name_map_and_other_layouts(tiny_h5, tmp_path, capsys):
    """Another port's names and layouts: probabilities as [B,S,N,T] (transposed through the map),
    the MLM gather as [B*P,H] (reshape-compatible), and a few intermediates missing."""
    enc = engine.load(tiny_h5)
    t = enc.trace(_inputs(enc.config, 2, 9))
    ours = tmp_path / "ours.h5"
    tracefile.write(t, str(ours))
    theirs = tmp_path / "theirs.h5"
    mapping = {}
    with h5py.File(theirs, "w") as f:
        for name, value in t.items():
            if name.endswith("raw_scores"):
                continue                                           # their port does not expose it
            their = "port." + name.replace("/", ".")
            if name.endswith("/probs"):
                f[their] = value.transpose(0, 2, 1, 3)             # [B,S,N,T]
                mapping[their] = {"name": name, "transpose": [0, 2, 1, 3]}
            elif name == "mlm/gathered":
                f[their] = value.reshape(-1, value.shape[-1])      # [B*P,H]
                mapping[their] = name
            else:
                f[their] = value
                mapping[their] = name
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(mapping))
    # two of ours missing from theirs: not agreement, though everything they have agrees
    assert cli.main(["compare", str(ours), str(theirs), "--map", str(map_file)]) == cli.EXIT_MISMATCH
    out = capsys.readouterr().out
    assert "first divergence at layers/0/raw_scores" in out and "2 missing (first layers/0/raw_scores)" in out
    assert len(re.findall(r" PASS\n", out)) == 39
    with h5py.File(theirs, "a") as f:
        for i in range(2):
            f[f"raw_{i}"] = t[f"layers/{i}/raw_scores"]
            mapping[f"raw_{i}"] = f"layers/{i}/raw_scores"
    map_file.write_text(json.dumps(mapping))
    assert cli.main(["compare", str(ours), str(theirs), "--map", str(map_file)]) == cli.EXIT_OK
    assert "all 41 intermediates agree" in capsys.readouterr().out


def test_compare_against_an_unrelated_file_or_nothing_fails(tiny_h5, tmp_path, capsys):
    enc = engine.load(tiny_h5)
    ours = tmp_path / "ours.h5"
    tracefile.trace_to_file(enc, _inputs(enc.config, 2, 9), str(ours))
    unrelated = tmp_path / "unrelated.h5"
    with h5py.File(unrelated, "w") as f:
        f["something/else"] = np.ones(3, np.float32)
    assert cli.main(["compare", str(ours), str(unrelated)]) == cli.EXIT_MISMATCH
    assert "41 missing" in capsys.readouterr().out
    assert cli.main(["compare", str(unrelated), str(ours)]) == cli.EXIT_MISMATCH   # its one name is not in ours
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w"):
        pass
    assert cli.main(["compare", str(empty), str(ours)]) == cli.EXIT_MISMATCH
    assert "nothing compared" in capsys.readouterr().out


def test_compare_rtol_is_exact_for_every_intermediate(tiny_h5, tmp_path, capsys):
    """--rtol applies to pooled_output too (no hidden floor); --pooled-rtol sets it apart."""
    enc = engine.load(tiny_h5)
    t = enc.trace(_inputs(enc.config, 2, 9))
    ours, theirs = tmp_path / "ours.h5", tmp_path / "theirs.h5"
    tracefile.write(t, str(ours))
    t.tensors["pooled_output"] = t["pooled_output"] * np.float32(1 + 3e-6)
    tracefile.write(t, str(theirs))
    assert cli.main(["compare", str(ours), str(ours), "--rtol", "0"]) == cli.EXIT_OK
    assert cli.main(["compare", str(ours), str(theirs), "--rtol", "1e-5"]) == cli.EXIT_OK
    assert cli.main(["compare", str(ours), str(theirs), "--rtol", "1e-6"]) == cli.EXIT_MISMATCH
    assert "first divergence at pooled_output" in capsys.readouterr().out
    assert cli.main(["compare", str(ours), str(theirs), "--rtol", "1e-6", "--pooled-rtol", "1e-5"]) == cli.EXIT_OK


def test_trace_command_with_text_and_with_ids(tiny_h5, tmp_path):
    out = tmp_path / "text.h5"
    assert cli.main(["trace", "--weights", tiny_h5, "The quick brown fox.", "Talking heads.",
                     "--seq-length", "10", "--output", str(out)]) == cli.EXIT_OK
    t = tracefile.read(str(out))
    assert t["layers/1/mixed_probs"].shape == (2, 4, 10, 10) and t["mlm/logits"].shape == (2, 10, 30522)
    assert json.loads(t.attrs["texts"]) == ["The quick brown fox.", "Talking heads."]
    assert t.inputs["input_word_ids"][0, 0] == 101
    out = tmp_path / "ids.h5"
    assert cli.main(["trace", "--weights", tiny_h5, "--ids", "[[101, 7592, 2088, 102, 0]]",
                     "--output", str(out)]) == cli.EXIT_OK
    t = tracefile.read(str(out))
    np.testing.assert_array_equal(t.inputs["input_mask"], [[1, 1, 1, 1, 0]])
    assert t["layers/0/q"].shape == (1, 5, 4, 16)
    assert cli.main(["trace", "--weights", tiny_h5, "--ids", "not json", "--output", str(out)]) == cli.EXIT_ERROR


def test_verify_trace_honours_pooled_rtol(tiny_savedmodel, tiny_h5, capsys):
    """With a fixed tolerance, --pooled-rtol applies to pooled_output:
    every other intermediate within 1e-5, pooled_output held to 1e-12 fails first."""
    rc = cli.main(["verify", "--trace", "--savedmodel", tiny_savedmodel, "--weights", tiny_h5, "--batch", "2",
                   "--seq-length", "12", "--rtol", "1e-5", "--pooled-rtol", "1e-12"])
    out = capsys.readouterr().out
    assert rc == cli.EXIT_MISMATCH
    assert "first divergence at pooled_output" in out
    assert cli.main(["verify", "--trace", "--savedmodel", tiny_savedmodel, "--weights", tiny_h5, "--batch", "2",
                     "--seq-length", "12", "--rtol", "1e-5"]) == cli.EXIT_OK
