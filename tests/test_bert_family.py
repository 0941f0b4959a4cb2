"""The model family without TensorFlow: standard BERT (multi-head attention, a dense feed-forward,
the tanh or the erf GELU) on every CPU path, held to the readable float64 model, to finite
differences, and to the talking-heads GEGLU block it is a special case of. (Against the code of
others: tests/test_hub_bert.py runs Model Garden's BertEncoder, tests/test_real_models.py Hugging
Face transformers.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import engine
from engine.core import trace as trace_mod
from weights.format import GATE_TENSORS, MIXING_TENSORS, ModelConfig, block_tensor_names, split_block_path
from weights.write import write_weights

from tests.random_weights import random_tensors

TINY = dict(num_layers=2, hidden_size=32, num_heads=4, head_size=8, intermediate_size=48, vocab_size=50,
            max_position_embeddings=24, type_vocab_size=2)


def _config(attention="multi_head", feed_forward="dense", activation="gelu_erf", **kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw}, attention=attention, feed_forward=feed_forward, hidden_activation=activation)


def _inputs(cfg, batch=3, seq=11, seed=0, positions=4):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, (batch, seq), dtype=np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[1, 7:] = 0                                           # one padded row
    types = (np.arange(seq)[None, :] >= seq // 2).astype(np.int32).repeat(batch, 0)
    pos = np.sort(rng.choice(np.arange(1, 7), (batch, positions)), axis=1).astype(np.int32)
    return {"input_word_ids": ids, "input_mask": mask, "input_type_ids": types, "masked_lm_positions": pos}


def _file(tmp_path, cfg, seed=0, name="model.h5", tensors=None):
    path = str(tmp_path / name)
    write_weights(path, cfg, tensors if tensors is not None else random_tensors(cfg, seed))
    return path


def test_standard_bert_file_has_no_mixing_or_gate_tensors():
    names = block_tensor_names(_config())
    assert not set(MIXING_TENSORS) & set(names) and not set(GATE_TENSORS) & set(names)
    assert set(block_tensor_names(_config("talking_heads", "geglu", "gelu_tanh"))) >= set(MIXING_TENSORS + GATE_TENSORS)
    enc = engine.Encoder(_config(), random_tensors(_config()))
    assert enc.blocks[0].attention.pre_softmax_weight is None and enc.blocks[0].feedforward.gate_kernel is None


def test_standard_bert_is_talking_heads_geglu_with_identity_mixing_and_a_unit_gate(tmp_path):
    """Standard BERT is the special case: W_pre = W_post = I, gate kernel 0 and gate bias 1 give the
    same function. Both readable models in float64 agree to rounding."""
    for activation in ("gelu_tanh", "gelu_erf"):
        standard = _config(activation=activation)
        general = _config("talking_heads", "geglu", activation)
        tensors = random_tensors(standard, seed=3)
        degenerate = dict(tensors)
        for i in range(standard.num_layers):
            N, I, H = standard.num_heads, standard.intermediate_size, standard.hidden_size
            degenerate[f"layers/{i}/attention/pre_softmax_weight"] = np.eye(N, dtype=np.float32)
            degenerate[f"layers/{i}/attention/post_softmax_weight"] = np.eye(N, dtype=np.float32)
            degenerate[f"layers/{i}/feedforward/gate/kernel"] = np.zeros((H, I), np.float32)
            degenerate[f"layers/{i}/feedforward/gate/bias"] = np.ones(I, np.float32)
        inputs = _inputs(standard)
        a = engine.Encoder(standard, tensors, dtype="float64").mlm(inputs)
        b = engine.Encoder(general, degenerate, dtype="float64").mlm(inputs)
        for name in ("sequence_output", "pooled_output", "mlm_logits"):
            diff = np.abs(a[name] - b[name]).max()
            print(f"{activation} {name}: max |standard - degenerate talking-heads| = {diff:.2e}")
            assert diff <= 1e-12 * max(1.0, np.abs(a[name]).max())
        c = engine.Encoder(general, tensors | {k: v for k, v in degenerate.items() if k not in tensors},
                           dtype="float64").mlm(inputs)
        assert np.array_equal(b["mlm_logits"], c["mlm_logits"])


@pytest.mark.parametrize("family", [("multi_head", "dense", "gelu_erf"), ("multi_head", "dense", "gelu_tanh"),
                                    ("talking_heads", "dense", "gelu_erf"), ("multi_head", "geglu", "gelu_erf")])
@pytest.mark.parametrize("fused", [True, False])
def test_fast_path_matches_the_readable_model(tmp_path, family, fused):
    """The fast twin on each family: its float32 error against the float64 readable model is of the
    size of the readable float32 model's own (both are float32 roundings of the same function)."""
    cfg = _config(*family)
    path = _file(tmp_path, cfg, seed=1)
    inputs = _inputs(cfg, batch=4, seq=13)
    truth = engine.load(path, dtype="float64").mlm(inputs)
    readable = engine.load(path).mlm(inputs)
    fast = engine.load(path, fast=True, fused=fused, threads=2)
    for skip in (False, True):
        got = fast.mlm(inputs, skip_padding=skip)
        for name in ("sequence_output", "pooled_output", "mlm_logits"):
            real = inputs["input_mask"].astype(bool) if name == "sequence_output" else slice(None)
            scale = np.abs(truth[name][real]).max()
            fast_err = np.abs(got[name][real] - truth[name][real]).max() / scale
            readable_err = np.abs(readable[name][real] - truth[name][real]).max() / scale
            print(f"{'+'.join(family)} fused={fused} skip={skip} {name}: fast {fast_err:.2e}, readable {readable_err:.2e}")
            assert fast_err <= 4 * readable_err + 2e-7


def test_tape_gradients_of_standard_bert_match_finite_differences(tmp_path):
    """Every weight's gradient of a standard BERT with the erf GELU, float64, against the central
    difference of the loss along a random direction of that weight."""
    cfg = _config()
    enc = engine.Encoder(cfg, random_tensors(cfg, seed=5), dtype="float64")
    inputs = _inputs(cfg, batch=2, seq=7)
    rng = np.random.default_rng(7)
    with enc.tape(inputs) as tape:
        cot = {"sequence_output": rng.standard_normal(tape.outputs["sequence_output"].shape),
               "pooled_output": rng.standard_normal(tape.outputs["pooled_output"].shape),
               "mlm_logits": rng.standard_normal(tape.outputs["mlm_logits"].shape)}
        grads = tape.gradient(cot)
    params = enc.parameters()
    assert set(grads) == set(params)

    def loss():
        out = enc.mlm(inputs)
        return sum(float(np.sum(cot[n] * out[n])) for n in cot)

    h, worst = 1e-6, 0.0
    for path, value in params.items():
        d = rng.standard_normal(value.shape)
        value += h * d
        plus = loss()
        value -= 2 * h * d
        minus = loss()
        value += h * d
        fd, analytic = (plus - minus) / (2 * h), float(np.sum(grads[path] * d))
        rel = abs(fd - analytic) / max(abs(fd), abs(analytic), 1e-8)
        worst = max(worst, rel)
        assert rel <= 1e-5, f"{path}: finite difference {fd:.8e}, tape {analytic:.8e}"
    print(f"{len(params)} weights: worst relative difference from finite differences {worst:.2e}")
    assert not any(split_block_path(p) and split_block_path(p)[1] in MIXING_TENSORS + GATE_TENSORS for p in grads)


def test_trace_of_standard_bert_has_its_own_steps(tmp_path):
    cfg = _config()
    trace = engine.Encoder(cfg, random_tensors(cfg)).trace(_inputs(cfg))
    expected = [name for name, _, _ in trace_mod.steps(cfg.num_layers, True, cfg)]
    assert trace.names() == expected
    assert "layers/0/mixed_scores" not in trace and "layers/0/geglu" not in trace
    assert len(expected) == len(trace_mod.steps(cfg.num_layers, True)) - 4 * cfg.num_layers


def test_old_files_read_as_talking_heads_geglu(tmp_path):
    """A file of format version 1 (no family or embedding attributes) loads with the defaults."""
    import h5py
    cfg = ModelConfig(**TINY)
    path = _file(tmp_path, cfg)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        for name in ("attention", "feed_forward", "pooling", "normalize", "max_seq_length"):
            del f.attrs[name]
    loaded = engine.load(path).config
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("family", [("multi_head", "dense", "gelu_erf"), ("talking_heads", "dense", "gelu_tanh"),
                                    ("multi_head", "geglu", "gelu_erf")])
def test_onnx_graph_of_the_family_matches_the_readable_model(tmp_path, family):
    """The ONNX twin (ONNX Runtime) has no mixing MatMul without mixing weights and no gate without a
    gate; its float32 error against the readable float64 model is of the readable float32 model's size."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from weights.export_onnx import export_onnx
    cfg = _config(*family)
    path = _file(tmp_path, cfg, seed=2)
    out = export_onnx(path, str(tmp_path / "m.onnx"), mlm=True)
    names = [n.name for n in onnx.load(out).graph.node]
    assert any("pre_softmax_mix" in n for n in names) == cfg.talking_heads
    assert any("feedforward/gate" in n for n in names) == cfg.gated
    assert any(n.endswith("/Erf") for n in names) == (cfg.hidden_activation == "gelu_erf")
    inputs = _inputs(cfg, batch=3, seq=9)
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {k: v.astype(np.int32) for k, v in inputs.items()})))
    truth = engine.load(path, dtype="float64").mlm(inputs)
    readable = engine.load(path).mlm(inputs)
    for name in ("sequence_output", "pooled_output", "mlm_logits"):
        scale = np.abs(truth[name]).max()
        onnx_err = np.abs(got[name] - truth[name]).max() / scale
        readable_err = np.abs(readable[name] - truth[name]).max() / scale
        print(f"{'+'.join(family)} {name}: onnxruntime {onnx_err:.2e}, readable {readable_err:.2e}")
        assert onnx_err <= 4 * readable_err + 2e-7


def test_the_fused_gpu_path_refuses_another_family_by_name():
    """The CUDA kernels compute talking-heads GEGLU blocks; another family is refused with the way
    out (checked with the kernels' NumPy twins, so without a GPU too)."""
    from engine.gpu import forward as gpu
    cfg = _config()
    with pytest.raises(ValueError, match=r"this model is multi_head\+dense\+gelu_erf: load it with gpu_path='plain'"):
        gpu.GpuForward(engine.Encoder(cfg, random_tensors(cfg)), ops="numpy")
