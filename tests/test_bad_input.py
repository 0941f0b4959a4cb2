"""Bad input, broken files: every public entry point either works exactly as TensorFlow
does or raises one clear error naming the input (or file and dataset) and the problem; never a NaN,
never a traceback from deep inside NumPy. docs/bad-input.md lists what each case gets.

Entry points: Encoder.__call__, .mlm, .trace, the fast path, the Preprocessor, engine.load and the
CLI. Streaming/resume of `encode` is in tests/test_stream.py; the loader's own cases (truncated,
flipped bytes, wrong shape/dtype, NaN, ...) are in tests/test_extract.py and are not repeated here:
this file drives them through engine.load and `python -m engine`.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import pytest

import engine
from engine.core.inputs import InputError
from tests.conftest import REPO
from weights.format import ModelConfig, expected_shapes

CFG = ModelConfig(num_layers=1, hidden_size=8, num_heads=2, head_size=4, intermediate_size=16,
                  vocab_size=20, max_position_embeddings=8, type_vocab_size=2)
IDS = np.array([[1, 5, 7, 2], [1, 9, 2, 0]], np.int32)
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int32)
TYPES = np.array([[0, 0, 1, 1], [0, 0, 0, 0]], np.int32)
POS = np.array([[1], [2]], np.int32)


def _tensors(config, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * 0.2).astype(np.float32) for k, s in expected_shapes(config).items()}


@pytest.fixture(scope="module")
def encoders():
    tensors = _tensors(CFG)
    return {"call": engine.Encoder(CFG, tensors), "fast": engine.Encoder(CFG, tensors, fast=True)}


def good(**changes):
    d = {"input_word_ids": IDS, "input_mask": MASK, "input_type_ids": TYPES}
    d.update(changes)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()
ALL = ("input_word_ids", "input_mask", "input_type_ids")

# (case id, inputs, what the message must contain); the name of the input always comes first.
CASES = [
    ("id >= vocab", good(input_word_ids=IDS + 20), "input_word_ids: values must be in [0, 20)"),
    ("id < 0", good(input_word_ids=-IDS), "input_word_ids: values must be in [0, 20)"),
    ("type id >= type vocab", good(input_type_ids=TYPES + 1), "input_type_ids: values must be in [0, 2)"),
    ("type id < 0", good(input_type_ids=TYPES - 1), "input_type_ids: values must be in [0, 2)"),
    ("mask 2", good(input_mask=MASK * 2), "input_mask: values must be 0 or 1, found [2]"),
    ("mask -1", good(input_mask=-MASK), "input_mask: values must be 0 or 1, found [-1]"),
    ("mask shape", good(input_mask=MASK[:, :3]), "input_mask: shape (2, 3) differs from input_word_ids (2, 4)"),
    ("types shape", good(input_type_ids=TYPES[:1]), "input_type_ids: shape (1, 4) differs"),
    ("float ids", good(input_word_ids=IDS.astype(np.float32)), "input_word_ids: dtype float32 is not accepted"),
    ("float mask", good(input_mask=MASK.astype(np.float64)), "input_mask: dtype float64 is not accepted"),
    ("bool mask", good(input_mask=MASK.astype(bool)), "input_mask: dtype bool is not accepted"),
    ("string ids", good(input_word_ids=IDS.astype(str)), "input_word_ids: dtype <U"),
    ("bytes ids", good(input_word_ids=b"\x01\x02"), "input_word_ids: dtype |S2 is not accepted"),
    ("complex ids", good(input_word_ids=IDS.astype(complex)), "input_word_ids: dtype complex128"),
    ("None ids", good(input_word_ids=None), "input_word_ids: cannot be read as a rectangular integer array"),
    ("ragged ids", good(input_word_ids=[[1, 2, 3, 4], [1, 2]]), "input_word_ids: cannot be read as a rectangular"),
    ("mixed ids", good(input_word_ids=[[1, "a", 2, 3], [1, 2, 3, 4]]), "input_word_ids: dtype <U"),
    ("huge python int", good(input_word_ids=[[2**70, 1, 1, 1], [1, 1, 1, 1]]),
     "input_word_ids: values outside the int64 range, found [1180591620717411303424]"),
    ("uint64 huge", good(input_word_ids=np.array(IDS, np.uint64) + np.uint64(2**63)),
     "input_word_ids: values must be in [0, 20)"),
    ("1-D ids", good(input_word_ids=IDS[0]), "input_word_ids: expected a 2-D array [batch, length], got shape (4,)"),
    ("3-D ids", good(input_word_ids=IDS[None]), "input_word_ids: expected a 2-D array"),
    ("scalar ids", good(input_word_ids=3), "input_word_ids: expected a 2-D array [batch, length], got shape ()"),
    ("empty batch", {k: np.zeros((0, 4), np.int32) for k in ALL}, "input_word_ids: the batch is empty"),
    ("empty lists", {k: [] for k in ALL}, "input_word_ids: expected a 2-D array"),
    ("sequence length 0", {k: np.zeros((2, 0), np.int32) for k in ALL}, "input_word_ids: sequence length is 0"),
    ("longer than positions", {k: np.ones((1, 9), np.int32) for k in ALL},
     "input_word_ids: sequence length 9 exceeds the model's 8 positions"),
    ("missing key", good(input_mask=_DROP), "inputs: missing input_mask"),
    ("extra key", good(foo=IDS), "inputs: unexpected foo"),
    ("not a dict", [IDS, MASK, TYPES], "inputs: expected a dict"),
    ("None inputs", None, "inputs: expected a dict"),
]
MLM_CASES = [
    ("position >= S", [[1], [4]], "masked_lm_positions: values must be in [0, 4) (positions in the sequence), found [4]"),
    ("position < 0", [[-1], [2]], "masked_lm_positions: values must be in [0, 4)"),
    ("positions batch", [[1]], "masked_lm_positions: batch 1 differs from input_word_ids batch 2"),
    ("positions 1-D", [1, 2], "masked_lm_positions: expected a 2-D array"),
    ("float positions", np.array([[1.0], [2.0]]), "masked_lm_positions: dtype float64 is not accepted"),
    ("missing positions", _DROP, "inputs: missing masked_lm_positions"),
]
def _assert_clear(info, needle):
    """One InputError (a ValueError) with the message, raised from engine/core/inputs.py, not NumPy."""
    assert isinstance(info.value, ValueError)
    assert info.type is InputError, info.value
    msg = str(info.value)
    assert needle in msg, msg
    assert "\n" not in msg
    assert info.traceback[-1].path.name == "inputs.py", info.traceback[-1]


@pytest.mark.parametrize("entry", ["call", "fast", "mlm", "trace"])
@pytest.mark.parametrize("case, inputs, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_encoder_inputs(encoders, entry, case, inputs, needle):
    if entry == "mlm" and isinstance(inputs, dict):  # every other check comes before the positions'
        inputs = dict(inputs, masked_lm_positions=np.zeros((2, 1), np.int32))
    call = {"call": lambda x: encoders["call"](x), "fast": lambda x: encoders["fast"](x),
            "mlm": lambda x: encoders["call"].mlm(x), "trace": lambda x: encoders["call"].trace(x)}[entry]
    with pytest.raises(InputError) as info:
        call(inputs)
    _assert_clear(info, needle)


@pytest.mark.parametrize("entry", ["mlm", "trace"])
@pytest.mark.parametrize("case, positions, needle", MLM_CASES, ids=[c[0] for c in MLM_CASES])
def test_bad_masked_lm_positions(encoders, entry, case, positions, needle):
    enc = encoders["call"]
    if entry == "trace" and case == "missing positions":
        assert enc.trace(good())["mlm/logits"].shape == (2, 4, CFG.vocab_size)  # trace takes every position
        return
    inputs = good(masked_lm_positions=positions)
    with pytest.raises(InputError) as info:
        enc.mlm(inputs) if entry == "mlm" else enc.trace(inputs)
    _assert_clear(info, needle)


def test_zero_masked_positions_and_all_padding_rows_work(encoders):
    enc = encoders["call"]
    out = enc.mlm(good(masked_lm_positions=np.zeros((2, 0), np.int32)))
    assert out["mlm_logits"].shape == (2, 0, CFG.vocab_size)            # as TF: [B, 0, V]
    padded = good(input_mask=np.zeros_like(MASK))                        # every row all padding
    for e in (encoders["call"], encoders["fast"]):
        o = e(padded)
        assert all(np.isfinite(v).all() for v in (o["pooled_output"], o["sequence_output"]))


def test_inputs_are_not_modified_and_cupy_is_not_needed(encoders):
    inputs = {k: v.copy() for k, v in good().items()}
    encoders["call"](inputs)
    encoders["fast"](inputs)
    assert all(np.array_equal(inputs[k], v) for k, v in good().items())
    if "cupy" not in sys.modules:
        with pytest.raises(engine.BackendError, match="backend 'cupy' needs CuPy"):
            engine.Encoder(CFG, _tensors(CFG), backend="cupy")
        assert "cupy" not in sys.modules


# ----------------------------------------------------------------------------------------------
# The layouts and integer dtypes TF's callers use: same numbers as int32 C-contiguous, and as TF.

def _variants(inputs):
    ids, mask, types, pos = (inputs[k] for k in ("input_word_ids", "input_mask", "input_type_ids",
                                                   "masked_lm_positions"))

    def readonly(a):
        a = a.copy()
        a.setflags(write=False)
        return a

    def strided(a):
        big = np.zeros((a.shape[0], 2 * a.shape[1]), a.dtype)
        big[:, ::2] = a
        return big[:, ::2]

    yield "int64", dict(input_word_ids=ids.astype(np.int64), input_mask=mask.astype(np.int64),
                        input_type_ids=types.astype(np.int64), masked_lm_positions=pos.astype(np.int64))
    yield "uint16/uint8/int16", dict(input_word_ids=ids.astype(np.uint16), input_mask=mask.astype(np.uint8),
                                     input_type_ids=types.astype(np.int16), masked_lm_positions=pos.astype(np.uint8))
    yield "nested lists", {k: v.tolist() for k, v in inputs.items()}
    yield "tuples", {k: tuple(map(tuple, v.tolist())) for k, v in inputs.items()}
    yield "Fortran order", {k: np.asfortranarray(v) for k, v in inputs.items()}
    yield "strided views", {k: strided(v) for k, v in inputs.items()}
    yield "read-only", {k: readonly(v) for k, v in inputs.items()}
    yield "transposed twice", {k: np.ascontiguousarray(v.T).T for k, v in inputs.items()}
    zeros = np.broadcast_to(np.int32(0), types.shape)  # zero strides, read-only
    yield "broadcast type ids", dict(inputs, input_type_ids=zeros)


def test_layouts_and_integer_dtypes_work_as_tf(tiny_h5, tiny_savedmodel):
    from engine.tools import parity
    from engine.tf import reference
    enc = engine.load(tiny_h5)
    fast = engine.load(tiny_h5, fast=True)
    rng = np.random.default_rng(3)
    inputs = parity.random_inputs(rng, 3, 16, enc.config.vocab_size, all_padding_row=True, num_positions=2)
    inputs["input_word_ids"] %= 256        # so that the uint8 variant could hold them too
    inputs["input_type_ids"][:] = 0        # the broadcast variant's type ids are all 0
    theirs = reference.run_savedmodel(tiny_savedmodel, inputs)
    ours = engine.to_numpy(enc.mlm(inputs))
    assert all(d.ok for d in parity.compare(ours, theirs, 1e-5))   # tiny: pooled_output too (measured <= 1.2e-6)
    base_fast = fast({k: v for k, v in inputs.items() if k != "masked_lm_positions"})
    for name, variant in _variants(inputs):
        got = enc.mlm(variant)
        for key in ("mlm_logits", "pooled_output", "sequence_output"):
            assert np.array_equal(got[key], ours[key]), (name, key)   # the very same numbers
        enc_only = {k: v for k, v in variant.items() if k != "masked_lm_positions"}
        assert np.array_equal(enc(enc_only)["pooled_output"], ours["pooled_output"]), name
        assert np.array_equal(fast(enc_only)["sequence_output"], base_fast["sequence_output"]), name
        assert np.isfinite(got["mlm_logits"]).all()


# ----------------------------------------------------------------------------------------------
# The Preprocessor: TypeError/ValueError naming the argument (engine/text/preprocess.py).

@pytest.fixture(scope="module")
def prep(tiny_h5):
    from engine.text.preprocess import Preprocessor
    return Preprocessor(engine.load(tiny_h5).vocab, max_seq_length=512)


@pytest.mark.parametrize("call, error, needle", [
    (lambda p: p(None), TypeError, "texts must be a str or a list of str, got NoneType"),
    (lambda p: p({"a": 1}), TypeError, "texts must be a str or a list of str, got dict"),
    (lambda p: p(["ok", 1]), TypeError, "texts[1] must be a str (or UTF-8 bytes), got int"),
    (lambda p: p(np.array([["a", "b"]])), ValueError, "texts must be one-dimensional"),
    (lambda p: p([b"ok", b"\xff\xfe"]), ValueError, "texts[1] is not valid UTF-8"),
    (lambda p: p(["\ud800"]), ValueError, "texts[0] is not valid Unicode text"),
    (lambda p: p(["a"], seq_length=1), ValueError, "seq_length must be at least 2"),
    (lambda p: p(["a"], seq_length=True), TypeError, "seq_length must be an integer, got bool"),
    (lambda p: p(["a"], seq_length=2.5), TypeError, "seq_length must be an integer, got float"),
    (lambda p: p(["a"], seq_length=513), ValueError, "seq_length 513 exceeds the model's 512 positions"),
    (lambda p: p.bert_pack_inputs([[[1]], [[2]], [[3]]]), ValueError, "packs one or two segments, got 3"),
    (lambda p: p.bert_pack_inputs([[[1]], [[2], [3]]]), ValueError, "different batch sizes (1 and 2)"),
    (lambda p: p.bert_pack_inputs([[[1.5]]]), TypeError, "segments[0][0] must hold integer token ids"),
    (lambda p: p.bert_pack_inputs([[[2**40]]]), ValueError, "segments[0][0] has ids outside int32"),
])
def test_bad_preprocessor_inputs(prep, call, error, needle):
    with pytest.raises(error) as info:
        call(prep)
    assert needle in str(info.value), str(info.value)
    assert info.traceback[-1].path.name == "preprocess.py"


def test_preprocessor_edge_inputs_work(prep, tiny_h5):
    assert prep([])["input_word_ids"].shape == (0, 128)                  # as TF: an empty batch
    out = prep(["", "a\x00b"], seq_length=8)                             # empty text: [CLS] [SEP]
    assert out["input_word_ids"][0, :3].tolist() == [101, 102, 0]
    # Packing does not look ids up (nor does TF's): the encoder is where out-of-vocab ids are refused.
    packed = prep.bert_pack_inputs([[[40000]]], seq_length=4)
    with pytest.raises(InputError, match=r"input_word_ids: values must be in \[0, 30522\)"):
        engine.load(tiny_h5)(packed)


# ----------------------------------------------------------------------------------------------
# Broken weight files through engine.load and `python -m engine encode` (exit 2, one line naming
# the file and the dataset). The loader's own cases are in tests/test_extract.py; extraction onto
# an existing file without --force and a killed extraction are test_extract.py's
# test_refuses_to_replace_without_force and test_killed_extraction_leaves_old_output_intact.

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", ".",
         ",", "##s", "is", "hello", "world", "b", "c"]
GATE = "layers/0/feedforward/gate/kernel"


def _write_weights(path):
    from weights.write import write_weights
    write_weights(str(path), CFG, _tensors(CFG), vocab=VOCAB)
    return path


def _flip(path, dataset, element, byte, bits, how="xor"):
    """Flips (xor) or sets (or) bits of one byte of a float32 element, in the file's bytes."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset + 4 * element + byte)
        value = f.read(1)[0]
        f.seek(offset + 4 * element + byte)
        f.write(bytes([value ^ bits if how == "xor" else value | bits]))


def _rewrite(path, name, data):
    with h5py.File(path, "r+") as f:
        attrs = dict(f[name].attrs)
        del f[name]
        f.create_dataset(name, data=data).attrs.update(attrs)


def _break(kind, path):
    """Breaks the weight file at `path`; returns (the path to load, what the message must say)."""
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        return path, "truncated"
    if kind == "flipped mantissa bit":       # plausible value: only the checksum sees it
        _flip(path, GATE, 37, 0, 0x01)
        return path, f"dataset {GATE} fails its sha256 checksum (corrupt data)"
    if kind == "flipped exponent bits":      # becomes inf/NaN
        _flip(path, GATE, 5, 3, 0x7F, "or")    # every exponent bit set: inf or NaN
        _flip(path, GATE, 5, 2, 0x80, "or")
        return path, f"dataset {GATE} has 1 non-finite values (NaN/inf), first at (0, 5)"
    if kind == "missing dataset":
        with h5py.File(path, "r+") as f:
            del f["pooler/bias"]
        return path, "dataset pooler/bias is missing (expected shape (8,))"
    if kind == "wrong layout":
        _rewrite(path, "layers/0/attention/output/kernel", np.ones((8, 2, 4), np.float32))
        return path, "dataset layers/0/attention/output/kernel has shape (8, 2, 4), expected (2, 4, 8)"
    if kind == "wrong dtype":
        with h5py.File(path, "r") as f:
            data = f["pooler/bias"][()]
        _rewrite(path, "pooler/bias", data.astype(np.float16))
        return path, "dataset pooler/bias has dtype float16, expected float32"
    if kind == "NaN weights":
        with h5py.File(path, "r+") as f:
            f["embeddings/word"][3, 2] = np.nan
        return path, "dataset embeddings/word has 1 non-finite values (NaN/inf), first at (3, 2)"
    if kind == "not HDF5":
        path.write_text("this is a vocab.txt, not weights\n" * 50)
        return path, "not an HDF5 file (no HDF5 signature)"
    if kind == "directory":
        return path.parent, "is a directory, not an HDF5 weight file"
    if kind == "missing file":
        return path.with_name("nope.h5"), "no such file"
    raise AssertionError(kind)


FILE_CASES = ["truncated", "flipped mantissa bit", "flipped exponent bits", "missing dataset", "wrong layout",
              "wrong dtype", "NaN weights", "not HDF5", "directory", "missing file"]


def _cli(*args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, **kwargs)


def _one_error_line(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("kind", FILE_CASES)
def test_broken_weights_through_engine_load_and_the_cli(kind, tmp_path):
    from weights import WeightsFileError
    (tmp_path / "w").mkdir()
    path, needle = _break(kind, _write_weights(tmp_path / "w" / "model.h5"))
    if kind == "flipped mantissa bit":       # engine.load checks checksums only when asked...
        assert np.isfinite(engine.load(path).word_table).all()
        with pytest.raises(WeightsFileError) as info:
            engine.load(path, verify_checksums=True)
    else:
        with pytest.raises(WeightsFileError) as info:
            engine.load(path)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == f"{path}: {needle}" or (str(info.value).startswith(f"{path}: ") and
                                                      needle in str(info.value)), str(info.value)
    out = tmp_path / "out.npy"
    line = _one_error_line(_cli("encode", "--weights", str(path), "hello world", "--output", str(out)))
    assert str(path) in line and needle in line, line            # ...encode always does
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_unreadable_weights_through_the_cli(tmp_path):
    """No permission: we run as root, who reads anything, so the CLI runs without CAP_DAC_OVERRIDE."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop the capabilities that bypass file permissions")
    folder = tempfile.mkdtemp(prefix="talkheads-perm-")
    try:
        os.chmod(folder, 0o755)
        path = _write_weights(type(tmp_path)(folder) / "model.h5")
        os.chmod(path, 0)
        drop = "-dac_override,-dac_read_search"   # root without the capabilities that bypass permissions
        proc = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-m",
                               "engine", "encode", "--weights", str(path), "hello", "--output",
                               os.path.join(folder, "o.npy")], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        line = _one_error_line(proc)
        assert line == f"error: --weights {path}: permission denied (cannot read the file)", line
    finally:
        shutil.rmtree(folder)


def test_a_good_small_file_encodes(tmp_path):
    path = _write_weights(tmp_path / "model.h5")
    proc = _cli("encode", "--weights", str(path), "the cat sat", "hello world", "--output", str(tmp_path / "o.npy"),
                "--seq-length", "8")
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "o.npy").shape == (2, 8)


@pytest.mark.parametrize("args, needle", [
    (["--input", "{tmp}/missing.txt"], "--input {tmp}/missing.txt: No such file or directory"),
    (["--input", "{tmp}"], "--input {tmp}: is a directory"),
    (["--input", "{tmp}/bad_utf8.txt"], "--input {tmp}/bad_utf8.txt: line 2 is not valid UTF-8"),
    (["--input", "{tmp}/empty.txt"], "no text given: the input is empty"),
    (["hi", "--seq-length", "1"], "--seq-length must be at least 2"),
    (["hi", "--seq-length", "9"], "--seq-length 9 exceeds the model's 8 positions"),
    (["hi", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["hi", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["hi", "--resume", "--force"], "--resume and --force exclude each other"),
    ([], "no text given"),
    (["hi", "--output", "{tmp}/o.csv"], "unknown extension '.csv'"),
    (["hi", "--output", "{tmp}/nodir/o.npy"], "does not exist"),
    (["hi", "--seq-length", "1"], "--seq-length must be at least 2"),
])
def test_bad_encode_arguments(tmp_path, args, needle, capsys):
    from engine.cli import main as cli
    (tmp_path / "bad_utf8.txt").write_bytes(b"fine\nbad \xff byte\nfine\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    weights = _write_weights(tmp_path / "model.h5")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "o.npy")]
    if "--seq-length" not in args:
        args += ["--seq-length", "8"]
    assert cli.main(["encode", "--weights", str(weights), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle.format(tmp=tmp_path) in err[0], err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o.") or ".partial" in p]


@pytest.mark.parametrize("ids, needle", [
    ("[[1, 5, 25]]", "input_word_ids: values must be in [0, 20)"),
    ("[[1, 5], [1]]", "--ids:"),
    ("not json", "--ids: not JSON"),
    ('{"input_word_ids": [[1, 2]], "input_mask": [[1, 2]]}', "input_mask: values must be 0 or 1"),
    ('{"input_word_ids": [[1, 2, 3, 4, 5, 6, 7, 8, 9]]}', "sequence length 9 exceeds the model's 8 positions"),
])
def test_bad_trace_ids_through_the_cli(tmp_path, ids, needle, capsys):
    from engine.cli import main as cli
    weights = _write_weights(tmp_path / "model.h5")
    assert cli.main(["trace", "--weights", str(weights), "--ids", ids, "--output", str(tmp_path / "t.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "t.h5").exists()
