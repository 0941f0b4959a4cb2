"""Labelled examples from CSV, TSV or JSONL files, for finetune and predict.

    examples = read_examples("train.csv")              # [Example(text, text_b, label, row)]
    labels = label_names(examples)                     # sorted distinct labels, as strings

A CSV or TSV file has a header row naming its columns; a JSONL file has one JSON object per line.
The columns: `text` (required), `text_b` (optional: sentence pairs), `label` (required for training
and evaluation; strings or numbers). Every problem is a DataError naming the file, the row (1-based
data row; for CSV/TSV, line = row + 1) and the column.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os


class DataError(ValueError):
    """A data file cannot be used; the message names the file, row and column."""


@dataclasses.dataclass
class Example:
    text: str
    text_b: str | None
    label: str | None
    row: int          # 1-based data row, for messages


def _format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv", ".jsonl"):
        return ext[1:]
    raise DataError(f"{path}: unknown file type {ext or '(no extension)'}: use .csv, .tsv or .jsonl")


def read_text(path: str, name: str | None = None) -> str:
    """A whole UTF-8 file (a byte-order mark dropped); DataError naming `name` (default: the path) and the line."""
    name = name or path
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{name}: line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def read_text_lines(path: str, option: str = "--input") -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; DataError naming the option and file."""
    lines = [line.strip() for line in read_text(path, f"{option} {path}").split("\n")]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{option} {path}: no text (every line is empty)")
    return lines


def _label_string(value, path, row) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{path}: row {row}, column 'label': expected a string or a number, got {json.dumps(value)}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        raise DataError(f"{path}: row {row}, column 'label': empty")
    return text


def _csv_records(path: str, content: str, kind: str, need_label: bool) -> list[tuple[int, dict]]:
    """(data row, {column: value}) of a CSV or TSV file; malformed quoting is a DataError naming the
    row and the line where it starts (a quote left open would otherwise swallow the rest of the file)."""
    reader = csv.DictReader(io.StringIO(content), delimiter="\t" if kind == "tsv" else ",", strict=True)
    try:
        fieldnames = reader.fieldnames
    except csv.Error as e:
        raise DataError(f"{path}: line 1 (the header): malformed CSV ({e})") from None
    if fieldnames is None:
        raise DataError(f"{path}: empty file (expected a header row with a 'text' column)")
    for name in ("text",) + (("label",) if need_label else ()):
        if name not in fieldnames:
            raise DataError(f"{path}: no '{name}' column (the header has {fieldnames})")
    records = []
    row_number = 0
    while True:
        first_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            why = "a quoted field is not closed" if "end of data" in str(e) else "malformed CSV"
            raise DataError(f"{path}: row {row_number + 1} (line {first_line}): {why} ({e})") from None
        row_number += 1
        if None in row:
            raise DataError(f"{path}: row {row_number} (line {first_line}): more fields than the header has")
        records.append((row_number, row))
    return records


def read_examples(path: str, need_label: bool = True) -> list[Example]:
    """The examples of a CSV, TSV or JSONL file (see the module docstring)."""
    kind = _format(path)
    content = read_text(path)
    records = []
    if kind == "jsonl":
        for line_number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {line_number}: expected a JSON object, got {type(obj).__name__}")
            records.append((line_number, obj))
        where = "line"
    else:
        records = _csv_records(path, content, kind, need_label)
        where = "row"
    if not records:
        raise DataError(f"{path}: no examples")
    out = []
    for number, record in records:
        text = record.get("text")
        if text is None:
            raise DataError(f"{path}: {where} {number}: no 'text' column")
        if not isinstance(text, str):
            raise DataError(f"{path}: {where} {number}, column 'text': expected a string, got {json.dumps(text)}")
        text_b = record.get("text_b")
        if text_b is not None and not isinstance(text_b, str):
            raise DataError(f"{path}: {where} {number}, column 'text_b': expected a string, got {json.dumps(text_b)}")
        label = record.get("label")
        if label is None or label == "":
            if need_label:
                raise DataError(f"{path}: {where} {number}: no 'label'")
            label = None
        else:
            label = _label_string(label, path, number)
        out.append(Example(text, text_b or None, label, number))
    return out


def label_names(examples: list[Example]) -> list[str]:
    """The distinct labels, sorted (numerically when all are integers)."""
    labels = {e.label for e in examples}
    if all(lbl.lstrip("-").isdigit() for lbl in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def label_ids(examples: list[Example], names: list[str], path: str) -> list[int]:
    """Each example's label as an index into `names`; a label not in `names` is a DataError."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for e in examples:
        if e.label not in index:
            raise DataError(f"{path}: row {e.row}, column 'label': {e.label!r} does not occur in the training data "
                            f"(labels: {names[:10]}{' ...' if len(names) > 10 else ''})")
        out.append(index[e.label])
    return out
