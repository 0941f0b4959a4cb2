"""Trace: every intermediate tensor of the model, in order, for people who port or study it.

    import engine
    enc = engine.load("model.h5")
    t = enc.trace(inputs)                  # engine.trace.Trace: an ordered {name: NumPy array}
    t["layers/0/mixed_probs"]              # [B,N,S,T]
    t.write("trace.h5", texts=...)         # the HDF5 layout below
    t = engine.trace.read("trace.h5")
    diffs = engine.trace.compare(t, other) # the first divergence in our order, and a table

    python -m engine trace --weights H5 "some text" ["more text" ...] --out trace.h5
    python -m engine trace --weights H5 --ids '[[101, 7592, 102]]' --out trace.h5
    python -m engine compare ours.h5 theirs.h5 [--rtol 1e-5] [--map their_names.json]

NumPy and h5py only (never TensorFlow); `weights.reference_trace` takes the same intermediates
from TensorFlow, with Model Garden's own layers, and `python -m engine verify --trace` compares them.

Names and shapes, in recording order. Letters: B batch, S query positions, T key positions (= S),
N heads, D head size, H hidden, I intermediate (GEGLU width), P masked positions, V vocab.

    name                              shape     what
    embeddings/sum                    B,S,H     word[ids] + position[:S] + type[type_ids]
    embeddings/layer_norm             B,S,H     LN(sum): the input of block 0
    layers/<i>/q                      B,S,N,D   x·Wq + bq
    layers/<i>/k                      B,T,N,D   x·Wk + bk
    layers/<i>/v                      B,T,N,D   x·Wv + bv
    layers/<i>/raw_scores             B,N,S,T   q·k over D, before the scale
    layers/<i>/scaled_scores          B,N,S,T   raw_scores / sqrt(D)
    layers/<i>/mixed_scores           B,N,S,T   pre-softmax talking-heads mix: einsum(bnst,nm->bmst, W_pre)
    layers/<i>/masked_scores          B,N,S,T   mixed_scores + (1 - mask[b,t]) * -1e9
    layers/<i>/probs                  B,N,S,T   softmax over t
    layers/<i>/mixed_probs            B,N,S,T   post-softmax talking-heads mix: einsum(bnst,nm->bmst, W_post)
    layers/<i>/context                B,S,N,D   sum_t mixed_probs[b,n,s,t] v[b,t,n,:]
    layers/<i>/attention_output       B,S,H     context·Wo + bo (before the residual)
    layers/<i>/attention_layer_norm   B,S,H     LN_attn(x + attention_output)
    layers/<i>/gelu_branch            B,S,I     gelu(x·Wi + bi)      ("intermediate_0")
    layers/<i>/gate_branch            B,S,I     x·Wg + bg            ("gate_0")
    layers/<i>/geglu                  B,S,I     gelu_branch * gate_branch
    layers/<i>/feedforward_output     B,S,H     geglu·Wout + bout    ("output_0", before the residual)
    layers/<i>/feedforward_layer_norm B,S,H     LN_ffn(feedforward_output + x): the block's output
    pooled_output                     B,H       tanh(x[:,0]·Wp + bp)
    mlm/gathered                      B,P,H     sequence_output[b, masked_lm_positions[b,p]]
    mlm/mlm_dense                     B,P,H     gelu(gathered·Wd + bd)
    mlm/mlm_transform                 B,P,H     LN_mlm(mlm_dense)
    mlm/logits                        B,P,V     mlm_transform · word^T + output_bias

`<i>` runs 0..L-1; the 17 block steps come in the order above, block after block. The `mlm/` steps
are there when the model has the MLM head; without `masked_lm_positions` the trace takes every
position 0..S-1 (P = S).

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

Someone else's port can be compared with ours: write a file with the same dataset names (or pass
`--map FILE.json`, {"their/name": "our/name"} or {"their/name": {"name": "our/name",
"transpose": [0, 2, 1, 3]}}), one dataset per intermediate. Tensors are compared after the
optional transpose and then a reshape to our shape: any layout whose elements, read in C order,
come in our order is accepted (e.g. [B*P,H] for mlm/gathered). Missing names are listed, not
counted as divergences; `order` attrs are not needed in their file.

Tolerance: an intermediate agrees when max|ours - theirs| <= rtol x max|reference| (rtol 1e-5 by
default, the parity tolerance; pooled_output, tanh-bounded, gets engine.parity.POOLED_RTOL = 2e-5
when rtol is not larger, as in the parity suite). Entries of the reference at or beyond half the mask constant
(the -1e9 of masked_scores) are compared as a pattern (both masked) and left out of the maximum,
so that the masked logits do not make the tolerance meaningless.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from engine import backend as backend_mod
from engine.inputs import validate
from engine.parity import POOLED_RTOL

TRACE_FORMAT = "talkheads-ggelu-trace"
TRACE_FORMAT_VERSION = 1
DEFAULT_RTOL = 1e-5
MASKED_THRESHOLD = 5e8        # |x| >= this is a masked logit (the mask constant is -1e9)
_SMALL_INPUTS = 8192          # inputs with at most this many ids are also stored as root attrs

EMBEDDING_STEPS = [
    ("embeddings/sum", "B,S,H", "word[ids] + position[:S] + type[type_ids]"),
    ("embeddings/layer_norm", "B,S,H", "LN(embeddings/sum): the input of block 0"),
]
BLOCK_STEPS = [
    ("q", "B,S,N,D", "x·Wq + bq"),
    ("k", "B,T,N,D", "x·Wk + bk"),
    ("v", "B,T,N,D", "x·Wv + bv"),
    ("raw_scores", "B,N,S,T", "q·k over D, before the 1/sqrt(D) scale"),
    ("scaled_scores", "B,N,S,T", "raw_scores / sqrt(D)"),
    ("mixed_scores", "B,N,S,T", "pre-softmax talking-heads mix over heads (W_pre)"),
    ("masked_scores", "B,N,S,T", "mixed_scores + (1 - mask) * -1e9"),
    ("probs", "B,N,S,T", "softmax over T"),
    ("mixed_probs", "B,N,S,T", "post-softmax talking-heads mix over heads (W_post)"),
    ("context", "B,S,N,D", "mixed_probs · v"),
    ("attention_output", "B,S,H", "context·Wo + bo, before the residual"),
    ("attention_layer_norm", "B,S,H", "LN_attn(x + attention_output)"),
    ("gelu_branch", "B,S,I", "gelu(x·Wi + bi)"),
    ("gate_branch", "B,S,I", "x·Wg + bg"),
    ("geglu", "B,S,I", "gelu_branch * gate_branch"),
    ("feedforward_output", "B,S,H", "geglu·Wout + bout, before the residual"),
    ("feedforward_layer_norm", "B,S,H", "LN_ffn(feedforward_output + x): the block output"),
]
POOLER_STEPS = [("pooled_output", "B,H", "tanh(x[:,0]·Wp + bp)")]
MLM_STEPS = [
    ("mlm/gathered", "B,P,H", "sequence_output at masked_lm_positions"),
    ("mlm/mlm_dense", "B,P,H", "gelu(gathered·Wd + bd)"),
    ("mlm/mlm_transform", "B,P,H", "LN_mlm(mlm_dense)"),
    ("mlm/logits", "B,P,V", "mlm_transform · word^T + output_bias"),
]


def steps(num_layers: int, with_mlm: bool = True) -> list[tuple[str, str, str]]:
    """(name, letters, description) of every traced intermediate, in recording order."""
    out = list(EMBEDDING_STEPS)
    for i in range(num_layers):
        out += [(f"layers/{i}/{name}", letters, what) for name, letters, what in BLOCK_STEPS]
    out += POOLER_STEPS
    if with_mlm:
        out += MLM_STEPS
    return out


def dims(config, batch: int, seq_length: int, num_positions: int | None) -> dict:
    """The value of each shape letter for a config and input sizes."""
    d = {"B": batch, "S": seq_length, "T": seq_length, "N": config.num_heads, "D": config.head_size,
         "H": config.hidden_size, "I": config.intermediate_size, "V": config.vocab_size}
    if num_positions is not None:
        d["P"] = num_positions
    return d


def expected_shape(letters: str, dim_values: dict) -> tuple[int, ...]:
    return tuple(int(dim_values[c]) for c in letters.split(","))


# ------------------------------------------------------------------------------------------ trace

@dataclasses.dataclass
class Trace:
    """An ordered {name: NumPy array} of intermediates, with the inputs and config that made it."""
    tensors: "OrderedDict[str, np.ndarray]"
    letters: dict                        # name -> "B,N,S,T"
    inputs: dict                         # the int32 inputs, NumPy
    config: dict                         # ModelConfig fields
    attrs: dict = dataclasses.field(default_factory=dict)   # backend, dtype, texts, ...

    def __getitem__(self, name):
        return self.tensors[name]

    def __contains__(self, name):
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def items(self):
        return self.tensors.items()

    def write(self, path: str, texts=None) -> None:
        """Writes the trace file (layout in this module's docstring), atomically."""
        attrs = dict(self.attrs)
        if texts is not None:
            attrs["texts"] = list(texts)
        with _TraceWriter(path, self.inputs, self.config, attrs) as w:
            for name, value in self.tensors.items():
                w.add(name, value)


def _complete_inputs(enc, inputs: dict) -> dict:
    """Checked NumPy int32 copies of the inputs; all positions 0..S-1 for the MLM when none are given."""
    with_positions = isinstance(inputs, Mapping) and "masked_lm_positions" in inputs
    ids, mask, types, positions = validate(inputs, enc.config, with_positions)  # InputError, never a cast
    out = {"input_word_ids": ids.astype(np.int32), "input_mask": mask.astype(np.int32),
           "input_type_ids": types.astype(np.int32)}
    if positions is not None:
        out["masked_lm_positions"] = positions.astype(np.int32)
    if enc.has_mlm and "masked_lm_positions" not in out:
        B, S = out["input_word_ids"].shape
        out["masked_lm_positions"] = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy()
    return out


def run(enc, inputs: dict, sink) -> dict:
    """Runs the model with `sink(name, numpy_array)` receiving every intermediate in order.

    Returns the completed NumPy inputs. Checks that the names come exactly as `steps()` says.
    """
    inputs = _complete_inputs(enc, inputs)
    expected = [name for name, _, _ in steps(enc.config.num_layers, enc.has_mlm)]
    seen = []

    def record(name, value):
        if len(seen) >= len(expected) or expected[len(seen)] != name:
            raise RuntimeError(f"trace: got {name!r} at step {len(seen)}, expected "
                               f"{expected[len(seen)] if len(seen) < len(expected) else 'nothing'!r}")
        seen.append(name)
        sink(name, backend_mod.to_numpy(value))

    if enc.has_mlm:
        enc.mlm(inputs, record=record)
    else:
        ids, mask, types, _ = enc._device_inputs(inputs, with_positions=False)
        enc._encode(ids, mask, types, record=record)
    if seen != expected:
        raise RuntimeError(f"trace: recorded {len(seen)} intermediates, expected {len(expected)}; "
                           f"first missing {expected[len(seen)]!r}")
    return inputs


def _base_attrs(enc) -> dict:
    return {"backend": enc.backend, "dtype": enc.dtype}


def trace(enc, inputs: dict) -> Trace:
    """Every intermediate of `enc` on `inputs` (Hub-style dict), in memory. See the module docstring."""
    tensors = OrderedDict()
    done = run(enc, inputs, lambda name, value: tensors.__setitem__(name, value))
    letters = {name: l for name, l, _ in steps(enc.config.num_layers, enc.has_mlm)}
    return Trace(tensors, letters, done, dataclasses.asdict(enc.config), _base_attrs(enc))


def trace_to_file(enc, inputs: dict, path: str, texts=None) -> list[str]:
    """Like `trace(...).write(path)`, but writing each intermediate as it comes (constant memory
    beyond one block). Returns the names written."""
    attrs = _base_attrs(enc)
    if texts is not None:
        attrs["texts"] = list(texts)
    done_inputs = _complete_inputs(enc, inputs)
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


def read(path: str, names_only: bool = False) -> Trace:
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
            tensors[n] = None if names_only else f[n][()]
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


# ------------------------------------------------------------------------------------------ compare

@dataclasses.dataclass
class StepDiff:
    name: str
    status: str               # "ok", "DIVERGES", "shape", "missing", "nonfinite", "mask"
    max_abs: float = float("nan")     # max |candidate - reference| (masked entries left out)
    max_ref: float = float("nan")     # max |reference| (masked entries left out)
    rtol: float = DEFAULT_RTOL
    detail: str = ""

    @property
    def relative(self) -> float:
        if not np.isfinite(self.max_abs):
            return float("nan")
        return self.max_abs / self.max_ref if self.max_ref else (0.0 if self.max_abs == 0 else float("inf"))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def diverges(self) -> bool:
        return self.status not in ("ok", "missing")

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "max_abs_diff": self.max_abs,
                "max_abs_reference": self.max_ref, "relative_diff": self.relative, "tolerance": self.rtol,
                "detail": self.detail}


def compare_arrays(name: str, reference, candidate, rtol: float = DEFAULT_RTOL, transpose=None) -> StepDiff:
    """One intermediate: candidate (optionally transposed, then reshaped to the reference's shape)
    against the reference; max|diff| <= rtol x max|reference| over the unmasked entries."""
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    if transpose is not None:
        cand = cand.transpose(transpose)
    if cand.shape != ref.shape:
        if cand.size != ref.size:
            return StepDiff(name, "shape", rtol=rtol,
                            detail=f"shape {cand.shape} cannot be read as ours {ref.shape}")
        cand = cand.reshape(ref.shape)
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    masked = np.abs(ref64) >= MASKED_THRESHOLD
    if not np.all(np.isfinite(cand64)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(cand64))[0])
        return StepDiff(name, "nonfinite", rtol=rtol, max_ref=_max_abs(ref64[~masked]),
                        detail=f"non-finite value at {bad}")
    if masked.any():
        other = np.abs(cand64) >= MASKED_THRESHOLD
        if np.any(masked != other):
            at = tuple(int(i) for i in np.argwhere(masked != other)[0])
            return StepDiff(name, "mask", rtol=rtol, max_ref=_max_abs(ref64[~masked]),
                            detail=f"masked entries differ (first at {at})")
    keep = ~masked
    diff = np.abs(cand64 - ref64)[keep]
    max_abs, max_ref = _max_abs(diff), _max_abs(ref64[keep])
    ok = max_abs <= rtol * max_ref
    detail = ""
    if not ok:
        full = np.where(keep, np.abs(cand64 - ref64), -1.0)
        at = tuple(int(i) for i in np.unravel_index(int(np.argmax(full)), full.shape))
        detail = f"largest at index {at}: reference {ref64[at]:.6g}, candidate {cand64[at]:.6g}"
    return StepDiff(name, "ok" if ok else "DIVERGES", max_abs, max_ref, rtol, detail)


def _max_abs(a) -> float:
    return float(np.abs(a).max()) if a.size else 0.0


def load_map(path: str | None) -> dict:
    """Reads a --map file: {"their/name": "our/name" | {"name": "our/name", "transpose": [...]}}.
    Returns {our_name: (their_name, transpose or None)}."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of their-name -> our-name")
    out = {}
    for theirs, ours in raw.items():
        if isinstance(ours, str):
            out[ours] = (theirs, None)
        elif isinstance(ours, dict) and isinstance(ours.get("name"), str):
            out[ours["name"]] = (theirs, ours.get("transpose"))
        else:
            raise ValueError(f"{path}: entry {theirs!r}: expected a name or {{\"name\": ..., \"transpose\": [...]}}")
    return out


def compare(reference, candidate, rtol: float = DEFAULT_RTOL, name_map: dict | None = None) -> list[StepDiff]:
    """Every intermediate of `reference` (a Trace or ordered mapping), in its order, against
    `candidate` (any mapping name -> array). name_map: from load_map()."""
    name_map = name_map or {}
    ref_items = reference.items()
    result = []
    for name, ref in ref_items:
        their_name, transpose = name_map.get(name, (name, None))
        if their_name not in candidate:
            result.append(StepDiff(name, "missing", rtol=rtol, detail=f"no {their_name!r} in the candidate"))
            continue
        tol = max(rtol, POOLED_RTOL) if name == "pooled_output" else rtol
        result.append(compare_arrays(name, ref, candidate[their_name], tol, transpose))
    return result


def first_divergence(diffs: list[StepDiff]) -> StepDiff | None:
    return next((d for d in diffs if d.diverges), None)


def format_table(diffs: list[StepDiff]) -> str:
    """A fixed-width table, one intermediate per line, the first divergence marked with '<-- first'."""
    first = first_divergence(diffs)
    width = max([len(d.name) for d in diffs] + [12])
    lines = [f"{'intermediate':<{width}} {'max|diff|':>11} {'max|ref|':>11} {'relative':>10}  status"]
    for d in diffs:
        mark = "  <-- first divergence" if d is first else ""
        lines.append(f"{d.name:<{width}} {d.max_abs:>11.3e} {d.max_ref:>11.3e} {d.relative:>10.2e}  "
                     f"{d.status}{mark}")
    return "\n".join(lines)


def summary(diffs: list[StepDiff]) -> str:
    """One line: all agree, or the first divergence with its figures."""
    first = first_divergence(diffs)
    missing = [d.name for d in diffs if d.status == "missing"]
    compared = [d for d in diffs if d.status != "missing"]
    worst = max((d.relative for d in compared if np.isfinite(d.relative)), default=0.0)
    extra = f"; {len(missing)} missing (first {missing[0]})" if missing else ""
    if first is None:
        return (f"all {len(compared)} intermediates agree (max relative difference {worst:.2e}, "
                f"tolerance {diffs[0].rtol if diffs else DEFAULT_RTOL:.0e} x max|reference|){extra}")
    figures = (f"max|diff| {first.max_abs:.3e} = {first.relative:.2e} x max|reference| {first.max_ref:.3e}"
               if first.status == "DIVERGES" else first.status)
    return (f"first divergence at {first.name} (step {diffs.index(first)} of {len(diffs)}): {figures}"
            f"{'; ' + first.detail if first.detail else ''}{extra}")
