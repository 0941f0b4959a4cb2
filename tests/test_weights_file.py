"""The HDF5 weights file itself: the atomic writer (weights.write) and the validating loader (weights.load),
on small files written here (no TensorFlow); the progress line the extractor shows."""

import io
import os
import sys

import h5py
import numpy as np
import pytest

from weights import WeightsFileError, format as fmt, load
from weights import write as weights_write

SMALL = dict(L=3, H=8, N=2, D=4, I=16, V=12, P=16, T=2)
SMALL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "##s", "héllo", "日本", "naïve", "a b", "!"]


# ----------------------------------------------------------------------------------------------
# The write: never a half file, never a silent replacement.

def small_config(**over):
    s = dict(SMALL, **over)
    return fmt.ModelConfig(num_layers=s["L"], hidden_size=s["H"], num_heads=s["N"], head_size=s["D"],
                           intermediate_size=s["I"], vocab_size=s["V"], max_position_embeddings=s["P"],
                           type_vocab_size=s["T"])


def small_tensors(config, seed=0):
    rng = np.random.default_rng(seed)
    return {p: rng.normal(0, 1, shape).astype(np.float32) for p, shape in fmt.expected_shapes(config).items()}


def write_small(path, seed=0, **kwargs):
    """A small weights file at `path` through weights.write.write_weights; (config, tensors)."""
    config = small_config()
    tensors = small_tensors(config, seed)
    kwargs.setdefault("vocab", SMALL_VOCAB)
    weights_write.write_weights(str(path), config, tensors, **kwargs)
    return config, tensors


def test_refuses_to_replace_without_force(tmp_path):
    out = tmp_path / "out.h5"
    write_small(out)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"out\.h5 exists; pass --force to replace it"):
        write_small(out, seed=1)
    assert out.read_bytes() == before
    write_small(out, seed=1, force=True)   # with force, replaced through the same atomic path
    assert out.read_bytes() != before and os.listdir(tmp_path) == ["out.h5"]
    with pytest.raises(weights_write.WeightsWriteError, match="is a folder"):
        write_small(tmp_path, force=True)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError, OSError])
@pytest.mark.parametrize("old", [True, False], ids=["old-output", "no-output"])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, exc, old):
    out = tmp_path / "out.h5"
    if old:
        write_small(out)
    before = out.read_bytes() if old else None
    original = weights_write.write_dataset
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 30:
            raise exc("halfway")
        return original(*args, **kwargs)

    monkeypatch.setattr(weights_write, "write_dataset", flaky)
    with pytest.raises(exc, match="halfway"):
        write_small(out, seed=2, force=True)
    assert len(calls) == 30
    assert os.listdir(tmp_path) == (["out.h5"] if old else [])
    if old:
        assert out.read_bytes() == before


def test_write_weights_checks_its_input(tmp_path):
    config = small_config()
    tensors = small_tensors(config)
    tensors["layers/0/attention/query/kernel"] = tensors["layers/0/attention/query/kernel"][..., :3]
    del tensors["pooler/bias"]
    tensors["extra"] = np.zeros(3, np.float32)
    with pytest.raises(weights_write.WeightsWriteError) as info:
        weights_write.write_weights(str(tmp_path / "x.h5"), config, tensors)
    msg = str(info.value)
    assert "missing: pooler/bias" in msg and "unexpected: extra" in msg
    assert "layers/0/attention/query/kernel has shape (8, 2, 3), expected (8, 2, 4)" in msg
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# The loader: every failure is a WeightsFileError naming the file (and the dataset).

@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "model.h5"
    config, tensors = write_small(path, provenance={"source_path": "/nowhere", "extractor": "test"})
    return path, config, tensors


def test_load_small_file(small_file):
    path, config, tensors = small_file
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


def test_load_truncated(small_file):
    path, _, _ = small_file
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


def test_load_flipped_bytes(small_file):
    path, _, tensors = small_file
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


def test_load_wrong_shape(small_file):
    path, _, _ = small_file
    _rewrite(path, "layers/2/attention/query/kernel", np.ones((8, 2, 3), np.float32))
    assert _load_error(path) == (f"{path}: dataset layers/2/attention/query/kernel has shape (8, 2, 3), "
                                 f"expected (8, 2, 4)")


def test_load_wrong_dtype(small_file):
    path, _, tensors = small_file
    _rewrite(path, "pooler/bias", tensors["pooler/bias"].astype(np.float64))
    assert _load_error(path) == f"{path}: dataset pooler/bias has dtype float64, expected float32"


def test_load_nan(small_file):
    path, _, _ = small_file
    with h5py.File(path, "r+") as f:
        f["layers/0/feedforward/output/bias"][5] = np.nan
    msg = _load_error(path)
    assert msg == f"{path}: dataset layers/0/feedforward/output/bias has 1 non-finite values (NaN/inf), first at (5,)"


def test_load_missing_and_unexpected_datasets(small_file):
    path, _, _ = small_file
    with h5py.File(path, "r+") as f:
        del f["mlm/output_bias"]
        f["layers/3/attention/query/kernel"] = np.ones((8, 2, 4), np.float32)
    msg = _load_error(path)
    assert msg.startswith(f"{path}: 2 problems:")
    assert "dataset mlm/output_bias is missing (expected shape (12,))" in msg
    assert "dataset layers/3/attention/query/kernel is unexpected" in msg


@pytest.mark.parametrize("attr, value, expected", [
    ("format", "something-else", "format is 'something-else', expected 'talkheads-ggelu-bert'"),
    ("format_version", 3, "format_version 3 (written by a newer version of this project)"),
    ("num_heads", 3, "inconsistent config attributes"),
    ("hidden_size", 8.5, "config attribute 'hidden_size' = 8.5 is not an integer"),
    ("has_mlm", None, "config attribute 'has_mlm' is missing"),
    ("format", None, "no 'format' attribute"),
    ("hidden_activation", "relu", "hidden_activation 'relu' is not supported; choose from ['gelu_tanh', 'gelu_erf']"),
    ("attention", "linear", "attention 'linear' is not supported; choose from ['talking_heads', 'multi_head']"),
    ("max_seq_length", 10**6, "max_seq_length must be 0 or at most max_position_embeddings"),
])
def test_load_bad_attributes(small_file, attr, value, expected):
    path, _, _ = small_file
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


def test_load_no_permission(small_file, monkeypatch):
    path, _, _ = small_file
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



# ----------------------------------------------------------------------------------------------
# The progress line of long reads and writes.

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
