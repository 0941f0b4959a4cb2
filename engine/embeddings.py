"""The embeddings folder that `encode --cluster` writes: .npy shards, one per partition of the input,
and a manifest; read back as one array without loading it.

    vectors = engine.read_embeddings("out/")              # [rows, H]: memory-mapped shards, in input order
    vectors[10:20], vectors[[3, 7]], np.asarray(vectors)  # reads only what is asked
    lazy = engine.read_embeddings("out/", dask=True)      # a Dask array, one chunk per shard (needs dask)

The folder:

    out/manifest.json      what was encoded and how, and per partition: input file, byte range, line
                           range, rows, shard file, the shard's sha256 (written last, atomically)
    out/part-000000.npy    the rows of partition 0 [rows, H] (or [rows, S, H] for sequence_output)
    out/part-000000.json   its commit record: the partition's entry as the worker wrote it

Each shard is a plain .npy file, so NumPy (np.load(mmap_mode="r")) and Dask read it directly. A
shard is written to a temporary file in the folder, fsynced and renamed, then its record is written
the same way: a shard without a valid record (or whose bytes no longer hash to the record's sha256)
does not count and is recomputed by `encode --resume`. Why .npy shards rather than Zarr chunks:
docs/commands.md (encode --cluster) has the measurement; in short, partitions hold a variable number
of rows, shards can be memory-mapped, and the temp-file-and-rename commit is ours.

No Dask here: this module is imported by `engine` (dask only inside read_embeddings(dask=True)).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import numpy as np

from weights.write import fsync_folder

FORMAT = "talkheads-embeddings"
VERSION = 1
MANIFEST = "manifest.json"
HASH_BLOCK = 8 << 20   # bytes read at a time when a shard is hashed


class EmbeddingsError(ValueError):
    """An embeddings folder that cannot be read (the message names the file and what to do)."""


def shard_name(index: int) -> str:
    return f"part-{index:06d}.npy"


def record_name(index: int) -> str:
    return f"part-{index:06d}.json"


# ------------------------------------------------------------------------------------------ writing

class _HashingFile:
    """A write-only file object that hashes what passes through it (np.lib.format writes to it)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)


def _temporary(path: str) -> str:
    # unique per writer: two workers finishing the same partition never share a temporary file
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _write_atomic(path: str, mode: str, write) -> None:
    """write(file) into a temporary file beside `path`, fsynced, renamed over it; the folder synced."""
    tmp = _temporary(path)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_folder(os.path.dirname(path) or ".")


def write_json_atomic(path: str, value: dict) -> None:
    """`value` as JSON at `path`: a temporary file beside it, fsynced, renamed over it."""
    _write_atomic(path, "w", lambda f: json.dump(value, f, indent=1))


def write_shard(folder: str, index: int, rows: np.ndarray, record: dict) -> dict:
    """Writes partition `index`'s rows [n, ...] as part-<index>.npy, then its commit record (the given
    entry plus shard, rows, row_shape, dtype, sha256 and bytes of the file), each atomically; returns
    the record. The sha256 is of the file's bytes, computed as they are written."""
    hashed = []

    def write(f):
        hashed.append(_HashingFile(f))
        np.lib.format.write_array(hashed[0], np.ascontiguousarray(rows), allow_pickle=False)
    _write_atomic(os.path.join(folder, shard_name(index)), "wb", write)
    out = hashed[0]
    record = dict(record, index=index, shard=shard_name(index), rows=int(rows.shape[0]),
                  row_shape=list(rows.shape[1:]), dtype=rows.dtype.str, sha256=out.sha256.hexdigest(),
                  bytes=out.size)
    write_json_atomic(os.path.join(folder, record_name(index)), record)
    return record


# ------------------------------------------------------------------------------------------ checking

def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def read_record(folder: str, index: int) -> dict | None:
    """Partition `index`'s commit record, or None when it is missing or unreadable (not committed)."""
    try:
        with open(os.path.join(folder, record_name(index)), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("index") == index else None


def shard_problem(folder: str, record: dict) -> str | None:
    """Why the shard of a commit record does not hold what the record says (missing, another size,
    another sha256), or None when it does."""
    path = os.path.join(folder, record["shard"])
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path}: missing"
    if size != record["bytes"]:
        return f"{path}: {size} bytes, its record says {record['bytes']}"
    if file_sha256(path) != record["sha256"]:
        return f"{path}: its sha256 differs from its record's (corrupt)"
    return None


# ------------------------------------------------------------------------------------------ the manifest

def write_manifest(folder: str, manifest: dict) -> None:
    write_json_atomic(os.path.join(folder, MANIFEST), dict(manifest, format=FORMAT, version=VERSION))


def read_manifest(folder: str) -> dict:
    """The folder's manifest; EmbeddingsError when there is none or it is not this format's."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise EmbeddingsError(f"{folder}: no {MANIFEST}: not a folder written by encode --cluster") from None
    except (OSError, ValueError) as e:
        raise EmbeddingsError(f"{path}: cannot read it ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise EmbeddingsError(f"{path}: not an embeddings manifest of version {VERSION}")
    return manifest


# ------------------------------------------------------------------------------------------ reading

class Embeddings:
    """The rows of every shard, in input order, as one read-only array [rows, ...]: shape, dtype,
    len, indexing (an int, a slice, an integer array or a boolean mask on the first axis, then any
    index of the rest) and np.asarray. The shards are memory-mapped: indexing reads only the rows
    asked for; np.asarray(...) reads them all."""

    def __init__(self, shards: list, manifest: dict):
        self.shards = shards                                  # np.memmap [rows_i, ...] each
        self.manifest = manifest
        self.starts = np.cumsum([0] + [len(s) for s in shards])   # [shards+1] first row of each
        self.dtype = np.dtype(manifest["dtype"])
        self.shape = (int(self.starts[-1]), *manifest["row_shape"])

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Embeddings(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows at the given (non-negative) indices, in that order. [n, ...]"""
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        which = np.searchsorted(self.starts, rows, side="right") - 1        # the shard of each row
        for s in np.unique(which):
            picked = which == s
            out[picked] = self.shards[s][rows[picked] - self.starts[s]]
        return out

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if isinstance(first, (int, np.integer)):
            row = int(first) + (len(self) if first < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"row {first} out of range for {len(self)} rows")
            s = int(np.searchsorted(self.starts, row, side="right") - 1)
            return self.shards[s][(row - self.starts[s], *rest)]
        if isinstance(first, slice):
            rows = np.arange(*first.indices(len(self)))
        else:
            rows = np.arange(len(self))[np.asarray(first)]                 # int array or boolean mask
        return self._rows(rows)[(slice(None), *rest)] if rest else self._rows(rows)

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.shards) if self.shards else np.empty(self.shape, self.dtype)
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __iter__(self):
        for shard in self.shards:
            yield from shard

    def to_dask(self):
        """A Dask array of the same rows, one chunk per shard, each read from its file where the
        chunk is computed (memory-mapped there): for work bigger than memory."""
        import dask
        import dask.array as da
        folder = self.manifest["folder"]
        chunks = [da.from_delayed(dask.delayed(_load_shard)(os.path.join(folder, p["shard"])),
                                  shape=(p["rows"], *self.shape[1:]), dtype=self.dtype)
                  for p in self.manifest["partitions"]]
        return da.concatenate(chunks) if chunks else da.empty(self.shape, dtype=self.dtype)


def _load_shard(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def read_embeddings(folder: str, dask: bool = False, verify: bool = False):
    """The rows of an embeddings folder (written by `encode --cluster`), in input order: an
    Embeddings array over memory-mapped shards, or with dask=True a Dask array (one chunk per shard).
    verify=True checks every shard's sha256 against the manifest first (reads every byte)."""
    folder = os.path.abspath(os.fspath(folder))
    manifest = read_manifest(folder)
    parts = manifest["partitions"]
    missing = [p["index"] for p in parts if "sha256" not in p]
    if manifest.get("status") != "complete" or missing:
        raise EmbeddingsError(f"{folder}: the encode is not complete ({len(parts) - len(missing)} of {len(parts)} "
                              f"partitions): continue it with encode --cluster ... --resume")
    shards = []
    for p in parts:
        problem = shard_problem(folder, p) if verify else None
        if problem:
            raise EmbeddingsError(f"{problem}: recompute it with encode --cluster ... --resume")
        path = os.path.join(folder, p["shard"])
        try:
            shard = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise EmbeddingsError(f"{path}: cannot read the shard ({e}): recompute it with encode --resume") from None
        if shard.shape != (p["rows"], *manifest["row_shape"]) or shard.dtype != np.dtype(manifest["dtype"]):
            raise EmbeddingsError(f"{path}: holds {shard.shape} {shard.dtype}, the manifest says "
                                  f"{(p['rows'], *manifest['row_shape'])} {manifest['dtype']}")
        shards.append(shard)
    array = Embeddings(shards, dict(manifest, folder=folder))
    return array.to_dask() if dask else array
