"""The ONNX export (weights/export_onnx.py) run by ONNX Runtime, judged like the engine: against
TensorFlow running the same SavedModel and the engine's float64 run as the truth
(engine.tools.verdict: ONNX Runtime at least as accurate as TF within the stated factor, and the
two apart by no more than their float32 errors explain). Tiny and (slow) base, random and
trained-like weights; the encoder graph and the MLM graph; dynamic batch and sequence axes."""

import numpy as np
import pytest

import engine
from engine.tools import parity, verdict
from tests import isolated
from tests.judging import assert_pass, engines, random_inputs, tf_outputs
from weights import WeightsFileError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from weights.export_onnx import OnnxExportError, export_onnx  # noqa: E402


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _run(session, inputs) -> dict:
    """ONNX Runtime's outputs in the engine's structure (encoder_outputs as a list)."""
    feed = {i.name: np.asarray(inputs[i.name], np.int32) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feed)))
    layers = sorted((n for n in got if n.startswith("encoder_outputs_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    out = {n: v for n, v in got.items() if not n.startswith("encoder_outputs_")}
    out["encoder_outputs"] = [got[n] for n in layers]
    return out


def _judge(session, savedmodel, h5, inputs, label, apart, theirs=None):
    """The verdict on every output; trained-like: all-padding rows checked finite and left out
    (a step function of the logits in float32, see tests/judging.judge); theirs: TF's outputs when
    already computed."""
    ours = parity.flatten_outputs(_run(session, inputs))
    if theirs is None:
        theirs = tf_outputs(savedmodel, inputs, mlm="masked_lm_positions" in inputs)
    theirs = parity.flatten_outputs(theirs)
    exact_enc = engines(h5)["float64"]
    call = exact_enc.mlm if "masked_lm_positions" in inputs else exact_enc
    exact = parity.flatten_outputs(engine.to_numpy(call(inputs)))
    # the float32 noise level is measured over every float32 run at hand: ONNX Runtime's and the
    # engine's readable and fast paths (as the engine's own parity tests do)
    others = []
    for path in ("readable", "fast"):
        e = engines(h5)[path]
        others.append(parity.flatten_outputs(engine.to_numpy((e.mlm if "masked_lm_positions" in inputs else e)(inputs))))
    ours.pop("default")
    np.testing.assert_array_equal(_run(session, inputs)["default"], ours["pooled_output"])
    assert set(ours) == set(exact), (sorted(ours), sorted(exact))
    if apart:
        real = np.asarray(inputs["input_mask"]).sum(axis=1) > 0
        assert all(np.all(np.isfinite(v)) for v in ours.values()), f"{label}: a non-finite output"
        ours, theirs, exact = ({k: v[real] for k, v in d.items()} for d in (ours, theirs, exact))
        others = [{k: v[real] for k, v in d.items()} for d in others]
    judgements = verdict.judge_all(ours, theirs, exact, others=others)
    print(f"\n{label} onnxruntime:\n{verdict.format_table(judgements)}")
    assert_pass(judgements)


CASES = [dict(batch=1, seq_length=1), dict(batch=4, seq_length=33, all_padding_row=True),
         dict(batch=3, seq_length=77, segment_pairs=True), dict(batch=2, seq_length=128)]


@pytest.mark.parametrize("which", ["random", "trained"])
def test_tiny_onnx_matches_tf_and_float64(which, request, tmp_path):
    savedmodel = request.getfixturevalue("tiny_savedmodel" if which == "random" else "tiny_trained_savedmodel")
    h5 = request.getfixturevalue("tiny_h5" if which == "random" else "tiny_trained_h5")
    mlm_path = export_onnx(h5, str(tmp_path / "mlm.onnx"), mlm=True)
    enc_path = export_onnx(h5, str(tmp_path / "encoder.onnx"))
    onnx.checker.check_model(mlm_path, full_check=True)
    mlm, encoder = _session(mlm_path), _session(enc_path)
    cfg = engines(h5)["readable"].config
    # one session, several shapes: the batch, sequence and position axes are dynamic
    for seed, case in enumerate(CASES):
        inputs = random_inputs(cfg, case, seed=seed)
        _judge(mlm, savedmodel, h5, inputs, f"tiny {which} {case} mlm", apart=which == "trained")
        encoder_inputs = {k: v for k, v in inputs.items() if k != "masked_lm_positions"}
        got = _run(encoder, encoder_inputs)
        assert set(got) == {"pooled_output", "default", "sequence_output", "encoder_outputs"}
        assert len(got["encoder_outputs"]) == cfg.num_layers
        # the encoder graph is the MLM graph without its head: the same numbers
        with_head = _run(mlm, inputs)
        for name in ("pooled_output", "sequence_output"):
            np.testing.assert_array_equal(got[name], with_head[name])


def test_graph_names_shapes_and_metadata(tiny_h5, tmp_path):
    path = export_onnx(tiny_h5, str(tmp_path / "m.onnx"), mlm=True)
    model = onnx.load(path)
    cfg = engines(tiny_h5)["readable"].config
    assert model.opset_import[0].version >= 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"input_word_ids": ["batch", "seq"], "input_mask": ["batch", "seq"],
                    "input_type_ids": ["batch", "seq"], "masked_lm_positions": ["batch", "num_masked"]}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    expected = {"pooled_output": ["batch", cfg.hidden_size], "default": ["batch", cfg.hidden_size],
                "sequence_output": ["batch", "seq", cfg.hidden_size],
                "mlm_logits": ["batch", "num_masked", cfg.vocab_size]}
    expected.update({f"encoder_outputs_{i}": ["batch", "seq", cfg.hidden_size] for i in range(cfg.num_layers)})
    assert outs == expected
    props = {p.key: p.value for p in model.metadata_props}
    assert '"num_layers": %d' % cfg.num_layers in props["config"]
    # the word table is stored once (the MLM decoder reads it transposed with Gemm's transB)
    words = [i for i in model.graph.initializer if tuple(i.dims) == (cfg.vocab_size, cfg.hidden_size)]
    assert len(words) == 1


def test_export_refuses_bad_requests(tiny_h5, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        export_onnx(tiny_h5, str(out))
    assert out.read_bytes() == b"keep me"
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(WeightsFileError) as info:
        export_onnx(str(bad), str(tmp_path / "x.onnx"))
    assert str(info.value) == f"{bad}: not an HDF5 file (no HDF5 signature)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5", "m.onnx"]   # no x.onnx, no temp file


def test_encoder_only_weights_have_no_mlm_graph(tmp_path):
    from engine.tf import extract, reference
    encoder_only = extract.cached_extraction(reference.cached("tiny", seed=0, conditioning="random", with_mlm=False))
    with pytest.raises(OnnxExportError, match="encoder-only"):
        export_onnx(encoder_only, str(tmp_path / "m.onnx"), mlm=True)


def test_cli_export_onnx(tiny_h5, tmp_path, capsys):
    from engine.cli.main import main
    out = tmp_path / "cli.onnx"
    assert main(["export-onnx", "--weights", tiny_h5, "--output", str(out)]) == 0
    assert onnx.load(str(out)).graph.output[0].name == "pooled_output"
    capsys.readouterr()
    assert main(["export-onnx", "--weights", tiny_h5, "--output", str(out)]) == 2   # exists, no --force
    assert capsys.readouterr().err.strip() == f"error: --output {out}: exists; pass --force to replace it"


@pytest.mark.slow
@pytest.mark.parametrize("which", [pytest.param("random", marks=pytest.mark.exhaustive), "trained"])
def test_base_onnx_matches_tf_and_float64(which, request, tmp_path):
    savedmodel = request.getfixturevalue("base_savedmodel" if which == "random" else "base_trained_savedmodel")
    h5 = request.getfixturevalue("base_h5" if which == "random" else "base_trained_h5")
    cases = [dict(batch=3, seq_length=128, all_padding_row=True), dict(batch=1, seq_length=512)]
    cfg = engine.load(h5).config
    inputs = [random_inputs(cfg, case, seed=100 + seed) for seed, case in enumerate(cases)]
    # TF's outputs first, from a process of its own (tests/isolated.call): its model and buffers are
    # gone before ONNX Runtime's session and the engines take their memory
    theirs = [isolated.call(tf_outputs, savedmodel, x) for x in inputs]
    session = _session(export_onnx(h5, str(tmp_path / "base.onnx"), mlm=True))
    for case, x, t in zip(cases, inputs, theirs, strict=True):
        _judge(session, savedmodel, h5, x, f"base {which} {case}", apart=which == "trained", theirs=t)


def test_a_small_real_change_fails(tiny_savedmodel, tiny_h5, tmp_path):
    """The verdict has teeth on the ONNX side too: the last layer norm's gamma moved by 1e-4
    (relative) in the exported graph must FAIL against TF and float64."""
    import weights
    from weights.export_onnx import build_model
    loaded = weights.load(tiny_h5)
    name = f"layers/{loaded.config.num_layers - 1}/feedforward_layer_norm/gamma"
    loaded.tensors[name] = loaded.tensors[name] * np.float32(1 + 1e-4)
    path = str(tmp_path / "changed.onnx")
    onnx.save_model(build_model(loaded, mlm=True), path)
    inputs = random_inputs(loaded.config, dict(batch=2, seq_length=64), seed=7)
    with pytest.raises(AssertionError, match="sequence_output"):
        _judge(_session(path), tiny_savedmodel, tiny_h5, inputs, "tiny random, gamma x (1 + 1e-4)", apart=False)
