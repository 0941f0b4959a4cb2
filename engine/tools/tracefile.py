"""Trace files: the intermediates of engine.core.trace in one HDF5 file, written atomically.

    from engine.tools import tracefile
    tracefile.write(enc.trace(inputs), "trace.h5", texts=...)
    tracefile.trace_to_file(enc, inputs, "trace.h5")     # each intermediate written as it comes
    t = tracefile.read("trace.h5")                        # an engine.core.trace.Trace

    python -m engine trace --weights H5 "some text" ["more text" ...] --out trace.h5
    python -m engine trace --weights H5 --ids '[[101, 7592, 102]]' --out trace.h5

HDF5 layout (format "talkheads-ggelu-trace", version 1):

    /<name>                    one float dataset per intermediate, at the path of its name
                               attrs: order (0, 1, ... recording order), letters ("B,N,S,T"),
                               description
    /inputs/input_word_ids     [B,S] int32, and input_mask, input_type_ids, masked_lm_positions [B,P]
    / (root attrs)             format, format_version, names (the names in order), dims (JSON
                               {"B": 2, "S": 12, ...}), config (JSON of the model config, and
                               each field again as config_<field>), backend, dtype, created_at,
                               texts (JSON list, when the inputs came from text), and the inputs
                               themselves as int32 array attrs when they are small (< 8192 ids)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections import OrderedDict

import numpy as np

from engine.core.trace import Trace, base_attrs, complete_inputs, dims, run, steps

TRACE_FORMAT = "talkheads-ggelu-trace"
TRACE_FORMAT_VERSION = 1
_SMALL_INPUTS = 8192          # inputs with at most this many ids are also stored as root attrs


def write(trace: Trace, path: str, texts=None) -> None:
    """Writes the trace file (layout in this module's docstring), atomically."""
    attrs = dict(trace.attrs)
    if texts is not None:
        attrs["texts"] = list(texts)
    with _TraceWriter(path, trace.inputs, trace.config, attrs) as w:
        for name, value in trace.tensors.items():
            w.add(name, value)


def trace_to_file(enc, inputs: dict, path: str, texts=None) -> list[str]:
    """Like `write(trace(enc, inputs), path)`, but writing each intermediate as it comes (constant memory
    beyond one block). Returns the names written."""
    attrs = base_attrs(enc)
    if texts is not None:
        attrs["texts"] = list(texts)
    done_inputs = complete_inputs(enc, inputs)
    with _TraceWriter(path, done_inputs, dataclasses.asdict(enc.config), attrs) as w:
        run(enc, done_inputs, w.add)
        return list(w.names)


class _TraceWriter:
    """Writes a trace file into a temporary sibling, renamed into place on success."""

    def __init__(self, path, inputs, config: dict, attrs: dict):
        self.path, self.inputs, self.config, self.attrs = path, inputs, config, attrs
        self.names = []
        num_layers = int(config["num_layers"])
        self.step_info = {n: (l, d) for n, l, d in steps(num_layers, True)}

    def __enter__(self):
        import tempfile

        import h5py
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-trace-", suffix=".h5", dir=folder)
        os.close(fd)
        self.f = h5py.File(self.tmp, "w")
        return self

    def add(self, name, value):
        letters, description = self.step_info.get(name, ("", ""))
        ds = self.f.create_dataset(name, data=np.asarray(value))
        ds.attrs["order"] = len(self.names)
        ds.attrs["letters"] = letters
        ds.attrs["description"] = description
        self.names.append(name)

    def _root_attrs(self):
        import h5py
        f = self.f
        f.attrs["format"] = TRACE_FORMAT
        f.attrs["format_version"] = TRACE_FORMAT_VERSION
        f.attrs["names"] = np.array(self.names, dtype=h5py.string_dtype())
        ids = self.inputs["input_word_ids"]
        P = self.inputs["masked_lm_positions"].shape[1] if "masked_lm_positions" in self.inputs else None

        class _Cfg:  # dims() wants attribute access
            pass
        cfg = _Cfg()
        cfg.__dict__.update(self.config)
        f.attrs["dims"] = json.dumps(dims(cfg, ids.shape[0], ids.shape[1], P))
        f.attrs["config"] = json.dumps(self.config)
        for k, v in self.config.items():
            f.attrs[f"config_{k}"] = v
        for k, v in self.inputs.items():
            f.create_dataset(f"inputs/{k}", data=np.asarray(v, np.int32))
            if np.asarray(v).size <= _SMALL_INPUTS:
                f.attrs[k] = np.asarray(v, np.int32)
        for k, v in self.attrs.items():
            f.attrs[k] = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
        f.attrs["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._root_attrs()
            self.f.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        return False


def read(path: str) -> Trace:
    """Reads a trace file. Datasets with an `order` attr come in that order; files written by
    another port without `order` attrs: every float dataset outside /inputs, in file order."""
    import h5py
    tensors, letters, order = OrderedDict(), {}, {}
    with h5py.File(path, "r") as f:
        found = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.startswith("inputs/") and obj.dtype.kind == "f":
                found.append(name)
        f.visititems(visit)
        for n in found:
            ds = f[n]
            order[n] = int(ds.attrs["order"]) if "order" in ds.attrs else 10**9 + len(order)
            if "letters" in ds.attrs:
                letters[n] = _str(ds.attrs["letters"])
        for n in sorted(found, key=lambda n: order[n]):
            tensors[n] = f[n][()]
        inputs = {k[len("inputs/"):]: f[k][()] for k in _datasets(f, "inputs")}
        attrs = {k: _str(v) for k, v in f.attrs.items()}
    config = json.loads(attrs.pop("config")) if "config" in attrs else {}
    return Trace(tensors, letters, inputs, config, attrs)


def _datasets(f, group):
    if group not in f:
        return []
    return [f"{group}/{k}" for k in f[group]]


def _str(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.dtype.kind in "OS":
        return [x.decode() if isinstance(x, bytes) else str(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


