"""The crash-safe working files of a streamed `encode` (engine/tools/stream.py): OUT.partial, an .npy
file of the committed rows appended to in place, and OUT.partial.json, the progress record that
says how many of them count, replaced atomically.

    writer = Partial("out.npy.partial", row_shape=(768,), dtype="float32", rows_done=0, create=True)
    writer.append(rows); writer.commit()                  # rows durable; then:
    write_json_atomic("out.npy.partial.json", record)     # they count
    block = read_rows("out.npy.partial", (768,), "float32", start=0, count=100)
"""

from __future__ import annotations

import json
import os

import numpy as np

from weights.write import fsync_folder

PROGRESS_VERSION = 1
HEADER_LEN = 128          # bytes of the .npy header of OUT.partial (magic + length + dict, padded)


class WorkfileError(Exception):
    """A working file that cannot be used (the message says how to start over)."""


def npy_header(rows: int, row_shape: tuple, dtype: np.dtype) -> bytes:
    """An .npy version 1 header of exactly HEADER_LEN bytes for `rows` rows of `row_shape`."""
    body = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": (rows,) + tuple(row_shape)}).encode("latin1")
    pad = HEADER_LEN - 10 - len(body) - 1
    if pad < 0:
        raise WorkfileError(f"row shape {row_shape} too large for the partial file's header")
    return b"\x93NUMPY\x01\x00" + (HEADER_LEN - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


class Partial:
    """OUT.partial: an .npy file of the committed rows, appended to and truncated on resume."""

    def __init__(self, path: str, row_shape: tuple, dtype, rows_done: int, create: bool):
        self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.rows = rows_done
        if create:
            self.f = open(path, "w+b")
            self.f.write(npy_header(0, self.row_shape, self.dtype))
        else:
            self.f = open(path, "r+b")
            size = os.fstat(self.f.fileno()).st_size
            need = HEADER_LEN + rows_done * self.row_bytes
            if size < need:
                self.f.close()
                raise WorkfileError(f"{path}: holds {max(size - HEADER_LEN, 0) // self.row_bytes} rows but its "
                                    f"progress record says {rows_done}: start over with --force")
            self.f.truncate(need)   # rows written after the last commit
            self.f.seek(0)
            self.f.write(npy_header(rows_done, self.row_shape, self.dtype))
        self.f.seek(HEADER_LEN + rows_done * self.row_bytes)

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        assert array.shape[1:] == self.row_shape, (array.shape, self.row_shape)
        self.f.write(array.tobytes())
        self.rows += array.shape[0]

    def commit(self) -> None:
        """Makes the rows durable (the header says how many; the progress record is what counts)."""
        self.f.seek(0)
        self.f.write(npy_header(self.rows, self.row_shape, self.dtype))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.seek(HEADER_LEN + self.rows * self.row_bytes)

    def close(self):
        self.f.close()


def read_rows(path: str, row_shape: tuple, dtype, start: int, count: int) -> np.ndarray:
    """Rows start .. start+count of a working file. [count, *row_shape]"""
    dtype = np.dtype(dtype)
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    with open(path, "rb") as f:
        f.seek(HEADER_LEN + start * row_bytes)
        data = f.read(count * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape((count,) + tuple(row_shape))


def write_json_atomic(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_progress(path: str) -> dict:
    """The progress record of an interrupted run; WorkfileError when it is not one of this version."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise WorkfileError(f"{path}: cannot read the progress record ({e}): start over with --force") from None
    if not isinstance(record, dict) or record.get("version") != PROGRESS_VERSION or "rows_done" not in record:
        raise WorkfileError(f"{path}: not a progress record of this version: start over with --force")
    return record


def fsync_dir(path: str) -> None:
    """Makes a rename in the folder of `path` durable (best effort: some systems cannot)."""
    fsync_folder(os.path.dirname(os.path.abspath(path)) or ".")


def remove(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)
