"""The two checkpoint readers of import-hf, on files written here by hand (tests/hf_folders.py): a
safetensors file read from its spec, and a torch.save zip archive unpickled without torch, where a
pickle that asks for anything but a state dict's names is refused before it runs."""

import os
import pickle
import zipfile

import numpy as np
import pytest

from tests.hf_folders import BF16, safetensors_bytes, write_safetensors, write_torch_bin
from weights.safetensors_file import SafetensorsError, SafetensorsFile, bfloat16_to_float32
from weights.torch_checkpoint import TorchCheckpoint, TorchCheckpointError

RNG = np.random.default_rng(0)
F32 = RNG.standard_normal((3, 5)).astype(np.float32)


# ---------------------------------------------------------------------------------------- safetensors

def test_safetensors_reads_every_float_dtype_to_float32_and_integers_as_they_are(tmp_path):
    bf = BF16(RNG.standard_normal((4, 2)))
    path = write_safetensors(tmp_path / "m.safetensors", {
        "f32": F32, "f16": F32.astype(np.float16), "f64": F32.astype(np.float64), "bf16": bf,
        "ids": np.arange(6, dtype=np.int64)[None], "scalar": np.float32(2.5), "empty": np.zeros((0, 3), np.float32),
    }, metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        assert f.entries["f16"].dtype == "F16" and f.entries["ids"].shape == (1, 6)
        got = {name: f.read(name) for name in f.entries}
    assert got["f32"].dtype == np.float32 and np.array_equal(got["f32"], F32) and got["f32"].flags.c_contiguous
    assert np.array_equal(got["f16"], F32.astype(np.float16).astype(np.float32))
    assert np.array_equal(got["f64"], F32)
    assert got["bf16"].dtype == np.float32 and np.array_equal(got["bf16"], bf.values)   # exact: a float32 prefix
    assert got["ids"].dtype == np.int64 and got["ids"].tolist() == [list(range(6))]
    assert got["scalar"].shape == () and got["scalar"] == 2.5 and got["empty"].shape == (0, 3)


def test_bfloat16_shift_is_exact_for_special_values():
    values = np.array([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, 3.0e38, 1e-40], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(bfloat16_to_float32(bits).view(np.uint32), values.view(np.uint32) & 0xFFFF0000)


@pytest.mark.parametrize("name, build, message", [
    ("short", lambda: b"\x10\x00\x00", "truncated: 3 bytes"),
    ("header past the end", lambda: safetensors_bytes({"w": F32})[:40], "runs past the end of the file"),
    ("data cut", lambda: safetensors_bytes({"w": F32})[:-4],
     "tensor w: data_offsets [0, 60] run past the data (56 bytes"),
    ("not json", lambda: b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{", "the header is not UTF-8 JSON"),
    ("huge header", lambda: (2**40).to_bytes(8, "little") + b"{}", "header length 1099511627776 is over"),
    ("unknown dtype", lambda: safetensors_bytes({"w": F32}, edit=lambda h: h["w"].update(dtype="F12")),
     "tensor w: unknown dtype 'F12'"),
    ("span", lambda: safetensors_bytes({"w": F32}, edit=lambda h: h["w"].update(shape=[3, 4])),
     "tensor w: shape [3, 4] of F32 needs 48 bytes but data_offsets [0, 60] span 60"),
    ("overlap", lambda: safetensors_bytes({"a": F32, "b": F32}, edit=lambda h: h["b"].update(data_offsets=[40, 100])),
     "tensor b: its bytes overlap those of tensor a"),
    ("offsets", lambda: safetensors_bytes({"w": F32}, edit=lambda h: h["w"].update(data_offsets=[8, 4])),
     "tensor w: data_offsets [8, 4] is not [begin, end]"),
    ("shape", lambda: safetensors_bytes({"w": F32}, edit=lambda h: h["w"].update(shape=[-1, 15])),
     "tensor w: shape [-1, 15] is not a list of non-negative integers"),
])
def test_safetensors_refuses_each_malformed_file_in_one_line(tmp_path, name, build, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(build())
    with pytest.raises(SafetensorsError) as e:
        SafetensorsFile(str(path))
    assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------- torch

def test_torch_zip_archive_is_read_without_torch(tmp_path):
    tensors = {"w": F32, "t": RNG.standard_normal((4, 6)).astype(np.float32), "b1": F32[0].copy(), "b2": F32[1].copy(),
               "half": F32.astype(np.float16), "double": F32.astype(np.float64), "bf": BF16(F32),
               "ids": np.arange(5, dtype=np.int64)[None], "tied": F32.copy()}
    path = write_torch_bin(tmp_path / "pytorch_model.bin", tensors, transposed=("t",), tied=("tied", "w"))
    with TorchCheckpoint(path) as f:
        assert set(f.entries) == set(tensors)
        assert f.entries["t"].stride == (1, 4) and f.entries["b2"].offset == 5    # a strided view; a shared storage
        got = {name: f.read(name) for name in tensors}
    for name in ("w", "t", "b1", "b2", "tied"):
        assert got[name].dtype == np.float32 and got[name].flags.c_contiguous
        assert np.array_equal(got[name], tensors[name])
    assert np.array_equal(got["half"], F32.astype(np.float16).astype(np.float32)) and np.array_equal(got["double"], F32)
    assert np.array_equal(got["bf"], tensors["bf"].values) and got["ids"].dtype == np.int64


def test_torch_big_endian_archive(tmp_path):
    path = write_torch_bin(tmp_path / "be.bin", {"w": F32, "b": F32[0].copy()}, byteorder="big")
    with TorchCheckpoint(path) as f:
        assert np.array_equal(f.read("w"), F32) and np.array_equal(f.read("b"), F32[0])


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalCall:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload, named", [(lambda m: {"x": Evil(m)}, f"{os.system.__module__}.system"),
                                            (lambda m: [EvalCall()], "__builtin__.eval")])
def test_a_malicious_pickle_is_refused_by_name_and_nothing_runs(tmp_path, payload, named):
    marker = tmp_path / "pwned"
    path = write_torch_bin(tmp_path / "evil.bin", {}, pickled=pickle.dumps(payload(marker), protocol=2))
    with pytest.raises(TorchCheckpointError) as e:
        TorchCheckpoint(path)
    assert f"refuses to load: the pickle asks for {named}" in str(e.value), str(e.value)
    assert not marker.exists()


def test_torch_refusals(tmp_path):
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.rest")
    with pytest.raises(TorchCheckpointError, match="legacy format .* re-save it"):
        TorchCheckpoint(str(legacy))
    other = tmp_path / "other.bin"
    other.write_bytes(b"hello")
    with pytest.raises(TorchCheckpointError, match="not a PyTorch checkpoint"):
        TorchCheckpoint(str(other))
    not_dict = write_torch_bin(tmp_path / "list.bin", {}, pickled=pickle.dumps([1, 2], protocol=2))
    with pytest.raises(TorchCheckpointError, match="holds a list, not a state dict"):
        TorchCheckpoint(not_dict)
    no_tensor = write_torch_bin(tmp_path / "int.bin", {}, pickled=pickle.dumps({"step": 3}, protocol=2))
    with pytest.raises(TorchCheckpointError, match=r"not named tensors: 'step' \(int\)"):
        TorchCheckpoint(no_tensor)
    cut = tmp_path / "cut.bin"
    with zipfile.ZipFile(write_torch_bin(tmp_path / "ok.bin", {"w": F32})) as z:
        with zipfile.ZipFile(cut, "w") as out:
            for item in z.namelist():
                data = z.read(item)
                out.writestr(item, data[:-8] if item.endswith("data/0") else data)
    with TorchCheckpoint(str(cut)) as f:
        with pytest.raises(TorchCheckpointError, match="tensor w: its storage data/0 has 52"):
            f.read("w")
