"""Compare two traces (engine.core.trace): the first divergence in the reference's order, and a table.

    from engine.tools import compare, tracefile
    diffs = compare.compare(tracefile.read("ours.h5"), tracefile.read("theirs.h5").tensors)
    print(compare.format_table(diffs)); print(compare.summary(diffs))

    python -m engine compare ours.h5 theirs.h5 [--rtol 1e-5] [--map their_names.json]

Someone else's port can be compared with ours: write a file with the same dataset names (or pass
`--map FILE.json`, {"their/name": "our/name"} or {"their/name": {"name": "our/name",
"transpose": [0, 2, 1, 3]}}), one dataset per intermediate. Tensors are compared after the
optional transpose and then a reshape to our shape: any layout whose elements, read in C order,
come in our order is accepted (e.g. [B*P,H] for mlm/gathered). An intermediate of ours that their
file lacks is a failure ("missing"), and so is a comparison of nothing: agreement means every
intermediate was compared and agrees. `order` attrs are not needed in their file.

Tolerance: two trace files carry no float64 truth, so this is the plain threshold for people who
port to other hardware: an intermediate agrees when max|ours - theirs| <= rtol x max|reference|
(rtol 1e-5 by default; pooled_rtol for pooled_output, equal to rtol unless given). `verify --trace`
judges against measured float32 noise instead (engine.tools.verdict). Entries of the reference at
or beyond half the mask constant (the -1e9 of masked_scores) are compared as a pattern (both
masked) and left out of the maximum, so that the masked logits do not make the tolerance meaningless.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

DEFAULT_RTOL = 1e-5
MASKED_THRESHOLD = 5e8        # |x| >= this is a masked logit (the mask constant is -1e9)


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


def compare(reference, candidate, rtol: float = DEFAULT_RTOL, name_map: dict | None = None,
            pooled_rtol: float | None = None) -> list[StepDiff]:
    """Every intermediate of `reference` (a Trace or ordered mapping), in its order, against
    `candidate` (any mapping name -> array). name_map: from load_map(). pooled_rtol: the tolerance
    of pooled_output (default: rtol)."""
    name_map = name_map or {}
    ref_items = reference.items()
    result = []
    for name, ref in ref_items:
        their_name, transpose = name_map.get(name, (name, None))
        if their_name not in candidate:
            result.append(StepDiff(name, "missing", rtol=rtol, detail=f"no {their_name!r} in the candidate"))
            continue
        tol = pooled_rtol if pooled_rtol is not None and name == "pooled_output" else rtol
        result.append(compare_arrays(name, ref, candidate[their_name], tol, transpose))
    return result


def first_divergence(diffs: list[StepDiff]) -> StepDiff | None:
    """The first intermediate that does not agree (a missing one included), in the reference's order."""
    return next((d for d in diffs if not d.ok), None)


def agree(diffs: list[StepDiff]) -> bool:
    """True when something was compared and every intermediate agrees."""
    return bool(diffs) and first_divergence(diffs) is None


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
    if not diffs:
        return "nothing compared: the reference has no intermediates"
    if first is None:
        return (f"all {len(compared)} intermediates agree (max relative difference {worst:.2e}, "
                f"tolerance {diffs[0].rtol if diffs else DEFAULT_RTOL:.0e} x max|reference|){extra}")
    figures = (f"max|diff| {first.max_abs:.3e} = {first.relative:.2e} x max|reference| {first.max_ref:.3e}"
               if first.status == "DIVERGES" else first.status)
    return (f"first divergence at {first.name} (step {diffs.index(first)} of {len(diffs)}): {figures}"
            f"{'; ' + first.detail if first.detail else ''}{extra}")

