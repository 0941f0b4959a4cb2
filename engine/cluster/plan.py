"""The input of a distributed encode, cut into partitions: line-aligned byte ranges of at most N
lines, found by one pass over each file, and read back by the worker that encodes a partition.

    parts, files = scan_inputs(["a.txt", "b.txt"], lines_per_partition=1000)
    for raw, text in partition_lines(parts[3]): ...        # that partition's lines, checked

A partition never spans two files. The scan reads each file once in 16 MiB blocks (NumPy finds the
line ends), keeps only the cut offsets and each range's sha256, and runs on a worker, so the client
never reads the corpus; it costs one sequential read (about 1 GB/s), against hours of encoding, and
buys exact line ranges: every partition knows its first line (errors name it) and its row count
before anything is encoded, and a resume compares the new plan with the recorded one.

Lines are those of the single-process encode (engine/tools/stream.py): split at "\\n", which is
removed; a last line without "\\n" counts; each line must be UTF-8.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from engine.tools.workfile import WorkfileError

BLOCK = 16 << 20     # bytes read at a time by the scan


class ClusterError(WorkfileError):
    """A user-facing problem of a distributed encode (input, output, cluster, resume): one line."""


def _part(path: str, start: int, end: int, first_line: int, lines: int, digest) -> dict:
    return {"file": path, "start": start, "end": end, "first_line": first_line, "lines": lines,
            "input_sha256": digest.hexdigest()}


def scan_file(path: str, lines_per_partition: int) -> tuple[list[dict], int, int]:
    """(partitions, bytes, lines) of one file: each partition {file, start, end (byte range),
    first_line (1-based), lines, input_sha256 (of the range's bytes)}."""
    n = lines_per_partition
    parts, start, line, count, offset, last = [], 0, 1, 0, 0, b""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + 1    # [k] offsets just past each "\n"
            done = 0
            for cut in ends[n - count - 1::n].tolist():                       # where a partition fills up
                digest.update(block[done:cut])
                parts.append(_part(path, start, offset + cut, line, n, digest))
                start, line, done, digest = offset + cut, line + n, cut, hashlib.sha256()
            digest.update(block[done:])
            count = (count + len(ends)) % n
            offset, last = offset + len(block), block[-1:]
    if offset > start:                        # the rest: fewer than n lines, the last maybe without "\n"
        parts.append(_part(path, start, offset, line, count + (last != b"\n"), digest))
    return parts, offset, sum(p["lines"] for p in parts)


def scan_inputs(paths: list[str], lines_per_partition: int, where: str = "") -> tuple[list[dict], list[dict]]:
    """(partitions of every file in order, each with its index and row_start; [{path, bytes, lines}]).
    `where` names the machine in errors ("worker tcp://..."): the file must be readable there."""
    parts, files = [], []
    for path in paths:
        try:
            found, size, lines = scan_file(path, lines_per_partition)
        except OSError as e:
            raise ClusterError(f"{where + ' ' if where else ''}cannot read --input {path}: {e.strerror or e}") from None
        parts += found
        files.append({"path": path, "bytes": size, "lines": lines})
    row = 0
    for index, part in enumerate(parts):
        part.update(index=index, row_start=row)
        row += part["lines"]
    return parts, files


def read_range(part: dict, where: str = "") -> bytes:
    """The bytes of a partition, checked against the plan's sha256 (the input must not change)."""
    path = part["file"]
    try:
        with open(path, "rb") as f:
            f.seek(part["start"])
            data = f.read(part["end"] - part["start"])
    except OSError as e:
        raise ClusterError(f"{where + ' ' if where else ''}cannot read --input {path}: {e.strerror or e}") from None
    if len(data) != part["end"] - part["start"] or hashlib.sha256(data).hexdigest() != part["input_sha256"]:
        raise ClusterError(f"--input {path}: bytes {part['start']}-{part['end']} (lines {part['first_line']}-"
                           f"{part['first_line'] + part['lines'] - 1}) changed since the run was planned: "
                           f"start over with --force")
    return data


def partition_lines(part: dict, data: bytes):
    """(raw line with its "\\n", text) for each line of a partition's bytes, in order; a line that is
    not UTF-8 fails naming the file and its line number, as the single-process encode does."""
    raws = data.split(b"\n")
    if raws[-1] == b"":
        raws.pop()                              # the range ends with "\n": no line after it
    last = len(raws) - 1
    for i, raw in enumerate(raws):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ClusterError(f"--input {part['file']}: line {part['first_line'] + i} is not valid UTF-8 "
                               f"({e.reason} at byte {e.start})") from None
        ends_line = i < last or data.endswith(b"\n")
        yield (raw + b"\n" if ends_line else raw), text


def file_path(path: str) -> str:
    """An input's absolute path, as every worker must be able to open it."""
    return os.path.abspath(os.fspath(path))
