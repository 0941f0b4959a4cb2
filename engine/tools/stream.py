"""Streaming `encode`: a corpus of any size, in bounded memory, resumable after an interruption.

    from engine.tools import stream
    stream.encode(enc, prep, "corpus.txt", "out.h5", key="pooled_output", seq_length=None,
                  max_tokens=2048, resume=False, force=False, normalize=False)

    python -m engine encode --weights H5 --input corpus.txt --output out.{npy,h5,jsonl} \
        [--seq-length S] [--max-tokens 2048] [--batch-size ROWS] [--resume | --force]
        [--sequence | --pooling pooled|cls|mean [--normalize]]

Reading. The input is read lazily, one line at a time (one text per line, UTF-8, the trailing "\\n"
removed; an undecodable line is an error naming its number). Nothing is sorted: rows come out in
input order.

Length. Each text is packed as the Hub preprocessor packs it ([CLS] text [SEP]), truncated to
`seq_length` tokens: by default the file's `max_seq_length` when it sets one (a sentence-embedding
model's training length), else the model's positions (512 for the Hub model), so that no text is
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
file beside OUT, fsynced and renamed. The working files are engine/tools/workfile.py's.

Texts in .h5: `texts` holds each line's UTF-8 bytes as a variable-length uint8 row (read them with
`read_texts(path)`, or `bytes(row).decode("utf-8")`), not as HDF5 strings: those end at a NUL byte,
which a line of text may hold, and every line must come back as it was. So OUT appears only complete, and an existing OUT (with
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
import tempfile
import time

import numpy as np

from engine.core import backend as backend_mod
from engine.tools.workfile import (PROGRESS_VERSION, Partial, WorkfileError, fsync_dir, read_progress, read_rows,
                                   remove, write_json_atomic)

OUTPUT_KINDS = {".npy": "npy", ".h5": "h5", ".hdf5": "h5", ".jsonl": "jsonl"}
# enc.embed's pooling -> the name of what encode writes (the .h5 dataset, the .jsonl key)
OUTPUT_NAMES = {"pooled": "pooled_output", "cls": "cls_embedding", "mean": "mean_embedding"}
POOLINGS = {name: pooling for pooling, name in OUTPUT_NAMES.items()}
BLOCK_BYTES = 4 << 20     # bytes of rows per block when OUT.partial is converted to .h5 / .jsonl


class StreamError(WorkfileError):
    """A user-facing problem with the input, the output or a resume: one line, exit code 2."""


# ------------------------------------------------------------------------------------------ input

class Lines:
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


def batches(lines, prep, seq_length: int, max_tokens: int, max_rows: int | None, fixed_length: bool,
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
    lines = Lines(source)
    longest = 2
    try:
        for _, text in lines:
            longest = max(longest, min(len(prep.tokenize_flat([text])[0]) + 2, cap))
            if longest == cap:
                break
    finally:
        lines.close()
    return longest


def weights_fingerprint(enc) -> str:
    """A sha256 over the config and a strided sample of every weight array: tells two models apart."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(enc.config), sort_keys=True).encode())

    def sample(arrays):
        for a in arrays:
            a = np.ascontiguousarray(backend_mod.to_numpy(a)).ravel()
            h.update(np.ascontiguousarray(a[:: max(1, a.size // 4096)]).tobytes())

    sample([enc.word_table, enc.position_table, enc.type_table, *enc.embedding_ln, enc.pooler_kernel,
            enc.pooler_bias])
    for i in range(enc.config.num_layers):   # block by block: a fast encoder's copies are not all held at once
        sample(enc.block_arrays(i))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ finishing

def read_texts(path: str) -> list[str]:
    """The `texts` of an .h5 written by encode, as str (each row holds a line's UTF-8 bytes)."""
    import h5py
    with h5py.File(path, "r") as f:
        return [bytes(row).decode("utf-8", "surrogatepass") for row in f["texts"][()]]


def _write_h5(tmp: str, partial: str, record: dict, lines: Lines, block_rows: int) -> None:
    import h5py
    rows, row_shape, dtype, key = record["rows_done"], tuple(record["row_shape"]), record["dtype"], record["key"]
    with h5py.File(tmp, "w") as f:
        data = f.create_dataset(key, shape=(rows,) + row_shape, dtype=dtype)
        texts = f.create_dataset("texts", shape=(rows,), dtype=h5py.vlen_dtype(np.uint8))
        texts.attrs["encoding"] = "utf-8 bytes per row (bytes(row).decode('utf-8'))"
        for start in range(0, rows, block_rows):
            count = min(block_rows, rows - start)
            data[start:start + count] = read_rows(partial, row_shape, dtype, start, count)
            block = np.empty(count, dtype=object)
            block[:] = [np.frombuffer(next(lines)[1].encode("utf-8", "surrogatepass"), np.uint8)
                        for _ in range(count)]
            texts[start:start + count] = block
        f.attrs["rows"] = rows
        f.attrs["input"] = record["input"]
        f.attrs["input_sha256"] = record["input_sha256"]
        f.attrs["params"] = json.dumps(record["params"], sort_keys=True)


def _write_jsonl(tmp: str, partial: str, record: dict, lines: Lines, block_rows: int) -> None:
    rows, row_shape, dtype, key = record["rows_done"], tuple(record["row_shape"]), record["dtype"], record["key"]
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, rows, block_rows):
            for row in read_rows(partial, row_shape, dtype, start, min(block_rows, rows - start)):
                f.write(json.dumps({"text": next(lines)[1], key: row.tolist()}, ensure_ascii=False) + "\n")


def finish(output: str, kind: str, partial: str, record: dict, source) -> None:
    """Turns the complete OUT.partial into OUT (atomically)."""
    if kind == "npy":
        os.replace(partial, output)
        fsync_dir(output)
        return
    row_bytes = int(np.prod(record["row_shape"])) * np.dtype(record["dtype"]).itemsize
    block_rows = max(1, BLOCK_BYTES // row_bytes)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(output)))
    os.close(fd)
    lines = Lines(source)
    try:
        (_write_h5 if kind == "h5" else _write_jsonl)(tmp, partial, record, lines, block_rows)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
        fsync_dir(output)
    except BaseException:
        remove(tmp)
        raise
    finally:
        lines.close()
    os.unlink(partial)


# ------------------------------------------------------------------------------------------ the job

def paths(output: str) -> tuple[str, str]:
    """(OUT.partial, OUT.partial.json) of an output path."""
    return output + ".partial", output + ".partial.json"


def _positive(option: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        why = " (room for [CLS] and [SEP])" if option == "--seq-length" else ""
        raise StreamError(f"{option} must be at least {minimum}{why}, got {value!r}")


def check_arguments(enc, output: str, key: str, seq_length, max_tokens, max_rows) -> str:
    """The output's kind (npy, h5, jsonl) after checking every argument; StreamError naming it."""
    kind = OUTPUT_KINDS.get(os.path.splitext(output)[1].lower())
    if kind is None:
        raise StreamError(f"--output {output}: unknown extension {os.path.splitext(output)[1]!r} "
                          f"(use .npy, .h5 or .jsonl)")
    if key not in ("sequence_output", *POOLINGS):
        raise StreamError(f"key {key!r}: expected sequence_output or one of {list(POOLINGS)}")
    positions = enc.config.max_position_embeddings
    if seq_length is not None:
        _positive("--seq-length", seq_length, 2)
        if seq_length > positions:
            raise StreamError(f"--seq-length {seq_length} exceeds the model's {positions} positions")
    _positive("--max-tokens", max_tokens)
    if max_rows is not None:
        _positive("--batch-size", max_rows)
    if os.path.isdir(output):
        raise StreamError(f"--output {output}: is a folder; give the path of the file to write")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise StreamError(f"--output {output}: the folder {folder} does not exist")
    return kind


def interrupted_run(output: str, params: dict, resume: bool, force: bool) -> dict | None:
    """The progress record to continue from (resume), or None to start afresh; refuses an existing
    output or partial run without resume or force, and a resume whose parameters differ."""
    partial, record_path = paths(output)
    if resume and os.path.exists(record_path):
        record = read_progress(record_path)
        differ = [f"{k} {record['params'].get(k)!r} -> {v!r}" for k, v in params.items()
                  if record["params"].get(k) != v]
        if differ:
            raise StreamError(f"--resume: this run differs from the interrupted one ({'; '.join(differ)}): "
                              f"use the same arguments, or start over with --force")
        return record
    if resume and os.path.exists(output) and not os.path.exists(partial):
        raise StreamError(f"--resume: {output} is complete: no interrupted run to resume")
    if not resume and not force:
        if os.path.lexists(output):
            raise StreamError(f"--output {output}: exists; pass --force to replace it")
        if os.path.exists(record_path) or os.path.exists(partial):
            raise StreamError(f"--output {output}: an interrupted run left {partial}; pass --resume to "
                              f"continue it or --force to start over")
    return None


def skip_done(lines: Lines, rows_done: int, record: dict):
    """Reads the first rows_done lines again (not encoded) and checks them against the record's
    sha256; returns the running digest."""
    digest = hashlib.sha256()
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
    return digest


def encode_batches(enc, prep, lines: Lines, writer: Partial, record: dict, digest, params: dict, say, bar,
                   progress_every: float) -> tuple[int, int, list]:
    """Encodes the rest of the input, committing each batch (rows, then the record); returns
    (batches, tokens of this run, truncated line numbers). A bad line keeps what is committed."""
    record_path = paths(record["output"])[1]
    key, seq_length, skip_padding = params["key"], params["seq_length"], params["skip_padding"]
    resumed_from = record["rows_done"]
    t0 = last = time.perf_counter()
    count, tokens, truncated = 0, 0, []
    try:
        for texts, raws, rows, width in batches(lines, prep, seq_length, params["max_tokens"], params["max_rows"],
                                                key == "sequence_output", skip_padding, truncated,
                                                first_line=lines.lines + 1):
            packed = prep.bert_pack_inputs([rows], seq_length=width)
            batch_tokens = int(packed["input_mask"].sum())
            out = (enc.embed(packed, POOLINGS[key], params["normalize"], skip_padding) if key in POOLINGS
                   else enc(packed, skip_padding=skip_padding, outputs=(key,))[key])
            out = backend_mod.to_numpy(out)
            writer.append(out)
            writer.commit()
            for raw in raws:
                digest.update(raw)
            tokens += batch_tokens
            record.update(rows_done=writer.rows, input_sha256=digest.hexdigest(),
                          input_bytes=record["input_bytes"] + sum(len(r) for r in raws),
                          tokens_done=record.get("tokens_done", 0) + batch_tokens)
            write_json_atomic(record_path, record)
            count += 1
            if bar is not None:
                bar(lines.fraction(), writer.rows, record["tokens_done"])
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
            remove(*paths(record["output"]))
            raise
        raise StreamError(f"{e} ({record['rows_done']} rows before it are committed in {writer.path}: fix the "
                          f"input after them and continue with --resume)") from None
    finally:
        writer.close()
    return count, tokens, truncated


def encode(enc, prep, source, output: str, *, key: str = "pooled_output", seq_length: int | None = None,
           max_tokens: int = 2048, max_rows: int | None = None, resume: bool = False, force: bool = False,
           progress=None, progress_every: float = 1.0, bar=None, normalize: bool = False) -> dict:
    """Encodes every line of `source` (a text file's path, or a list of texts) into `output`
    (.npy, .h5/.hdf5 or .jsonl); see the module docstring. key: sequence_output, or a name of
    OUTPUT_NAMES (the rows of enc.embed with that pooling, L2-normalized with normalize).
    seq_length: the truncation length (default: the file's max_seq_length, else the model's
    positions). `bar(done_fraction, rows, tokens)`: called after each batch,
    for a progress bar. Returns a summary dict: rows and tokens (all of the output's, a resumed
    run's included), resumed_from, tokens_this_run, truncated, first_truncated_line, shape,
    batches, seconds. Raises StreamError on a user-facing problem."""
    say = progress or (lambda message: None)
    output = os.fspath(output)
    kind = check_arguments(enc, output, key, seq_length, max_tokens, max_rows)
    partial, record_path = paths(output)
    positions = enc.config.max_position_embeddings
    if seq_length is None:
        cap = getattr(enc.config, "max_seq_length", 0) or positions
        seq_length = longest_text(source, prep, cap) if key == "sequence_output" else cap
    row_shape = (seq_length, enc.config.hidden_size) if key == "sequence_output" else (enc.config.hidden_size,)
    lines = Lines(source)
    params = {"kind": kind, "key": key, "seq_length": int(seq_length), "max_tokens": int(max_tokens),
              "max_rows": None if max_rows is None else int(max_rows), "normalize": bool(normalize),
              "skip_padding": bool(getattr(enc.fast_forward, "skips_padding", False)),
              "dtype": np.dtype(enc.dtype).str, "row_shape": list(row_shape), "weights": weights_fingerprint(enc),
              "input": lines.name}
    try:
        record = interrupted_run(output, params, resume, force)
        if record is not None and record.get("complete"):   # killed while finishing: finish
            if os.path.exists(partial):
                finish(output, kind, partial, record, source)
            os.unlink(record_path)
            say(f"encode: {output} is complete ({record['rows_done']} rows)")
            return {"rows": record["rows_done"], "tokens": record.get("tokens_done", 0), "tokens_this_run": 0,
                    "resumed_from": record["rows_done"], "batches": 0, "truncated": 0, "first_truncated_line": None,
                    "shape": [record["rows_done"]] + list(row_shape), "seconds": 0.0}
        if record is not None:
            digest = skip_done(lines, int(record["rows_done"]), record)
            writer = Partial(partial, row_shape, enc.dtype, int(record["rows_done"]), create=False)
            say(f"encode: resuming {output} after {record['rows_done']} rows (inputs checked by sha256)")
        else:
            remove(record_path, partial)
            digest, writer = hashlib.sha256(), Partial(partial, row_shape, enc.dtype, 0, create=True)
            record = {"version": PROGRESS_VERSION, "rows_done": 0, "tokens_done": 0,
                      "input_sha256": digest.hexdigest(), "input_bytes": 0, "complete": False, "params": params,
                      "input": lines.name, "key": key, "row_shape": list(row_shape),
                      "dtype": np.dtype(enc.dtype).str, "output": os.path.abspath(output)}
            write_json_atomic(record_path, record)
        record.setdefault("tokens_done", 0)
        resumed_from = int(record["rows_done"])
        t0 = time.perf_counter()
        count, tokens, truncated = encode_batches(enc, prep, lines, writer, record, digest, params, say, bar,
                                                  progress_every)
        if record["rows_done"] == 0:
            remove(record_path, partial)
            raise StreamError("no text given: the input is empty")
        record["complete"] = True
        write_json_atomic(record_path, record)
        finish(output, kind, partial, record, source)
        os.unlink(record_path)
        fsync_dir(output)
        if truncated:
            say(f"encode: warning: {len(truncated)} text{'s were' if len(truncated) > 1 else ' was'} longer than "
                f"{seq_length} tokens and truncated (first at line {truncated[0]}); --seq-length sets the length, "
                f"at most the model's {positions} positions")
        return {"rows": record["rows_done"], "tokens": record["tokens_done"], "tokens_this_run": tokens,
                "truncated": len(truncated), "first_truncated_line": truncated[0] if truncated else None,
                "shape": [record["rows_done"]] + list(row_shape), "resumed_from": resumed_from,
                "batches": count, "seconds": time.perf_counter() - t0}
    finally:
        lines.close()
