"""The verdict: a named output compared with a reference under a rule, and the one table of verdicts.

Every comparison of the project (outputs against TensorFlow, traced intermediates, trace files,
gradients) gives a `Judgement`: the name, the rule, the figures, a status ("ok", "FAIL", "shape",
"nonfinite", "mask", "missing") and a detail; `format_table` prints a list of them, `first_failure`
finds the first that fails. Two rules:

- the noise rule (`judge`, `judge_all`, the default): judged against float32 noise measured in
  float64, below;
- the fixed tolerance (`judge_tolerance`, `verify --rtol`, `compare`): max|candidate - reference| <=
  rtol x max|reference|, for two runs that carry no float64 truth (trace files from other hardware).

The noise rule. Three runs on the same inputs: TensorFlow in float32 (the reference), the engine in
float32 (what is judged) and the engine in float64 on the same weights (the truth, up to float64
rounding). Per output (or traced intermediate), relative to its scale (max|float64| for maxima, RMS
of float64 for RMS and median):

    diff   = |engine32 - TF|        what a fixed tolerance would look at
    tf     = |TF - float64|         TensorFlow's own float32 error
    engine = |engine32 - float64|   the engine's float32 error

each as a maximum, an RMS and a median (STATISTICS). PASS needs, for every statistic:

    accurate:  engine <= ACCURACY_FACTOR x tf      the engine is at least as accurate as TF, within
                                                    a small stated factor;
    explained: tf     <= NOISE_FACTOR x noise       TF's distance to the truth is float32 noise,
                                                    noise = the largest float32 error among the
                                                    engine's runs (the judged path and, when given,
                                                    its other float32 path).

Why the other path: the fast path rounds less often than TensorFlow (fused products, the scale
folded into W_pre) and can be several times more accurate than TF (measured: TF/fast up to 9x on
the base trained-like model at 1x512); the readable path follows Model Garden's order of
operations and its error is TF-sized. The noise that TF's error must be explained by is therefore
the larger of the two.

The second rule closes the trap of a float64 truth computed from the HDF5 file: when the file (or the
engine's formula, shared by its float32 and float64 runs) differs from the SavedModel, the float64
result carries the same difference, the engine's own error stays at noise level, and TF's distance to
float64 grows past what float32 noise explains. Then diff <= engine + tf <= (1 + NOISE_FACTOR) x
engine: the two implementations differ by no more than their two errors explain. Both errors are
floored at FLOOR (one float32 ulp of the scale) so that exactly computed outputs compare as equal.

Three statistics: the maximum (a bug in one token), the RMS, and the median of |d| (a small bug in
every token: it stands out of the median of float32 noise, which outliers do not move). The factors
were measured: see ACCURACY_FACTOR and NOISE_FACTOR below for the figures behind them.

pooled_output is one token per row ([CLS] through a dense layer and tanh), mlm_logits a few per row:
a few vectors are too small a sample for their own error to measure float32 noise (on trained-like
weights one float32 run's error on 4 [CLS] vectors was 9x another's, both correct). Their noise level
is therefore at least that of the output they are computed from (PARENTS: sequence_output; in a
trace, the last block's output and the MLM steps in turn): the rules compare max(own error,
parent's error) for the engine and for TF.

The RMS of an output of fewer than FEW_VECTORS vectors (pooled_output of a small batch) is
dominated by its worst vector, a tail statistic like the maximum: there the explained rule judges
it with the maximum's factor (noise_factors). Measured: on the tiny trained-like model, a 3x77
batch with segment pairs, TF's pooled_output RMS error was 1.19e-5 against 3.35e-6 for the readable
path and 3.32e-6 for the fast path (3.55x; one row of three: 2.0e-5 vs 5.4e-6), all three correct.
The accuracy rule keeps its factors: the engine's own error must stay TF-sized.

Entries of the truth at or beyond MASKED_THRESHOLD (the -1e9 masked logits of a trace) are compared
as a pattern (masked in both) and left out of the statistics; the fixed tolerance does the same with
the reference's entries.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from weights import format as fmt

NOISE_RULE, TOLERANCE_RULE = "noise", "tolerance"
DEFAULT_RTOL = 1e-5           # the fixed tolerance's default: max|diff| <= 1e-5 x max|reference|
MASKED_THRESHOLD = 5e8        # |x| >= this is a masked logit (the mask constant is -1e9)
STATISTICS = ("max", "rms", "median")
FLOOR = 2.0 ** -23            # one float32 ulp at 1, relative to the scale
# The factors, measured (tests/test_verdict.py prints the tiny-model ratios; the base-size sweep is in
# docs/verification.md): over the tiny and base reference models, random and trained-like, 16 input shapes from
# 1x1 to 1x512, the worst clean ratios were, engine path / TF: 3.82 (max), 3.51 (rms), 1.83 (median);
# TF / noise (the larger of the readable and fast paths' errors): 3.18 (max), 2.07 (rms), 2.18
# (median); then the base trained-like 1x512 case gave 5.6 (max: one element of one block). They come
# from outputs whose error sits in a few tokens (trained-like outlier dimensions, a few [CLS] rows):
# two independent float32 roundings then differ by that much. The maximum is the tail of a rounding
# distribution, hence its factor of 10: it is there for a bug in a few tokens, which moves it by
# orders of magnitude; the median and the RMS catch a small bug in every token. A 1e-4 shift of one
# LayerNorm beta in block 6 of the base trained-like model gives TF/noise ratios of 15-23 (median)
# and 4.5-6 (rms) at that block.
ACCURACY_FACTOR = {"max": 10.0, "rms": 5.0, "median": 3.0}
NOISE_FACTOR = {"max": 10.0, "rms": 3.5, "median": 3.0}


FEW_VECTORS = 8     # below this many vectors an output's RMS is a tail statistic (see the module doc)


def noise_factors(shape, noise_factor: dict | None = None) -> dict:
    """The explained rule's factors for an output of this shape: NOISE_FACTOR (or noise_factor),
    with the maximum's factor for the RMS when the output holds fewer than FEW_VECTORS vectors of its
    last axis."""
    factors = dict(noise_factor or NOISE_FACTOR)
    vectors = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if vectors < FEW_VECTORS:
        factors["rms"] = max(factors["rms"], factors["max"])
    return factors


# output -> the output it is computed from, whose float32 noise level floors its own (see above)
PARENTS = {"pooled_output": "sequence_output", "default": "sequence_output", "mlm_logits": "sequence_output"}


def trace_parents(num_layers: int) -> dict:
    """PARENTS for the intermediates of a trace (engine.core.trace)."""
    last = fmt.block_prefix(num_layers - 1) + "feedforward_layer_norm"
    return {"pooled_output": last, "mlm/gathered": last, "mlm/mlm_dense": "mlm/gathered",
            "mlm/mlm_transform": "mlm/mlm_dense", "mlm/logits": "mlm/mlm_transform"}


@dataclasses.dataclass
class Judgement:
    """One named output, intermediate or gradient compared with a reference under a rule; figures
    relative to its scale. Noise rule: scale is max|float64| and the RMS of float64, every error dict
    holds STATISTICS. Fixed tolerance: scale is max|reference|, diff holds the maximum only, and
    tf, engine and the noise figures stay None."""
    name: str
    scale: dict                  # {"max": ..., "rms": ...}
    diff: dict                   # |candidate (engine32) - reference (TF)|
    tf: dict = None              # |TF - float64|
    engine: dict = None          # |engine32 - float64|
    status: str = "ok"           # "ok", "FAIL", "shape", "nonfinite", "mask", "missing"
    detail: str = ""
    noise: dict = None           # the largest float32 error among the engine's runs
    ruled_engine: dict = None    # the errors the rules compared: own, floored by the parent's
    ruled_tf: dict = None
    ruled_noise: dict = None
    rule: str = NOISE_RULE
    tolerance: float = None      # the fixed tolerance's rtol

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def max_ref(self) -> float:
        return self.scale["max"]

    @property
    def relative(self) -> float:
        """max|candidate - reference| relative to the scale (absolute where the scale is zero)."""
        return self.diff["max"]

    @property
    def max_abs(self) -> float:
        """max|candidate - reference|."""
        return self.diff["max"] * self.scale["max"] if self.scale["max"] else self.diff["max"]

    def as_dict(self) -> dict:
        out = {"name": self.name, "rule": self.rule, "status": self.status, "ok": self.ok, "detail": self.detail,
               "max_abs_diff": self.max_abs, "max_abs_reference": self.max_ref, "relative_diff": self.relative}
        if self.rule == TOLERANCE_RULE:
            return out | {"tolerance": self.tolerance}
        return out | {"scale": self.scale, "engine_vs_tf": self.diff, "tf_vs_float64": self.tf,
                      "engine_vs_float64": self.engine, "noise": self.noise, "ruled_engine_vs_float64": self.ruled_engine,
                      "ruled_tf_vs_float64": self.ruled_tf, "ruled_noise": self.ruled_noise,
                      "accuracy_factor": ACCURACY_FACTOR, "noise_factor": NOISE_FACTOR}


def not_compared(name: str, status: str, detail: str, rule: str = NOISE_RULE, tolerance: float | None = None) -> Judgement:
    """A failure with no figures: the comparison could not be made (status "shape", "nonfinite",
    "mask" or "missing")."""
    nan = {s: float("nan") for s in STATISTICS}
    noise = rule == NOISE_RULE
    return Judgement(name, nan, dict(nan), dict(nan) if noise else None, dict(nan) if noise else None, status, detail,
                     rule=rule, tolerance=tolerance)


def _mask_mismatch(masked, candidates) -> str:
    """The first side whose masked entries (|x| >= MASKED_THRESHOLD) differ from `masked`, or ''."""
    for label, a in candidates:
        other = np.abs(a) >= MASKED_THRESHOLD
        if np.any(masked != other):
            return f"{label}: masked entries differ (first at {tuple(int(i) for i in np.argwhere(masked != other)[0])})"
    return ""


def _stats(d, scale) -> dict:
    """max|d| relative to max|truth|; RMS and median of |d| relative to the RMS of the truth."""
    if d.size == 0:
        return {s: 0.0 for s in STATISTICS}
    a = np.abs(d)
    per = lambda v, by: v / by if by else v  # noqa: E731
    return {"max": per(float(a.max()), scale["max"]), "rms": per(float(np.sqrt(np.mean(a * a))), scale["rms"]),
            "median": per(float(np.median(a)), scale["rms"])}


def rule_failures(engine: dict, tf: dict, noise: dict | None = None, accuracy_factor: dict | None = None,
                  noise_factor: dict | None = None) -> list[str]:
    """What the two rules say about an engine error, a TF error and the noise level (the largest of the
    engine's float32 errors; default: `engine`), relative figures: [] on PASS. Factors default to
    ACCURACY_FACTOR and NOISE_FACTOR."""
    noise = engine if noise is None else noise
    accuracy_factor = accuracy_factor or ACCURACY_FACTOR
    noise_factor = noise_factor or NOISE_FACTOR
    out = []
    for s in STATISTICS:
        e, t, n = max(engine[s], FLOOR), max(tf[s], FLOOR), max(noise[s], FLOOR)
        if e > accuracy_factor[s] * t:
            out.append(f"engine {s} error {engine[s]:.2e} > {accuracy_factor[s]:g} x TF's {tf[s]:.2e}")
        if t > noise_factor[s] * n:
            out.append(f"TF's {s} distance to float64 {tf[s]:.2e} > {noise_factor[s]:g} x the engine's "
                       f"float32 error {noise[s]:.2e}: more than float32 noise")
    return out


def judge(name: str, engine32, reference, exact, parent: Judgement | None = None, others=(),
          accuracy_factor: dict | None = None, noise_factor: dict | None = None) -> Judgement:
    """One output or intermediate: engine32 (float32), reference (TF, float32), exact (engine float64).
    The reference may come in any layout that reshapes to ours in C order. `parent`: the judgement of
    the output this one is computed from, whose errors floor this one's in the rules (PARENTS).
    `others`: the same output from the engine's other float32 runs, for the noise level."""
    ours, exact = np.asarray(engine32, np.float64), np.asarray(exact, np.float64)
    theirs = np.asarray(reference, np.float64)
    if theirs.size != ours.size or exact.shape != ours.shape:
        return not_compared(name, "shape", f"shapes {ours.shape} (engine), {theirs.shape} (TF), {exact.shape} (float64)")
    theirs = theirs.reshape(ours.shape)
    for label, a in (("engine", ours), ("TF", theirs), ("float64", exact)):
        if not np.all(np.isfinite(a)):
            at = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
            return not_compared(name, "nonfinite", f"{label} has a non-finite value at {at}")
    masked = np.abs(exact) >= MASKED_THRESHOLD
    mismatch = _mask_mismatch(masked, (("engine", ours), ("TF", theirs))) if masked.any() else ""
    if mismatch:
        return not_compared(name, "mask", mismatch)
    keep = ~masked
    x = exact[keep]
    scale = {"max": float(np.abs(x).max()) if x.size else 0.0,
             "rms": float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0}
    j = Judgement(name, scale, _stats(ours[keep] - theirs[keep], scale), _stats(theirs[keep] - x, scale),
                  _stats(ours[keep] - x, scale))
    j.noise = dict(j.engine)
    for other in others:
        other_err = _stats(np.asarray(other, np.float64)[keep] - x, scale)
        j.noise = {s: max(j.noise[s], other_err[s]) for s in STATISTICS}
    j.ruled_engine, j.ruled_tf, j.ruled_noise = j.engine, j.tf, j.noise
    if parent is not None and parent.ok:
        j.ruled_engine = {s: max(j.engine[s], parent.ruled_engine[s]) for s in STATISTICS}
        j.ruled_tf = {s: max(j.tf[s], parent.ruled_tf[s]) for s in STATISTICS}
        j.ruled_noise = {s: max(j.noise[s], parent.ruled_noise[s]) for s in STATISTICS}
    failures = rule_failures(j.ruled_engine, j.ruled_tf, j.ruled_noise, accuracy_factor,
                             noise_factors(ours.shape, noise_factor))
    if failures:
        j.status, j.detail = "FAIL", "; ".join(failures)
    return j


def judge_all(engine32: dict, reference: dict, exact: dict, names=None, parents: dict | None = None,
              others=()) -> list[Judgement]:
    """judge() over the names of `exact` (or `names`), in that order; a name the reference or the
    engine lacks is a failure ("missing"), never agreement. parents: {name: parent name}, default
    PARENTS. others: dicts of the engine's other float32 runs (the noise level, see judge)."""
    parents = PARENTS if parents is None else parents
    names = list(names if names is not None else exact)
    done = {}
    depth = lambda n: 0 if n not in parents else 1 + depth(parents[n])  # noqa: E731
    for name in sorted(names, key=depth):   # parents first
        if name not in reference or name not in engine32:
            done[name] = not_compared(name, "missing", f"not in {'TF' if name not in reference else 'the engine'}'s results")
            continue
        done[name] = judge(name, engine32[name], reference[name], exact[name], parent=done.get(parents.get(name)),
                           others=[o[name] for o in others if name in o])
    return [done[name] for name in names]


# ---------------------------------------------------------------------------- the fixed tolerance

def judge_tolerance(name: str, candidate, reference, rtol: float = DEFAULT_RTOL, transpose=None) -> Judgement:
    """The fixed tolerance: max|candidate - reference| <= rtol x max|reference| over the entries the
    reference does not mask. The candidate is first transposed (when given), then read in the
    reference's shape (any layout whose elements come in the same C order)."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if transpose is not None:
        cand = cand.transpose(transpose)
    if cand.size != ref.size:
        return not_compared(name, "shape", f"shape {cand.shape} cannot be read as the reference's {ref.shape}",
                       TOLERANCE_RULE, rtol)
    cand = cand.reshape(ref.shape)
    masked = np.abs(ref) >= MASKED_THRESHOLD
    keep = ~masked
    scale = {"max": float(np.abs(ref[keep]).max()) if keep.any() else 0.0}
    if not np.all(np.isfinite(cand)):
        at = tuple(int(i) for i in np.argwhere(~np.isfinite(cand))[0])
        return dataclasses.replace(not_compared(name, "nonfinite", f"non-finite value at {at}", TOLERANCE_RULE, rtol),
                                   scale=scale)
    mismatch = _mask_mismatch(masked, (("candidate", cand),)) if masked.any() else ""
    if mismatch:
        return dataclasses.replace(not_compared(name, "mask", mismatch, TOLERANCE_RULE, rtol), scale=scale)
    diff = np.where(keep, np.abs(cand - ref), -1.0)
    max_abs = float(diff.max()) if keep.any() else 0.0
    j = Judgement(name, scale, {"max": max_abs / scale["max"] if scale["max"] else max_abs},
                  rule=TOLERANCE_RULE, tolerance=rtol)
    if not max_abs <= rtol * scale["max"]:   # a NaN reference fails too
        at = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
        j.status = "FAIL"
        j.detail = f"largest at index {at}: reference {ref[at]:.6g}, candidate {cand[at]:.6g}"
    return j


# ---------------------------------------------------------------------------- reading verdicts

def first_failure(judgements: list[Judgement]) -> Judgement | None:
    """The first judgement that is not ok (a missing one included), in the list's order."""
    return next((j for j in judgements if not j.ok), None)


def format_table(judgements: list[Judgement]) -> str:
    """One line per judgement, the first failure marked: for the noise rule the three distances (max,
    RMS and median, relative to scale), for the fixed tolerance max|diff|, max|ref|, their ratio and
    the tolerance. One rule per table."""
    rules = {j.rule for j in judgements}
    if len(rules) > 1:
        raise ValueError(f"format_table: one rule per table, got {sorted(rules)}")
    width = max([len(j.name) for j in judgements] + [12])
    if rules == {TOLERANCE_RULE}:
        head = f"{'name':<{width}}  {'max|diff|':>10} {'max|ref|':>10} {'relative':>9} {'tolerance':>9}  verdict"
        row = lambda j: f"{j.max_abs:>10.3e} {j.max_ref:>10.3e} {j.relative:>9.2e} {j.tolerance:>9.0e}"  # noqa: E731
    else:
        group = 3 * 9 - 1
        head = (f"{'name':<{width}}  {'engine vs TF':^{group}}  {'TF vs float64':^{group}}  "
                f"{'engine vs float64':^{group}}  verdict\n" + f"{'':<{width}}" + f"  {'max':>8} {'rms':>8} {'median':>8}" * 3)
        row = lambda j: "  ".join(" ".join(f"{d[s]:>8.1e}" for s in STATISTICS) for d in (j.diff, j.tf, j.engine))  # noqa: E731
    lines = [head]
    first = first_failure(judgements)
    for j in judgements:
        mark = "  <-- first" if j is first else ""
        lines.append(f"{j.name:<{width}}  {row(j)}  {'PASS' if j.ok else j.status}{mark}")
    return "\n".join(lines)


def rule_text() -> str:
    f = lambda d: "/".join(f"{d[s]:g}" for s in STATISTICS)  # noqa: E731
    return (f"noise verdict: engine32-vs-float64 <= {f(ACCURACY_FACTOR)} x TF-vs-float64 and TF-vs-float64 <= "
            f"{f(NOISE_FACTOR)} x the engine's float32 noise, the largest error of its float32 runs ({'/'.join(STATISTICS)}; "
            f"rms as a tail, x {NOISE_FACTOR['max']:g}, over fewer than {FEW_VECTORS} vectors; "
            f"errors floored at {FLOOR:.1e} of scale)")


# ---------------------------------------------------------------------------- gradients

# The backward pass (engine/core/tape.py) is judged weight by weight, each gradient relative to its
# own float64 scale, by the same two rules with one factor, GRADIENT_FACTOR, and a floor. Why both:
# a weight's gradient is a long sum over the batch of products of activations, and on trained-like
# weights it is ill-conditioned: float32 rounding anywhere in the forward moves it (measured on the
# base trained-like model: gradient errors near 1e-3 of scale from a forward whose error is 1e-5;
# computing only the GEMMs, or only the GELU, in float64 changes them by 2-3x). Two float32
# implementations then differ per batch by a common random factor, the *draw* (the median over
# weights of engine error / TF error: 0.16 to 2.8 measured per batch, tiny and base, random and
# trained-like; 0.16 on the base trained-like model at 1x128, where TF's gradients are 4e-3 off),
# and per weight around it (up to 6x; an independent XLA implementation of this model measures up
# to 6x too). So, per batch:
#   draw       = median over weights of (engine RMS error / TF RMS error); FAIL outside
#                [1/GRADIENT_DRAW_LIMIT, GRADIENT_DRAW_LIMIT]: a whole batch that much less accurate
#                than TF (a float32-only bug), or TF that much further from float64 than the engine
#                (a formula bug the float64 run shares: nothing else tells it from TF being noisier
#                by chance, so such a bug is found once it exceeds the widest draws, 10x the noise);
#   accurate:  engine error <= GRADIENT_FACTOR x max(TF's error, floor_tf) x max(1, draw)
#   explained: TF's error   <= GRADIENT_FACTOR x max(engine error, floor_engine) x max(1, 1/draw)
# where floor_tf (floor_engine) is the median over the batch's weights of TF's (the engine's) error:
# an error below the batch's typical float32 gradient noise is not told apart. Each floor comes from
# the side the rule does not judge. Over the model, the engine must be no less accurate than TF:
# the geometric mean over batches of the draw <= GRADIENT_MEDIAN_RATIO. tests/test_backward.py
# prints every figure.
GRADIENT_FACTOR = 10.0
GRADIENT_DRAW_LIMIT = 10.0
GRADIENT_MEDIAN_RATIO = 1.25
# A gradient that is zero in exact arithmetic (the key biases: adding b to every key adds the same
# q·b to a whole row of logits, which the softmax ignores, and the talking-heads mix keeps it
# constant over the row) has no scale of its own: its float32 value is pure rounding noise. It is
# judged against the scale of a sibling gradient (the query bias of the same block): the engine's
# float32 noise <= ZERO_GRADIENT_FACTOR x TF's (floored at FLOOR x that scale), and float64's
# <= ZERO_GRADIENT_FLOAT64 x that scale (float64 rounding: measured up to 9e-12 at base size, where
# float32 noise is 1e-7 to 1e-5; a gradient that is not zero, e.g. from a mask added before the
# pre-softmax mix, is of order 1).
ZERO_GRADIENT_FACTOR = 10.0
ZERO_GRADIENT_FLOAT64 = 1e-9
_NO_RULE = {s: float("inf") for s in STATISTICS}


def zero_gradients(num_layers: int) -> dict[str, str]:
    """{path of a gradient that is exactly zero in exact arithmetic: path of the sibling whose scale
    judges it}: the key biases."""
    return {fmt.block_path(i, "attention/key/bias"): fmt.block_path(i, "attention/query/bias") for i in range(num_layers)}


def judge_zero_gradient(name: str, engine32, reference, exact, sibling_exact) -> Judgement:
    """A mathematically zero gradient: all three runs at noise level relative to its sibling's RMS."""
    sibling = np.asarray(sibling_exact, np.float64)
    scale = {"max": float(np.abs(sibling).max()), "rms": float(np.sqrt(np.mean(sibling ** 2)))}
    size = lambda a: _stats(np.asarray(a, np.float64), scale)  # noqa: E731  distances to exact zero
    j = Judgement(name, scale, _stats(np.asarray(engine32, np.float64) - np.asarray(reference, np.float64), scale),
                  size(reference), size(engine32))
    j.noise = j.ruled_noise = dict(j.engine)
    j.ruled_engine, j.ruled_tf = j.engine, j.tf
    own = size(exact)
    problems = []
    if own["max"] > ZERO_GRADIENT_FLOAT64:
        problems.append(f"float64 gradient {own['max']:.1e} of the sibling's scale, expected 0 (<= {ZERO_GRADIENT_FLOAT64:g})")
    if max(j.engine["max"], FLOOR) > ZERO_GRADIENT_FACTOR * max(j.tf["max"], FLOOR):
        problems.append(f"float32 noise {j.engine['max']:.1e} > {ZERO_GRADIENT_FACTOR:g} x TF's {j.tf['max']:.1e}")
    if problems:
        j.status, j.detail = "FAIL", "zero in exact arithmetic: " + "; ".join(problems)
    return j


@dataclasses.dataclass
class GradientVerdict:
    """The gradients of one batch: a Judgement per weight (the rules above), and the figures."""
    judgements: list                  # one Judgement per weight, in the order of `exact`
    floor_tf: dict                    # median over weights of TF's error, per statistic
    floor_engine: dict                # median over weights of the engine's error
    median_ratio: float               # the draw: median over weights of engine RMS error / TF RMS error
    worst_ratio: float                # the largest such ratio, and its weight
    worst_weight: str

    @property
    def draw_ok(self) -> bool:
        return 1.0 / GRADIENT_DRAW_LIMIT <= self.median_ratio <= GRADIENT_DRAW_LIMIT

    @property
    def ok(self) -> bool:
        return self.draw_ok and all(j.ok for j in self.judgements)

    def failures(self) -> list[str]:
        out = [f"{j.name}: {j.status} {j.detail}" for j in self.judgements if not j.ok]
        if not self.draw_ok:
            out.append(f"the batch's draw (median over weights of engine/TF RMS error) {self.median_ratio:.2f} is "
                       f"outside [1/{GRADIENT_DRAW_LIMIT:g}, {GRADIENT_DRAW_LIMIT:g}]")
        return out


def judge_gradients(engine32: dict, reference: dict, exact: dict, num_layers: int) -> GradientVerdict:
    """Every weight's float32 gradient (engine32) against TF's (reference) and the engine's float64
    gradient (exact) for one batch, keyed by HDF5 path; a weight missing on either side fails."""
    zero = zero_gradients(num_layers)
    judgements, regular = [], []
    for name in exact:
        if name not in reference or name not in engine32:
            judgements.append(not_compared(name, "missing", f"not in {'TF' if name not in reference else 'the engine'}'s gradients"))
        elif name in zero:
            judgements.append(judge_zero_gradient(name, engine32[name], reference[name], exact[name], exact[zero[name]]))
        else:
            j = judge(name, engine32[name], reference[name], exact[name], accuracy_factor=_NO_RULE, noise_factor=_NO_RULE)
            judgements.append(j)
            if j.status == "ok":
                regular.append(j)
    floor_tf = {s: float(np.median([j.tf[s] for j in regular])) if regular else FLOOR for s in STATISTICS}
    floor_engine = {s: float(np.median([j.engine[s] for j in regular])) if regular else FLOOR for s in STATISTICS}
    ratios = {j.name: max(j.engine["rms"], FLOOR) / max(j.tf["rms"], FLOOR) for j in regular}
    draw = float(np.median(list(ratios.values()))) if ratios else 1.0
    allow_engine, allow_tf = max(1.0, min(draw, GRADIENT_DRAW_LIMIT)), max(1.0, min(1.0 / draw, GRADIENT_DRAW_LIMIT))
    for j in regular:
        j.ruled_tf = {s: max(j.tf[s], floor_tf[s]) * allow_engine for s in STATISTICS}
        j.ruled_noise = {s: max(j.engine[s], floor_engine[s]) * allow_tf for s in STATISTICS}
        problems = []
        for s in STATISTICS:
            if max(j.engine[s], FLOOR) > GRADIENT_FACTOR * max(j.ruled_tf[s], FLOOR):
                problems.append(f"engine {s} error {j.engine[s]:.2e} > {GRADIENT_FACTOR:g} x max(TF's {j.tf[s]:.2e}, "
                                f"the batch's median TF error {floor_tf[s]:.2e}) x the batch's draw {allow_engine:.2f}")
            if max(j.tf[s], FLOOR) > GRADIENT_FACTOR * max(j.ruled_noise[s], FLOOR):
                problems.append(f"TF's {s} distance to float64 {j.tf[s]:.2e} > {GRADIENT_FACTOR:g} x max(the engine's "
                                f"float32 error {j.engine[s]:.2e}, its batch median {floor_engine[s]:.2e}) x "
                                f"{allow_tf:.2f}: more than float32 noise")
        if problems:
            j.status, j.detail = "FAIL", "; ".join(problems)
    worst = max(ratios, key=ratios.get) if ratios else ""
    return GradientVerdict(judgements, floor_tf, floor_engine, draw, ratios.get(worst, float("nan")), worst)


def gradient_accuracy(verdicts: list) -> tuple[float, bool]:
    """(geometric mean over batches of the median engine/TF RMS error ratio, <= GRADIENT_MEDIAN_RATIO?)"""
    ratios = [v.median_ratio for v in verdicts]
    mean = float(np.exp(np.mean(np.log(ratios))))
    return mean, mean <= GRADIENT_MEDIAN_RATIO
