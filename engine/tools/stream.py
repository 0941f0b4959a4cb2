"""Streaming `encode`: a corpus of any size, in bounded memory, resumable after an interruption.

    from engine.tools import stream
    stream.encode(enc, prep, "corpus.txt", "out.h5", key="pooled_output", seq_length=None,
                  max_tokens=2048, resume=False, force=False)

    python -m engine encode --weights H5 --input corpus.txt --output out.{npy,h5,jsonl} \
        [--seq-length S] [--max-tokens 2048] [--batch-size ROWS] [--resume | --force] [--sequence]

Reading. The input is read lazily, one line at a time (one text per line, UTF-8, the trailing "\\n"
removed; an undecodable line is an error naming its number). Nothing is sorted: rows come out in
input order.

Length. Each text is packed as the Hub preprocessor packs it ([CLS] text [SEP]), truncated to
`seq_length` tokens: by default the model's positions (512 for the Hub model), so that no text is
cut that the model could read whole. Truncated texts are counted and reported (the first line
number too). pooled_output rows are packed to the longest text of their batch: the tokens are the
Hub preprocessor's, only the padding is shorter, and padded keys get exactly zero attention.
sequence_output rows are all `seq_length` wide in the output; without a given seq_length, a first
pass over the input finds the longest text (capped at the positions), so that the file is no wider
than the corpus needs.

Batching. Lines are tokenized one by one and gathered greedily, in input order, into a batch until
one more line would exceed `max_tokens` (or `max_rows` rows, when given); a single line longer than
the budget makes a batch of its own. With an encoder that skips padding (engine.load(fast=True), the
command line's default) padded positions cost nothing, so the budget counts real tokens and the
rows need no sorting by length; otherwise it counts rows x padded length. Memory: one batch plus the
model; nothing grows with the corpus.

Output and commits. Rows are appended to a working file `OUT.partial` (an .npy file whose header
is rewritten with the committed row count) and each batch is committed by
    1. write the rows, flush and fsync `OUT.partial`, rewrite its header;
    2. atomically replace the progress record `OUT.partial.json` (rows_done, the sha256 of the
       input lines consumed so far, the byte offset, and the parameters of the run).
Only the progress record says what is done: rows past `rows_done` in `OUT.partial` (a kill between
steps 1 and 2) are truncated away on resume. When the input is exhausted the record is marked
complete and `OUT.partial` becomes OUT: renamed for .npy; for .h5 (datasets `<key>` and `texts`)
and .jsonl ({"text": ..., "<key>": [...]} per line) converted block by block into a temporary
file beside OUT, fsynced and renamed. So OUT appears only complete, and an existing OUT (with
--force) is replaced only at that last rename: a killed run never damages it.

Why not append straight into an HDF5 file with a `rows_done` attribute and flush: HDF5's metadata
is not crash-safe; a SIGKILL during a write between flushes can leave a file that cannot be
opened at all (SWMR would avoid it but needs h5clear after a crash). The append-only .npy plus an
atomically replaced JSON record survives a kill at any instant.

Resume (`resume=True`). The progress record must exist and its parameters (output kind, seq_length,
max_tokens, max_rows, dtype, row shape, a fingerprint of the weights, the input's name) must match
this run; the first `rows_done` lines of the input are read again (not encoded) and their sha256
must equal the recorded one. Then `OUT.partial` is truncated to `rows_done` rows and encoding goes
on from line rows_done + 1. Batching is greedy from the start of each batch, so the batches after a
resume are the batches a one-shot run makes: the result is bit-identical to an uninterrupted run.
Without `resume`, an existing OUT or partial run is refused unless `force` (which starts over).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from engine.core import backend as backend_mod

PROGRESS_VERSION = 1
OUTPUT_KINDS = {".npy": "npy", ".h5": "h5", ".hdf5": "h5", ".jsonl": "jsonl"}
_HEADER_LEN = 128          # bytes of the .npy header of OUT.partial (magic + length + dict, padded)
_BLOCK_BYTES = 4 << 20    # bytes of rows per block when OUT.partial is converted to .h5 / .jsonl


class StreamError(Exception):
    """A user-facing problem with the input, the output or a resume: one line, exit code 2."""


# ------------------------------------------------------------------------------------------ input

class _Lines:
    """The input, one (raw bytes, text) per line, read lazily; counts lines and bytes."""

    def __init__(self, source):
        self.path = source if isinstance(source, (str, os.PathLike)) else None
        self.texts = None if self.path is not None else list(source)
        self.total_bytes = None
        self.lines = 0
        self.bytes = 0
        self._file = None
        if self.path is not None:
            self.path = os.fspath(self.path)
            try:
                if os.path.isdir(self.path):
                    raise StreamError(f"--input {self.path}: is a directory, not a text file")
                self._file = open(self.path, "rb")
                self.total_bytes = os.fstat(self._file.fileno()).st_size
            except OSError as e:
                raise StreamError(f"--input {self.path}: {e.strerror or e}") from None
        self._iter = self._generate()

    @property
    def name(self) -> str:
        return os.path.abspath(self.path) if self.path is not None else "<arguments>"

    def _generate(self):
        if self.texts is not None:
            for text in self.texts:
                yield text.encode("utf-8", "surrogatepass") + b"\n", text
            return
        for raw in self._file:
            text = raw[:-1] if raw.endswith(b"\n") else raw
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise StreamError(f"--input {self.path}: line {self.lines + 1} is not valid UTF-8 "
                                  f"({e.reason} at byte {e.start})") from None
            yield raw, text

    def __iter__(self):
        return self

    def __next__(self):
        raw, text = next(self._iter)
        self.lines += 1
        self.bytes += len(raw)
        return raw, text

    def fraction(self) -> float | None:
        if self.total_bytes:
            return self.bytes / self.total_bytes
        if self.texts:
            return self.lines / len(self.texts)
        return None

    def close(self):
        if self._file is not None:
            self._file.close()


def _batches(lines, prep, seq_length: int, max_tokens: int, max_rows: int | None, fixed_length: bool,
             count_real: bool, truncated: list, first_line: int = 1):
    """Greedy batches of (texts, raws, flat token ids, padded length), in input order. The budget
    counts real tokens (count_real) or rows x padded length. Appends the line numbers (the first
    line being `first_line`) of texts longer than seq_length to `truncated`."""
    texts, raws, rows, longest, real = [], [], [], 0, 0
    for number, (raw, text) in enumerate(lines, first_line):
        ids = prep.tokenize_flat([text])[0]
        if len(ids) + 2 > seq_length:
            truncated.append(number)
        n = min(len(ids) + 2, seq_length)
        width = seq_length if fixed_length else max(longest, n)
        cost = real + n if count_real else (len(rows) + 1) * width
        if rows and (cost > max_tokens or (max_rows and len(rows) >= max_rows)):
            yield texts, raws, rows, longest
            texts, raws, rows, real = [], [], [], 0
            width = seq_length if fixed_length else n
        texts.append(text)
        raws.append(raw)
        rows.append(ids)
        longest, real = width, real + n
    if rows:
        yield texts, raws, rows, longest


def longest_text(source, prep, cap: int) -> int:
    """The packed length ([CLS] text [SEP]) of the longest line of `source`, at most `cap`."""
    lines = _Lines(source)
    longest = 2
    try:
        for _, text in lines:
            longest = max(longest, min(len(prep.tokenize_flat([text])[0]) + 2, cap))
            if longest == cap:
                break
    finally:
        lines.close()
    return longest


# ------------------------------------------------------------------------------------------ .npy working file

def _npy_header(rows: int, row_shape: tuple, dtype: np.dtype) -> bytes:
    body = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": (rows,) + tuple(row_shape)}).encode("latin1")
    pad = _HEADER_LEN - 10 - len(body) - 1
    if pad < 0:
        raise StreamError(f"row shape {row_shape} too large for the partial file's header")
    return b"\x93NUMPY\x01\x00" + (_HEADER_LEN - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


class _Partial:
    """OUT.partial: an .npy file of the committed rows, appended to and truncated on resume."""

    def __init__(self, path: str, row_shape: tuple, dtype, rows_done: int, create: bool):
        self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.rows = rows_done
        if create:
            self.f = open(path, "w+b")
            self.f.write(_npy_header(0, self.row_shape, self.dtype))
        else:
            self.f = open(path, "r+b")
            size = os.fstat(self.f.fileno()).st_size
            need = _HEADER_LEN + rows_done * self.row_bytes
            if size < need:
                raise StreamError(f"{path}: holds {max(size - _HEADER_LEN, 0) // self.row_bytes} rows but its "
                                  f"progress record says {rows_done}: start over with --force")
            self.f.truncate(need)   # rows written after the last commit
            self.f.seek(0)
            self.f.write(_npy_header(rows_done, self.row_shape, self.dtype))
        self.f.seek(_HEADER_LEN + rows_done * self.row_bytes)

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        assert array.shape[1:] == self.row_shape, (array.shape, self.row_shape)
        self.f.write(array.tobytes())
        self.rows += array.shape[0]

    def commit(self) -> None:
        """Makes the rows durable (the header says how many; the progress record is what counts)."""
        self.f.seek(0)
        self.f.write(_npy_header(self.rows, self.row_shape, self.dtype))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.seek(_HEADER_LEN + self.rows * self.row_bytes)

    def close(self):
        self.f.close()


def _read_rows(path: str, row_shape: tuple, dtype, start: int, count: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    with open(path, "rb") as f:
        f.seek(_HEADER_LEN + start * row_bytes)
        data = f.read(count * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape((count,) + tuple(row_shape))


# ------------------------------------------------------------------------------------------ progress record

def _write_json_atomic(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_progress(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise StreamError(f"{path}: cannot read the progress record ({e}): start over with --force") from None
    if not isinstance(record, dict) or record.get("version") != PROGRESS_VERSION or "rows_done" not in record:
        raise StreamError(f"{path}: not a progress record of this version: start over with --force")
    return record


def weights_fingerprint(enc) -> str:
    """A sha256 over the config and a strided sample of every weight array: tells two models apart."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(enc.config), sort_keys=True).encode())
    arrays = [enc.word_table, enc.position_table, enc.type_table, *enc.embedding_ln,
              enc.pooler_kernel, enc.pooler_bias]
    for block in enc.blocks:
        arrays += [v for v in vars(block.attention).values()] + [v for v in vars(block.feedforward).values()]
        arrays += [*block.attention_ln, *block.feedforward_ln]
    for a in arrays:
        a = np.ascontiguousarray(backend_mod.to_numpy(a)).ravel()
        h.update(np.ascontiguousarray(a[:: max(1, a.size // 4096)]).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ finishing

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish(output: str, kind: str, partial: str, record: dict, source) -> None:
    """Turns the complete OUT.partial into OUT (atomically)."""
    rows, row_shape, dtype, key = record["rows_done"], tuple(record["row_shape"]), record["dtype"], record["key"]
    block_rows = max(1, _BLOCK_BYTES // (int(np.prod(row_shape)) * np.dtype(dtype).itemsize))
    if kind == "npy":
        os.replace(partial, output)
        _fsync_dir(output)
        return
    import tempfile
    folder = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    lines = _Lines(source)
    try:
        if kind == "h5":
            import h5py
            with h5py.File(tmp, "w") as f:
                data = f.create_dataset(key, shape=(rows,) + row_shape, dtype=dtype)
                texts = f.create_dataset("texts", shape=(rows,), dtype=h5py.string_dtype())
                for start in range(0, rows, block_rows):
                    count = min(block_rows, rows - start)
                    data[start:start + count] = _read_rows(partial, row_shape, dtype, start, count)
                    texts[start:start + count] = [next(lines)[1] for _ in range(count)]
                f.attrs["rows"] = rows
                f.attrs["input"] = record["input"]
                f.attrs["input_sha256"] = record["input_sha256"]
                f.attrs["params"] = json.dumps(record["params"], sort_keys=True)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for start in range(0, rows, block_rows):
                    count = min(block_rows, rows - start)
                    block = _read_rows(partial, row_shape, dtype, start, count)
                    for row in block:
                        f.write(json.dumps({"text": next(lines)[1], key: row.tolist()}, ensure_ascii=False) + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
        _fsync_dir(output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        lines.close()
    os.unlink(partial)


# ------------------------------------------------------------------------------------------ the job

def paths(output: str) -> tuple[str, str]:
    """(OUT.partial, OUT.partial.json) of an output path."""
    return output + ".partial", output + ".partial.json"


def encode(enc, prep, source, output: str, *, key: str = "pooled_output", seq_length: int | None = None,
           max_tokens: int = 2048, max_rows: int | None = None, resume: bool = False, force: bool = False,
           progress=None, progress_every: float = 1.0, bar=None) -> dict:
    """Encodes every line of `source` (a text file's path, or a list of texts) into `output`
    (.npy, .h5/.hdf5 or .jsonl); see the module docstring. seq_length: the truncation length
    (default: the model's positions). `bar(done_fraction, rows, tokens)`: called after each batch,
    for a progress bar. Returns a summary dict (rows, tokens, truncated, first_truncated_line,
    shape, resumed_from, batches, seconds). Raises StreamError on a user-facing problem."""
    say = progress or (lambda message: None)
    output = os.fspath(output)
    kind = OUTPUT_KINDS.get(os.path.splitext(output)[1].lower())
    if kind is None:
        raise StreamError(f"--output {output}: unknown extension {os.path.splitext(output)[1]!r} "
                          f"(use .npy, .h5 or .jsonl)")
    if key not in ("pooled_output", "sequence_output"):
        raise StreamError(f"key {key!r}: expected pooled_output or sequence_output")
    positions = enc.config.max_position_embeddings
    for name, value in (("seq_length", positions if seq_length is None else seq_length), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise StreamError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer))
                                 or max_rows < 1):
        raise StreamError(f"--batch-size must be a positive integer, got {max_rows!r}")
    if seq_length is not None and seq_length < 2:
        raise StreamError(f"--seq-length must be at least 2 (room for [CLS] and [SEP]), got {seq_length}")
    if seq_length is not None and seq_length > enc.config.max_position_embeddings:
        raise StreamError(f"--seq-length {seq_length} exceeds the model's {enc.config.max_position_embeddings} "
                          f"positions")
    if os.path.isdir(output):
        raise StreamError(f"--output {output}: is a directory")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise StreamError(f"--output {output}: the folder {folder} does not exist")
    partial, record_path = paths(output)

    fixed = key == "sequence_output"
    if seq_length is None:
        seq_length = longest_text(source, prep, positions) if fixed else positions
    skip_padding = bool(getattr(enc.fast_forward, "skips_padding", False))
    H = enc.config.hidden_size
    row_shape = (seq_length, H) if key == "sequence_output" else (H,)
    lines = _Lines(source)
    params = {"kind": kind, "key": key, "seq_length": int(seq_length), "max_tokens": int(max_tokens),
              "max_rows": None if max_rows is None else int(max_rows), "skip_padding": skip_padding,
              "dtype": np.dtype(enc.dtype).str,
              "row_shape": list(row_shape), "weights": weights_fingerprint(enc), "input": lines.name}
    record = None
    try:
        if resume and os.path.exists(record_path):
            record = _read_progress(record_path)
            differ = [f"{k} {record['params'].get(k)!r} -> {v!r}" for k, v in params.items()
                      if record["params"].get(k) != v]
            if differ:
                raise StreamError(f"--resume: this run differs from the interrupted one ({'; '.join(differ)}): "
                                  f"use the same arguments, or start over with --force")
            if record.get("complete"):
                if os.path.exists(partial):
                    _finish(output, kind, partial, record, source)
                os.unlink(record_path)
                say(f"encode: {output} is complete ({record['rows_done']} rows)")
                return {"rows": record["rows_done"], "resumed_from": record["rows_done"], "batches": 0,
                        "shape": [record["rows_done"]] + list(row_shape), "seconds": 0.0}
        elif resume and os.path.exists(output) and not os.path.exists(partial):
            raise StreamError(f"--resume: {output} is complete: no interrupted run to resume")
        elif not resume and not force:
            if os.path.lexists(output):
                raise StreamError(f"--output {output} exists; pass --force to replace it")
            if os.path.exists(record_path) or os.path.exists(partial):
                raise StreamError(f"--output {output}: an interrupted run left {partial}; pass --resume to "
                                  f"continue it or --force to start over")

        digest = hashlib.sha256()
        rows_done = 0
        if record is not None:
            rows_done = int(record["rows_done"])
            for _ in range(rows_done):
                try:
                    raw, _text = next(lines)
                except StopIteration:
                    raise StreamError(f"--resume: the input has {lines.lines} lines but the interrupted run "
                                      f"already wrote {rows_done} rows: not the same input") from None
                digest.update(raw)
            if digest.hexdigest() != record["input_sha256"] or lines.bytes != record["input_bytes"]:
                raise StreamError(f"--resume: the first {rows_done} lines of the input differ from those the "
                                  f"interrupted run encoded: not the same input (start over with --force)")
            writer = _Partial(partial, row_shape, enc.dtype, rows_done, create=False)
        else:
            for stale in (record_path, partial):
                if os.path.exists(stale):
                    os.unlink(stale)
            writer = _Partial(partial, row_shape, enc.dtype, 0, create=True)
        resumed_from = rows_done
        record = {"version": PROGRESS_VERSION, "rows_done": rows_done, "input_sha256": digest.hexdigest(),
                  "input_bytes": lines.bytes, "complete": False, "params": params, "input": lines.name,
                  "key": key, "row_shape": list(row_shape), "dtype": np.dtype(enc.dtype).str,
                  "output": os.path.abspath(output)}
        _write_json_atomic(record_path, record)
        if resumed_from:
            say(f"encode: resuming {output} after {resumed_from} rows (inputs checked by sha256)")

        t0 = last = time.perf_counter()
        batches = tokens = 0
        truncated = []
        try:
            for texts, raws, rows, width in _batches(lines, prep, seq_length, max_tokens, max_rows, fixed,
                                                     skip_padding, truncated, first_line=lines.lines + 1):
                packed = prep.bert_pack_inputs([rows], seq_length=width)
                tokens += int(packed["input_mask"].sum())
                out = backend_mod.to_numpy(enc(packed, skip_padding=skip_padding, outputs=(key,))[key])
                writer.append(out)
                writer.commit()
                for raw in raws:
                    digest.update(raw)
                record.update(rows_done=writer.rows, input_sha256=digest.hexdigest(),
                              input_bytes=record["input_bytes"] + sum(len(r) for r in raws))
                _write_json_atomic(record_path, record)
                batches += 1
                if bar is not None:
                    bar(lines.fraction(), writer.rows, tokens)
                now = time.perf_counter()
                if bar is None and now - last >= progress_every:
                    last = now
                    frac = lines.fraction()
                    rate = (writer.rows - resumed_from) / max(now - t0, 1e-9)
                    say(f"encode: {writer.rows} rows" + (f", {100 * frac:.0f}% of the input" if frac is not None
                                                         else "") + f", {rate:.0f} rows/s")
        except KeyboardInterrupt:
            say(f"encode: interrupted after {record['rows_done']} committed rows; continue with --resume")
            raise
        except StreamError as e:  # a bad line: what is committed stays, unless nothing is
            if record["rows_done"] == 0:
                writer.close()
                for stale in (record_path, partial):
                    os.unlink(stale)
                raise
            raise StreamError(f"{e} ({record['rows_done']} rows before it are committed in {partial}: fix the "
                              f"input after them and continue with --resume)") from None
        finally:
            writer.close()
        if record["rows_done"] == 0:
            for stale in (record_path, partial):
                os.unlink(stale)
            raise StreamError("no text given: the input is empty")
        record["complete"] = True
        _write_json_atomic(record_path, record)
        _finish(output, kind, partial, record, source)
        os.unlink(record_path)
        _fsync_dir(output)
        seconds = time.perf_counter() - t0
        if truncated:
            say(f"encode: warning: {len(truncated)} text{'s were' if len(truncated) > 1 else ' was'} longer than "
                f"{seq_length} tokens and truncated (first at line {truncated[0]}); --seq-length sets the length, "
                f"at most the model's {positions} positions")
        return {"rows": record["rows_done"], "tokens": tokens, "truncated": len(truncated),
                "first_truncated_line": truncated[0] if truncated else None,
                "shape": [record["rows_done"]] + list(row_shape), "resumed_from": resumed_from,
                "batches": batches, "seconds": seconds}
    finally:
        lines.close()
