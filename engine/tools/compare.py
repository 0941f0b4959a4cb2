"""Compare two traces (engine.core.trace): the first divergence in the reference's order, and a table.

    from engine.tools import compare, tracefile, verdict
    judgements = compare.compare(tracefile.read("ours.h5"), tracefile.read("theirs.h5").tensors)
    print(verdict.format_table(judgements)); print(compare.summary(judgements))

    python -m engine compare ours.h5 theirs.h5 [--rtol 1e-5] [--map their_names.json]

Someone else's port can be compared with ours: write a file with the same dataset names (or pass
`--map FILE.json`, {"their/name": "our/name"} or {"their/name": {"name": "our/name",
"transpose": [0, 2, 1, 3]}}), one dataset per intermediate. Tensors are compared after the
optional transpose and then a reshape to our shape: any layout whose elements, read in C order,
come in our order is accepted (e.g. [B*P,H] for mlm/gathered). An intermediate of ours that their
file lacks is a failure ("missing"), and so is a comparison of nothing: agreement means every
intermediate was compared and agrees. `order` attrs are not needed in their file.

The rule: two trace files carry no float64 truth, so each intermediate is judged by the verdict's
fixed tolerance (engine.tools.verdict.judge_tolerance), the plain threshold for people who port to
other hardware: max|ours - theirs| <= rtol x max|reference| (rtol 1e-5 by default; pooled_rtol for
pooled_output, equal to rtol unless given), masked logits (the -1e9 of masked_scores) compared as a
pattern and left out of the maximum. `verify --trace` judges against measured float32 noise instead.
"""

from __future__ import annotations

import json

import numpy as np

from engine.tools import verdict
from engine.tools.verdict import DEFAULT_RTOL, Judgement


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
            pooled_rtol: float | None = None) -> list[Judgement]:
    """Every intermediate of `reference` (a Trace or ordered mapping), in its order, against
    `candidate` (any mapping name -> array), by the fixed tolerance. name_map: from load_map().
    pooled_rtol: the tolerance of pooled_output (default: rtol)."""
    name_map = name_map or {}
    result = []
    for name, ref in reference.items():
        their_name, transpose = name_map.get(name, (name, None))
        tol = pooled_rtol if pooled_rtol is not None and name == "pooled_output" else rtol
        if their_name not in candidate:
            result.append(verdict.not_compared(name, "missing", f"no {their_name!r} in the candidate",
                                               verdict.TOLERANCE_RULE, tol))
            continue
        result.append(verdict.judge_tolerance(name, candidate[their_name], ref, tol, transpose))
    return result


def agree(judgements: list[Judgement]) -> bool:
    """True when something was compared and every intermediate agrees."""
    return bool(judgements) and verdict.first_failure(judgements) is None


def summary(judgements: list[Judgement]) -> str:
    """One line: all agree, or the first divergence with its figures."""
    if not judgements:
        return "nothing compared: the reference has no intermediates"
    first = verdict.first_failure(judgements)
    missed = [j.name for j in judgements if j.status == "missing"]
    compared = [j for j in judgements if j.status != "missing"]
    worst = max((j.relative for j in compared if np.isfinite(j.relative)), default=0.0)
    extra = f"; {len(missed)} missing (first {missed[0]})" if missed else ""
    if first is None:
        return (f"all {len(compared)} intermediates agree (max relative difference {worst:.2e}, "
                f"tolerance {judgements[0].tolerance:.0e} x max|reference|){extra}")
    figures = (f"max|diff| {first.max_abs:.3e} = {first.relative:.2e} x max|reference| {first.max_ref:.3e}"
               if first.status == "FAIL" else first.status)
    return (f"first divergence at {first.name} (step {judgements.index(first)} of {len(judgements)}): {figures}"
            f"{'; ' + first.detail if first.detail else ''}{extra}")
