"""Reading a `.safetensors` file with NumPy alone (no safetensors package, no torch).

The format: an 8-byte little-endian unsigned header length n, then n bytes of UTF-8 JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the data: each tensor's bytes, little-endian, C order, at [begin, end) counted from the first
byte after the header.

    with SafetensorsFile("model.safetensors") as f:
        f.entries["embeddings.word_embeddings.weight"].shape     # checked, nothing read yet
        word = f.read("embeddings.word_embeddings.weight")       # float32 [V,H]

The header is read and checked whole when the file is opened: every malformed thing (a truncated
file, a header past the end, offsets past the data or overlapping, a shape whose bytes do not fill
its span, an unknown dtype) is one `SafetensorsError` line naming the file and the tensor. The data
is memory-mapped, so `read` copies each tensor once, straight into its float32 (or integer) array.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np

# The format's dtype names -> NumPy dtypes of the stored bytes. BF16 is read as its raw 16 bits.
DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# The reference implementation refuses larger headers; a bigger length is a corrupt file, not a model.
MAX_HEADER_BYTES = 100 * 2**20
_LENGTH = struct.Struct("<Q")


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file; the message names the file and the tensor."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: its dtype name ("F32", ...), shape and byte span in the data."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) to float32: a bfloat16 is the top half of a float32, so shifting its
    bits 16 up gives the same number exactly. One copy, into the result."""
    bits = raw.astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A float tensor's stored values (of the format's `dtype`) as a new C-contiguous float32 array."""
    if dtype == "BF16":
        return bfloat16_to_float32(raw)
    return np.array(raw, dtype=np.float32, order="C")


def _parse_entry(path: str, name: str, spec, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name}"
    if not isinstance(spec, dict):
        raise SafetensorsError(f"{where}: its header entry is {type(spec).__name__}, not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise SafetensorsError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] run past the data ({data_size} bytes "
                               f"after the header): the file is truncated or corrupt")
    needed = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
    if needed != end - begin:
        raise SafetensorsError(f"{where}: shape {shape} of {dtype} needs {needed} bytes but data_offsets "
                               f"[{begin}, {end}] span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_overlaps(path: str, entries: dict[str, TensorEntry]) -> None:
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise SafetensorsError(f"{path}: tensor {b}: its bytes overlap those of tensor {a}")


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict, int, int]:
    """(entries by name, __metadata__, the data's first byte, the data's size), all checked."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            raise SafetensorsError(f"{path}: truncated: {size} bytes, less than the 8-byte header length")
        (length,) = _LENGTH.unpack(head)
        if length > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: the header length {length} is over {MAX_HEADER_BYTES} bytes: "
                                   f"not a safetensors file, or a corrupt one")
        if _LENGTH.size + length > size:
            raise SafetensorsError(f"{path}: the header of {length} bytes runs past the end of the file "
                                   f"({size} bytes): the file is truncated")
        text = f.read(length)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: __metadata__ is {type(metadata).__name__}, not an object")
    data_start = _LENGTH.size + length
    data_size = size - data_start
    entries = {name: _parse_entry(path, name, spec, data_size) for name, spec in header.items()}
    _check_overlaps(path, entries)
    return entries, metadata, data_start, data_size


class SafetensorsFile:
    """An open safetensors file: `entries` (checked header), `metadata`, and `read(name)`."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.entries, self.metadata, start, size = read_header(self.path)
        # A zero-length map is an error on some platforms; an empty data section needs none.
        self._data = (np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=(size,))
                      if size else np.zeros(0, np.uint8))

    def raw(self, name: str) -> np.ndarray:
        """The stored values of tensor `name`, a read-only view of the mapped file (no copy)."""
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if self._data is None:
            raise ValueError(f"{self.path}: the file is closed")
        e = self.entries[name]
        return self._data[e.begin:e.end].view(DTYPES[e.dtype]).reshape(e.shape)

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a new array: float32 for the float dtypes (BF16 exactly), else its own dtype."""
        dtype = self.entries[name].dtype if name in self.entries else None
        raw = self.raw(name)
        return to_float32(raw, dtype) if dtype in FLOAT_DTYPES else np.array(raw, dtype=raw.dtype.newbyteorder("="))

    def close(self) -> None:
        self._data = None   # the map closes when no view of it is left

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
