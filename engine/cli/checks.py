"""The checking commands: verify (engine/tf/verify.py), trace and compare (engine/tools)."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from engine.cli.common import (EXIT_MISMATCH, EXIT_OK, CliError, input_file, output_path, preprocessor, read_texts,
                               say, seq_length)


def cmd_verify(args) -> int:
    """TensorFlow (float32) vs the engine (float32) and, as the truth, the engine in float64."""
    from engine.tf import verify
    verify.import_tensorflow_quietly()
    if args.weights:
        input_file(args.weights, "--weights")
    options = verify.VerifyOptions(savedmodel=args.savedmodel, family=args.family, weights=args.weights,
                                   backend=args.backend, readable=args.readable, batch=args.batch,
                                   seq_length=args.seq_length,
                                   rtol=args.rtol, pooled_rtol=args.pooled_rtol, seed=args.seed, trace=args.trace)
    result = verify.run(options, say=say)
    if args.json:
        print(json.dumps(result.report, indent=1, default=float))
    else:
        for section in result.sections:
            print(section)
        print(f"\n{'PASS' if result.ok else 'FAIL'}: {result.closing}")
    return EXIT_OK if result.ok else EXIT_MISMATCH


# ------------------------------------------------------------------------------------------ trace

def _ids_inputs(text: str) -> dict:
    """--ids: JSON, a list of id lists or an object with input_word_ids [, input_mask,
    input_type_ids, masked_lm_positions]; inline or a file."""
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"--ids: not JSON: {e}") from None
    if isinstance(value, list):
        value = {"input_word_ids": value}
    if not isinstance(value, dict) or "input_word_ids" not in value:
        raise CliError("--ids: expected a list of id lists or an object with input_word_ids")
    try:
        inputs = {k: np.asarray(v, dtype=np.int32) for k, v in value.items()}
    except (ValueError, TypeError) as e:
        raise CliError(f"--ids: {e} (rows must have equal lengths)") from None
    ids = inputs["input_word_ids"]
    if ids.ndim == 1:
        inputs = {k: v[None] for k, v in inputs.items()}
        ids = inputs["input_word_ids"]
    inputs.setdefault("input_mask", (ids != 0).astype(np.int32))
    inputs.setdefault("input_type_ids", np.zeros_like(ids))
    return inputs


def trace_bytes(config, batch: int, seq_length: int, positions: int | None, itemsize: int) -> int:
    """The bytes of every intermediate of a trace (engine.core.trace.steps), before HDF5's overhead."""
    from engine.core.trace import dims, expected_shape, steps
    sizes = dims(config, batch, seq_length, positions)
    return sum(math.prod(expected_shape(letters, sizes))
               for _, letters, _ in steps(config.num_layers, positions is not None, config)) * itemsize


class _Counted:
    """The encoder, each intermediate it records also counted on a progress bar (in bytes)."""

    def __init__(self, enc, bar):
        self._enc, self._bar = enc, bar

    def __getattr__(self, name):
        return getattr(self._enc, name)

    def _counting(self, record):
        def counted(name, value):
            record(name, value)
            self._bar.update(value.nbytes, name)
        return counted

    def mlm(self, inputs, *, record=None, **kwargs):
        return self._enc.mlm(inputs, record=self._counting(record), **kwargs)

    def encode(self, *args, record=None, **kwargs):
        return self._enc.encode(*args, record=self._counting(record), **kwargs)


def cmd_trace(args) -> int:
    import engine
    from engine.core.trace import complete_inputs
    from engine.tools import tracefile
    from engine.tools.progress import Progress
    if not args.output:
        raise CliError("--output: required (the trace file to write)")
    output_path(args.output, "--output", args.force)
    enc = engine.load(input_file(args.weights, "--weights"), backend=args.backend)
    if args.ids:
        inputs, texts = _ids_inputs(args.ids), None
    else:
        texts = read_texts(args)
        prep = preprocessor(enc)
        needed = max(len(t) for t in prep.tokenize_flat(texts)) + 2
        inputs = prep(texts, seq_length=seq_length(args, enc, needed))
    inputs = complete_inputs(enc, inputs)            # checked; with the MLM, all S positions unless given
    B, S = inputs["input_word_ids"].shape
    positions = inputs["masked_lm_positions"].shape[1] if "masked_lm_positions" in inputs else None
    estimate = trace_bytes(enc.config, B, S, positions, np.dtype(enc.dtype).itemsize)
    say(f"trace: {B}x{S} inputs through {enc.config.num_layers} blocks: about {estimate / 2**20:.1f} MiB to "
        f"{args.output} (every intermediate is kept: fewer or shorter texts make it smaller)")
    t0 = time.perf_counter()
    with Progress(estimate, "trace") as bar:
        names = tracefile.trace_to_file(_Counted(enc, bar), inputs, args.output, texts=texts)
    size = os.path.getsize(args.output)
    say(f"trace: wrote {len(names)} intermediates of {enc.config.num_layers} blocks for {B}x{S} inputs to "
        f"{args.output} ({size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f}s)")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ compare

def trace_file(path: str, which: str) -> str:
    """A file compare can read: HDF5 and not a weights file (a trace of another port need not carry
    our format attribute)."""
    import h5py

    from weights import format as fmt
    input_file(path, which)
    if not h5py.is_hdf5(path):
        raise CliError(f"{which} {path}: not an HDF5 file (a trace file is one: python -m engine trace writes it)")
    with h5py.File(path, "r") as f:
        kind = f.attrs.get("format")
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind == fmt.FORMAT_NAME:
        raise CliError(f"{which} {path}: a weights file, not a trace file (python -m engine trace --weights "
                       f"{os.path.basename(path)} ... writes one)")
    return path


def cmd_compare(args) -> int:
    from engine.tools import compare, tracefile, verdict
    ours = tracefile.read(trace_file(args.a, "A"))
    theirs = tracefile.read(trace_file(args.b, "B"))
    try:
        name_map = compare.load_map(args.map and input_file(args.map, "--map"))
    except (OSError, ValueError) as e:
        raise CliError(f"--map {args.map}: {e}") from None
    if theirs.inputs and ours.inputs:
        same = set(ours.inputs) == set(theirs.inputs) and all(
            np.array_equal(ours.inputs[k], theirs.inputs[k]) for k in ours.inputs)
        if not same:
            say(f"compare: warning: the two files were traced on different inputs ({args.b} /inputs)")
    diffs = compare.compare(ours, theirs.tensors, args.rtol, name_map, pooled_rtol=args.pooled_rtol)
    first = verdict.first_failure(diffs)
    if args.json:
        print(json.dumps({"reference": args.a, "candidate": args.b, "tolerance": args.rtol,
                          "first_divergence": None if first is None else first.as_dict(),
                          "intermediates": [d.as_dict() for d in diffs]}, indent=1, default=float))
    else:
        print(verdict.format_table(diffs))
        print(compare.summary(diffs))
    return EXIT_OK if compare.agree(diffs) else EXIT_MISMATCH
