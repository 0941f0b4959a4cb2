"""Reading a PyTorch state dict (`pytorch_model.bin`) with NumPy alone: no torch, and nothing of
the file is ever run.

The format torch.save writes (the zip format, torch >= 1.6): a zip archive whose entries sit under
one folder, `<archive>/data.pkl` (the pickled object), `<archive>/data/<key>` (each storage's raw
bytes) and `<archive>/byteorder` ("little" or "big"; absent in the oldest zip files, which are
little-endian). In data.pkl each tensor is `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, backward_hooks[, metadata])`, each storage a persistent id
("storage", torch.FloatStorage, key, location, numel), the dict a `collections.OrderedDict`.

    with TorchCheckpoint("pytorch_model.bin") as f:
        f.entries["bert.pooler.dense.weight"].shape    # from the pickle; no storage read yet
        kernel = f.read("bert.pooler.dense.weight")    # float32, C order

Why it is safe: a pickle is a program, and an ordinary unpickler runs whatever callable it names.
Here `find_class` answers only the few names a state dict needs, each with a function of this module
that builds a description (`TensorRef`), never the torch callable; any other name (os.system,
builtins.eval, torch's own functions) stops the load with an error naming it before anything runs.
Storages are read from the archive only when a tensor is read, and a tensor's offset, size and
stride are checked against its storage before NumPy views it.

The legacy format (torch < 1.6: a bare pickle stream, not a zip) is refused with a message saying
how to re-save it.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile

import numpy as np

from weights.safetensors_file import FLOAT_DTYPES, to_float32

# torch's storage classes -> (the safetensors dtype name, NumPy dtype of the stored bytes)
STORAGE_TYPES = {
    "FloatStorage": ("F32", "f4"), "HalfStorage": ("F16", "f2"), "BFloat16Storage": ("BF16", "u2"),
    "DoubleStorage": ("F64", "f8"), "LongStorage": ("I64", "i8"), "IntStorage": ("I32", "i4"),
    "ShortStorage": ("I16", "i2"), "CharStorage": ("I8", "i1"), "ByteStorage": ("U8", "u1"),
    "BoolStorage": ("BOOL", "?"),
}
NUMPY_DTYPES = dict(STORAGE_TYPES.values())   # dtype name -> NumPy dtype of the stored bytes
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"   # pickled magic number of torch < 1.6


class TorchCheckpointError(ValueError):
    """The file is not a state dict this reader can read safely; the message names the file and why."""


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stands for one torch storage class (torch.FloatStorage, ...): a name, never a callable."""
    name: str

    @property
    def dtype(self) -> str:
        return STORAGE_TYPES[self.name][0]


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """One storage of the archive: data/<key>, numel elements of dtype."""
    key: str
    dtype: str
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One tensor: a strided view of a storage, described, not yet read."""
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TorchCheckpointError(f"a tensor's {what} is {value!r}, not a tuple of integers")
    return value


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """What `torch._utils._rebuild_tensor_v2` stands for here: the tensor's description, checked."""
    if not isinstance(storage, StorageRef):
        raise TorchCheckpointError(f"a tensor's storage is {type(storage).__name__}, not a storage of the archive")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise TorchCheckpointError(f"a tensor's storage offset is {offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise TorchCheckpointError(f"a tensor's size {size} and stride {stride} do not fit together")
    return TensorRef(storage, offset, size, stride)


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """What `torch._utils._rebuild_parameter` stands for: a Parameter is its data."""
    if not isinstance(data, TensorRef):
        raise TorchCheckpointError(f"a parameter holds {type(data).__name__}, not a tensor")
    return data


# (module, name) -> what the unpickler gets instead: the only names a state dict needs.
ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): StorageType(name) for name in STORAGE_TYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED names and the archive's storages."""

    def __init__(self, data: bytes, path: str):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        found = ALLOWED.get((module, name))
        if found is None:
            raise TorchCheckpointError(f"{self.path}: refuses to load: the pickle asks for {module}.{name}, which a "
                                       f"state dict never needs (nothing of the file was run)")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchCheckpointError(f"{self.path}: unexpected persistent id {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise TorchCheckpointError(f"{self.path}: a storage of type {storage_type!r} (only torch's storage "
                                       f"classes are read)")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise TorchCheckpointError(f"{self.path}: a storage with key {key!r} and numel {numel!r}")
        return StorageRef(key, storage_type.dtype, numel)


def _refuse_if_legacy(path: str) -> None:
    with open(path, "rb") as f:
        start = f.read(len(_LEGACY_MAGIC))
    if start == _LEGACY_MAGIC:
        raise TorchCheckpointError(
            f"{path}: a PyTorch file in the legacy format (torch < 1.6, not a zip archive), which this reader "
            f"does not read: re-save it with torch >= 1.6, e.g. torch.save(torch.load(p), p), or as safetensors")
    raise TorchCheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive as torch.save writes "
                               f"nor the legacy format)")


def _archive_prefix(path: str, names: list[str]) -> str:
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchCheckpointError(f"{path}: a zip archive with {len(pickles)} data.pkl entries, not a torch.save "
                                   f"file (which has exactly one)")
    return pickles[0][: -len("data.pkl")]


class TorchCheckpoint:
    """An open torch.save zip archive holding a state dict: `entries` {name: TensorRef} and `read(name)`."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not zipfile.is_zipfile(self.path):
            _refuse_if_legacy(self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise TorchCheckpointError(f"{self.path}: a damaged zip archive ({e})") from None
        try:
            names = self._zip.namelist()
            self._prefix = _archive_prefix(self.path, names)
            order = (self._zip.read(self._prefix + "byteorder").decode("ascii", "replace").strip()
                     if self._prefix + "byteorder" in names else "little")
            if order not in ("little", "big"):
                raise TorchCheckpointError(f"{self.path}: byteorder {order!r}, expected little or big")
            self._order = "<" if order == "little" else ">"
            self.entries = self._load_state_dict()
        except BaseException:
            self._zip.close()
            raise

    def _load_state_dict(self) -> dict[str, TensorRef]:
        data = self._read_member(self._prefix + "data.pkl")
        try:
            obj = RestrictedUnpickler(data, self.path).load()
        except TorchCheckpointError as e:
            if str(e).startswith(self.path):
                raise
            raise TorchCheckpointError(f"{self.path}: {e}") from None
        except Exception as e:   # a malformed stream: the pickle module's own errors, or a call that fails
            raise TorchCheckpointError(f"{self.path}: data.pkl is not a readable state dict "
                                       f"({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise TorchCheckpointError(f"{self.path}: holds a {type(obj).__name__}, not a state dict "
                                       f"(a dict of name -> tensor)")
        bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
               if not isinstance(k, str) or not isinstance(v, TensorRef)]
        if bad:
            raise TorchCheckpointError(f"{self.path}: not a state dict: entries that are not named tensors: "
                                       f"{', '.join(bad[:10])}")
        return dict(obj)

    def _read_member(self, name: str) -> bytes:
        try:
            return self._zip.read(name)
        except KeyError:
            raise TorchCheckpointError(f"{self.path}: the archive has no entry {name}") from None
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise TorchCheckpointError(f"{self.path}: entry {name} cannot be read ({e}): the file is truncated "
                                       f"or corrupt") from None

    def raw(self, name: str) -> np.ndarray:
        """Tensor `name`'s stored values, C-contiguous, in their own dtype (BF16 as uint16 bits)."""
        ref = self.entries[name]
        s = ref.storage
        dtype = np.dtype(NUMPY_DTYPES[s.dtype]).newbyteorder(self._order)
        data = self._read_member(f"{self._prefix}data/{s.key}")
        if len(data) < s.numel * dtype.itemsize:
            raise TorchCheckpointError(f"{self.path}: tensor {name}: its storage data/{s.key} has {len(data)} bytes, "
                                       f"less than {s.numel} x {dtype.itemsize}")
        storage = np.frombuffer(data, dtype=dtype, count=s.numel)
        if 0 in ref.shape:
            return np.zeros(ref.shape, dtype)
        last = ref.offset + sum((d - 1) * st for d, st in zip(ref.shape, ref.stride))
        if last >= s.numel:
            raise TorchCheckpointError(f"{self.path}: tensor {name}: offset {ref.offset}, size {ref.shape} and "
                                       f"stride {ref.stride} reach element {last} of a storage of {s.numel}")
        view = np.lib.stride_tricks.as_strided(storage[ref.offset:], shape=ref.shape,
                                               strides=[st * dtype.itemsize for st in ref.stride], writeable=False)
        return view

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a new C-contiguous array: float32 for the float dtypes, else its own dtype."""
        raw = self.raw(name)
        dtype = self.entries[name].dtype
        if dtype in FLOAT_DTYPES:
            return to_float32(raw, dtype)
        return np.array(raw, dtype=raw.dtype.newbyteorder("="), order="C")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "TorchCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
