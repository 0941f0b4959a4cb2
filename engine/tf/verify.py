"""`verify`: the engine against TensorFlow running the same SavedModel.

    result = verify.run(verify.VerifyOptions(savedmodel="talkheads/", weights="talkheads.h5"), say=print)
    result.ok, result.report (a JSON-able dict), result.sections (the printed tables, in order)

The SavedModel may be of either family Model Garden exports (weights.tf_names.LAYOUTS): talking-heads
GEGLU or standard BERT; without one, the tiny reference model of `family` is built. Three encoders
on one weights file: the engine in float32 on the chosen path (fast, readable or fused GPU), the
engine in float64 (the truth), and the other float32 path (the float32 noise level; the CPU's fast
path for a family the fused GPU path does not compute); TensorFlow runs the SavedModel. The verdict is engine.tools.verdict's; with `rtol`, a plain
fixed tolerance instead (no float64 run). `trace=True` compares every intermediate with
TensorFlow's step-by-step trace and reports the first divergence.

Before anything runs, a weights file given apart from the SavedModel is checked against the
SavedModel's variables: a different config or different shapes is an error saying what differs;
different values are reported in a warning (the verdict then shows where they matter).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
import warnings

import h5py
import numpy as np

import engine
from engine.core.backend import resolve_name
from engine.text.preprocess import Preprocessor
from engine.tools import parity, verdict
from weights import format as fmt
from weights.tf_names import ExtractionError, match_variables

# A few sentences of our own, single and paired, that run real text through the preprocessor.
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Talking-heads attention mixes the attention logits across heads before and after the softmax.",
    "Zürich's café served crème brûlée — naïvely priced at €4.50!",
    "東京は日本の首都です。",
    "A gated GELU feed-forward multiplies a GELU branch by a linear gate.",
]
SAMPLE_PAIRS = [
    ("How many layers does the base model have?", "It has twelve transformer blocks of width 768."),
    ("Is the MLM head tied?", "Yes, its output matrix is the word embedding table."),
]
CONFIG_FIELDS = ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings")


# TensorFlow's start-up lines that say nothing about the work (written to fd 2 before its logging
# starts, so TF_CPP_MIN_LOG_LEVEL cannot hold them back), and Keras' note that the encoder inside
# the MLM model ignores masked_lm_positions, which is by design.
STARTUP_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
                 "cudart_stub.cc", "cuda_platform.cc", "failed call to cuInit", "cpu_feature_guard.cc",
                 "To enable the following instructions", "rebuild TensorFlow with the appropriate compiler flags",
                 "Unable to register cuDNN", "Unable to register cuFFT", "Unable to register cuBLAS",
                 "computation placer already registered", "TF-TRT Warning")
IGNORED_WARNING = r"Input dict contained keys \['masked_lm_positions'\]"


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and starts its devices with fd 2 held, then writes back every line that is
    not start-up noise (STARTUP_NOISE); Keras' masked_lm_positions note is filtered. For the
    command line, which asks for it; a library user gets TensorFlow as it is."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message=IGNORED_WARNING)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        lines = held.read().decode("utf-8", "replace").splitlines()
    for line in lines:
        if line.strip() and not any(noise in line for noise in STARTUP_NOISE):
            print(line, file=sys.stderr)


class VerifyError(ValueError):
    """verify cannot run as asked (a missing SavedModel, a weights file of another model, ...)."""


@dataclasses.dataclass
class VerifyOptions:
    savedmodel: str | None = None       # default: the tiny reference model of `family`, built once
    family: str = "talking_heads"       # engine.tf.reference.FAMILIES: talking_heads or bert
    weights: str | None = None          # default: the SavedModel extracted once, cached
    backend: str | None = None
    readable: bool = False
    batch: int = 8
    seq_length: int = 128
    rtol: float | None = None
    pooled_rtol: float | None = None
    seed: int = 0
    trace: bool = False


@dataclasses.dataclass
class Verification:
    ok: bool
    report: dict
    sections: list          # printable text blocks, one or more per input set
    closing: str            # what the PASS/FAIL line is about


# ------------------------------------------------------------------------------------------ inputs

def verify_inputs(enc, batch: int, seq_length: int, seed: int) -> dict:
    """Two input sets: real text through the preprocessor, and random ids with padding structure.
    Each row carries min(S, 32) MLM positions, so that mlm_logits is judged on a sample of tokens
    large enough for its error statistics to be stable."""
    if not enc.vocab:
        raise VerifyError("the weights file holds no vocab: verify's text inputs need one")
    prep = Preprocessor.from_weights(enc, max_seq_length=None)
    texts = (SAMPLE_TEXTS * (batch // len(SAMPLE_TEXTS) + 1))[:max(batch - len(SAMPLE_PAIRS), 1)]
    singles = prep(texts, seq_length=seq_length)
    first = prep.tokenize([a for a, _ in SAMPLE_PAIRS])
    second = prep.tokenize([b for _, b in SAMPLE_PAIRS])
    pairs = prep.bert_pack_inputs([first, second], seq_length=seq_length)
    text_inputs = {k: np.concatenate([singles[k], pairs[k]])[:batch] for k in singles}
    rng = np.random.default_rng(seed)
    real = text_inputs["input_mask"].sum(axis=1)
    positions = min(seq_length, 32)
    text_inputs["masked_lm_positions"] = np.stack(
        [np.sort(rng.integers(0, max(int(n), 1), positions)) for n in real]).astype(np.int32)
    random_inputs = parity.random_inputs(rng, batch, seq_length, enc.config.vocab_size,
                                         all_padding_row=batch > 2, num_positions=positions,
                                         type_vocab_size=enc.config.type_vocab_size)
    return {"text": text_inputs, "random": random_inputs}


# ------------------------------------------------------------------------------------------ the weights vs the SavedModel

def weights_differences(savedmodel: str, weights_path: str, config: fmt.ModelConfig) -> tuple[list[str], list[str]]:
    """(config and shape differences, tensors whose values differ) between a weights file and the
    SavedModel's variables. Tensors are read one at a time."""
    from engine.tf.extract import read_savedmodel
    try:
        plan = match_variables(read_savedmodel(savedmodel))
    except ExtractionError as e:
        raise VerifyError(f"--savedmodel {savedmodel}: {str(e).splitlines()[0]}") from None
    ours, theirs = dataclasses.asdict(config), dataclasses.asdict(plan.config)
    shape_problems = [f"{k}: SavedModel {theirs[k]}, weights {ours[k]}" for k in ours
                      if k in theirs and k != "do_lower_case" and ours[k] != theirs[k]]
    if shape_problems:
        return shape_problems, []
    value_problems = []
    with h5py.File(weights_path, "r") as f:
        for path, var in plan.mapping.items():
            if path not in f:
                shape_problems.append(f"{path}: in the SavedModel ({var.name}), not in the weights file")
                continue
            ours_value, theirs_value = f[path][()], np.asarray(var.read())
            if ours_value.shape != theirs_value.shape:
                shape_problems.append(f"{path}: SavedModel {theirs_value.shape}, weights {ours_value.shape}")
            elif not np.array_equal(ours_value, theirs_value):
                value_problems.append(f"{path} (max |difference| "
                                      f"{float(np.max(np.abs(ours_value.astype(np.float64) - theirs_value))):.3g})")
    return shape_problems, value_problems


def check_weights_match(savedmodel: str, weights_path: str, config, say) -> None:
    """VerifyError listing what differs when the weights file is of another model than the
    SavedModel; a warning (through `say`) when only values differ."""
    shapes, values = weights_differences(savedmodel, weights_path, config)
    if shapes:
        listed = "; ".join(shapes[:6]) + (f"; ... ({len(shapes)} in all)" if len(shapes) > 6 else "")
        raise VerifyError(f"--weights {weights_path}: does not match --savedmodel {savedmodel}: {listed}")
    if values:
        say(f"verify: warning: {len(values)} tensors of --weights differ from the SavedModel's variables "
            f"(first: {values[0]}); the verdict below shows what that changes")


# ------------------------------------------------------------------------------------------ the run

def rule_text(options: VerifyOptions) -> str:
    if options.rtol is None:
        return verdict.rule_text()
    pooled = options.rtol if options.pooled_rtol is None else options.pooled_rtol
    return (f"fixed tolerance: max|engine - TF| <= {options.rtol:.1e} x max|TF| per output "
            f"(pooled_output {pooled:.1e})")


def _fused_gpu_runs(weights_path: str) -> bool:
    """Whether the fused GPU path computes the file's model family (engine/gpu runs one)."""
    from engine.gpu.forward import FUSED_FAMILY
    with h5py.File(weights_path, "r") as f:
        return fmt.ModelConfig.from_attrs(f.attrs).family == FUSED_FAMILY


def _encoders(weights_path: str, options: VerifyOptions):
    """(the judged encoder, the float64 truth or None, the other float32 path or None, path name)."""
    numpy_backend = resolve_name(options.backend) == "numpy"
    fast = not options.readable and numpy_backend
    plain_only = not numpy_backend and not _fused_gpu_runs(weights_path)
    enc = engine.load(weights_path, backend=options.backend, fast=fast, **({"gpu_path": "plain"} if plain_only else {}))
    enc64 = other = None
    if options.rtol is None:   # the noise verdict: the float64 truth, and the other float32 path for the noise level
        enc64 = engine.load(weights_path, backend=options.backend, dtype="float64")
        if plain_only:         # one GPU path for this family: the CPU's fast path is the other float32 run
            other = engine.load(weights_path, backend="numpy", fast=True)
        else:
            other = engine.load(weights_path, backend=options.backend, fast=numpy_backend and not fast,
                                **({} if numpy_backend else {"gpu_path": "fused" if options.readable else "plain"}))
    path = "fast" if fast else ("readable" if enc.fast_forward is None else "fused GPU")
    return enc, enc64, other, path


def run(options: VerifyOptions, say=lambda message: None) -> Verification:
    """Runs verify (see the module docstring); `say` gets the progress lines."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=IGNORED_WARNING)
        return _run(options, say)


def _run(options: VerifyOptions, say) -> Verification:
    from engine.tf import reference
    if options.pooled_rtol is not None and options.rtol is None:
        raise VerifyError("--pooled-rtol goes with --rtol (the fixed tolerance); the default verdict has no tolerance")
    savedmodel = options.savedmodel or reference.cached("tiny", seed=0, family=options.family)
    if not os.path.isdir(savedmodel):
        raise VerifyError(f"--savedmodel {savedmodel}: not a folder")
    if options.weights:
        weights_path = options.weights
    else:
        from engine.tf import extract
        weights_path = extract.cached_extraction(savedmodel)
    enc, enc64, other, path = _encoders(weights_path, options)
    if options.weights:
        check_weights_match(savedmodel, weights_path, enc.config, say)
    cfg = enc.config
    seq_length = min(options.seq_length, cfg.max_position_embeddings)
    report = {"savedmodel": os.path.abspath(savedmodel), "weights": os.path.abspath(weights_path),
              "backend": enc.backend, "dtype": enc.dtype, "path": path, "rule": rule_text(options),
              "tolerance": options.rtol, "pooled_tolerance": options.pooled_rtol,
              "config": {k: getattr(cfg, k) for k in CONFIG_FIELDS}, "cases": []}
    inputs = verify_inputs(enc, options.batch, seq_length, options.seed)
    if options.trace:
        return _run_trace(options, savedmodel, enc, enc64, inputs, seq_length, report, say)
    ok, sections = True, []
    call = (lambda e: e.mlm) if cfg.has_mlm else (lambda e: e)
    for name, case in inputs.items():
        if not cfg.has_mlm:
            case = {k: v for k, v in case.items() if k != "masked_lm_positions"}
        say(f"verify: {name} inputs [{options.batch}x{seq_length}]: TensorFlow ...")
        t0 = time.perf_counter()
        theirs = reference.run_savedmodel(savedmodel, case, mlm=cfg.has_mlm)
        t1 = time.perf_counter()
        ours = engine.to_numpy(call(enc)(case))
        t2 = time.perf_counter()
        if enc64 is None:
            results = parity.compare(ours, theirs, options.rtol, pooled_rtol=options.pooled_rtol)
            table = verdict.format_table(results)
        else:
            say(f"verify: {name} inputs: the engine in float64 (the truth) ...")
            exact = parity.flatten_outputs(engine.to_numpy(call(enc64)(case)))
            noise = parity.flatten_outputs(engine.to_numpy(call(other)(case)))
            results = verdict.judge_all(parity.flatten_outputs(ours), parity.flatten_outputs(theirs), exact,
                                        others=[noise])
            table = verdict.format_table(results)
        ok &= all(d.ok for d in results)
        report["cases"].append({"inputs": name, "batch": options.batch, "seq_length": seq_length,
                                "tensorflow_seconds": t1 - t0, "engine_seconds": t2 - t1,
                                "outputs": [d.as_dict() for d in results]})
        sections.append(f"\n{name} inputs, batch {options.batch} x seq_length {seq_length} "
                        f"(TensorFlow {t1 - t0:.2f}s, engine {t2 - t1:.2f}s, {path} path):\n{table}")
    report["ok"] = bool(ok)
    return Verification(bool(ok), report, sections, f"{report['rule']}; model {weights_path}")


def _run_trace(options, savedmodel, enc, enc64, inputs, seq_length, report, say) -> Verification:
    """verify --trace: every intermediate of the engine against TensorFlow's step-by-step trace."""
    from engine.tf import reference_trace
    noise = enc64 is not None
    ok, sections = True, []
    for name, case in inputs.items():
        say(f"verify --trace: {name} inputs [{options.batch}x{seq_length}]: TensorFlow step by step ...")
        t0 = time.perf_counter()
        result = reference_trace.verify_trace(savedmodel, enc, case, enc64=enc64, rtol=options.rtol,
                                              pooled_rtol=options.pooled_rtol)
        first = result.first
        ok &= result.ok
        report["cases"].append({
            "inputs": name, "batch": options.batch, "seq_length": seq_length, "seconds": time.perf_counter() - t0,
            "tensorflow_trace_vs_savedmodel": [d.as_dict() for d in result.faithfulness],
            "first_divergence": None if first is None else first.as_dict(),
            "intermediates": [d.as_dict() for d in result.diffs]})
        lines = [f"\n{name} inputs, batch {options.batch} x seq_length {seq_length}:",
                 "TensorFlow's step-by-step trace against the SavedModel's own outputs "
                 f"({'faithful' if result.faithful else 'NOT FAITHFUL'}):",
                 verdict.format_table(result.faithfulness)]
        rows = verdict.format_table(result.diffs).split("\n")
        head = 2 if noise else 1
        if first is not None:
            at = result.diffs.index(first) + head
            lines.append("\n".join(rows[:head] + rows[max(head, at - 5):at + 3]))
            lines.append(f"engine vs TensorFlow: first divergence at {first.name}: {first.status}"
                         f"{'; ' + first.detail if first.detail else ''}")
        else:
            lines.append(f"engine vs TensorFlow: all {len(result.diffs)} intermediates agree")
        sections.append("\n".join(lines))
    report["ok"] = bool(ok)
    return Verification(bool(ok), report, sections, f"intermediates of engine vs TensorFlow ({report['rule']})")
