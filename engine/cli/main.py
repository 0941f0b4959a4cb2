"""Command line: `python -m engine` (also the console script `talkheads`).

    python -m engine                         # the main job: verify on the embedded default (tiny model)
    python -m engine verify --savedmodel DIR [--weights H5] [--backend numpy|cupy] [--batch B --seq-length S] [--json]
    python -m engine encode --weights H5 TEXT... | --input FILE  --output OUT.{npy,h5,jsonl} [--sequence]
                            [--max-tokens 2048] [--resume | --force]   (streams; engine/tools/stream.py)
    python -m engine fill-mask --weights H5 "the [MASK] sat on the mat" [--top-k K]
    python -m engine finetune --weights H5 --train FILE [--eval FILE] --output OUT.h5 [--epochs E ...] [--resume]
    python -m engine predict --weights OUT.h5 --input FILE --output PRED.jsonl
    python -m engine pretrain --weights H5 --input TEXT --output OUT.h5 [--steps N ...] [--resume]
    python -m engine export-savedmodel --weights H5 OUT_DIR
    python -m engine export-onnx --weights H5 --output OUT.onnx [--mlm]      (no TensorFlow)
    python -m engine extract SAVEDMODEL OUT.h5 [--force]
    python -m engine reference OUT_DIR --config tiny|base [--seed N]
    python -m engine trace --weights H5 TEXT... | --ids JSON  --out TRACE.h5   (every intermediate)
    python -m engine compare A.h5 B.h5 [--rtol R] [--map THEIRS.json]        (first divergence)
    python -m engine verify --trace ...      (engine vs TensorFlow, intermediate by intermediate)

Exit codes: 0 success; 1 verify (or compare) found a difference above tolerance; 2 bad usage, bad input or a
file problem (one line on stderr; --debug shows the traceback); 130 interrupted.
`verify`, `extract`, `export-savedmodel` and `reference` need TensorFlow (the `tf` extra); the others do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from engine.text.preprocess import Preprocessor

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

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


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ helpers

def _preprocessor(enc):
    """The preprocessor of the loaded model. max_seq_length stays unset: each command checks its
    --seq-length against the model's positions with its own message."""
    if not enc.vocab:
        raise CliError("the weights file holds no vocab: text input needs one")
    return Preprocessor.from_weights(enc, max_seq_length=None)


def _load(args, verify_checksums: bool = False):
    """The model of a command: the fast path by default (the fused GPU path on cupy), the readable
    one with --readable. Weight-file problems come as one line."""
    import engine
    from engine.core.backend import resolve_name
    from weights import WeightsFileError
    fast = not getattr(args, "readable", False) and resolve_name(args.backend) == "numpy"
    try:
        return engine.load(args.weights, backend=args.backend, fast=fast, verify_checksums=verify_checksums,
                           **({"gpu_path": "plain"} if getattr(args, "readable", False) and not fast
                              and resolve_name(args.backend) == "cupy" else {}))
    except WeightsFileError as e:  # several problems come on several lines: one line here
        raise CliError(f"WeightsFileError: {str(e).replace(':' + chr(10) + '  ', ': ').replace(chr(10) + '  ', '; ')}") from None


def _seq_length(args, enc, needed: int) -> int:
    """--seq-length, or what the text needs (`needed` tokens with [CLS] and [SEP]) capped at the
    model's positions; refused beyond the positions."""
    positions = enc.config.max_position_embeddings
    if args.seq_length is None:
        return max(2, min(needed, positions))
    if args.seq_length < 2:
        raise CliError(f"--seq-length must be at least 2 (room for [CLS] and [SEP]), got {args.seq_length}")
    if args.seq_length > positions:
        raise CliError(f"--seq-length {args.seq_length} exceeds the model's {positions} positions")
    return args.seq_length


def _default_savedmodel() -> str:
    from engine.tf import reference
    return reference.cached("tiny", seed=0)


def _verify_inputs(enc, batch: int, seq_length: int, seed: int):
    """Two input sets: real text through the preprocessor, and random ids with padding structure.
    Each row carries min(S, 32) MLM positions, so that mlm_logits is judged on a sample of tokens
    large enough for its error statistics to be stable."""
    from engine.tools import parity
    prep = _preprocessor(enc)
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


def _rule(args) -> str:
    if args.rtol is None:
        from engine.tools import verdict
        return verdict.rule_text()
    pooled = args.rtol if args.pooled_rtol is None else args.pooled_rtol
    return f"fixed tolerance: max|engine - TF| <= {args.rtol:.1e} x max|TF| per output (pooled_output {pooled:.1e})"


# ------------------------------------------------------------------------------------------ commands

def cmd_verify(args) -> int:
    """TensorFlow (float32) vs the engine (float32) and, as the truth, the engine in float64: the
    verdict of engine.tools.verdict. With --rtol, a plain fixed tolerance instead (no float64 run)."""
    import engine
    from engine.core.backend import resolve_name
    from engine.tf import reference
    from engine.tools import parity, verdict

    if args.pooled_rtol is not None and args.rtol is None:
        raise CliError("--pooled-rtol goes with --rtol (the fixed tolerance); the default verdict has no tolerance")
    savedmodel = args.savedmodel or _default_savedmodel()
    if not os.path.isdir(savedmodel):
        raise CliError(f"--savedmodel {savedmodel}: not a directory")
    if args.weights:
        weights_path = args.weights
    else:
        from engine.tf import extract
        weights_path = extract.cached_extraction(savedmodel)
    numpy_backend = resolve_name(args.backend) == "numpy"
    fast = not args.readable and numpy_backend
    enc = engine.load(weights_path, backend=args.backend, fast=fast)
    enc64 = other = None
    if args.rtol is None:   # the noise verdict: the float64 truth, and the other float32 path for the noise level
        enc64 = engine.load(weights_path, backend=args.backend, dtype="float64")
        other = engine.load(weights_path, backend=args.backend, fast=numpy_backend and not fast,
                            **({} if numpy_backend else {"gpu_path": "fused" if args.readable else "plain"}))
    cfg = enc.config
    seq_length = min(args.seq_length, cfg.max_position_embeddings)
    path = "fast" if fast else ("readable" if enc.fast_forward is None else "fused GPU")
    report = {"savedmodel": os.path.abspath(savedmodel), "weights": os.path.abspath(weights_path),
              "backend": enc.backend, "dtype": enc.dtype, "path": path, "rule": _rule(args),
              "tolerance": args.rtol, "pooled_tolerance": args.pooled_rtol,
              "config": {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size",
                                                      "vocab_size", "max_position_embeddings")},
              "cases": []}
    if args.trace:
        return _verify_trace(args, savedmodel, enc, enc64, seq_length, report)
    ok = True
    for name, inputs in _verify_inputs(enc, args.batch, seq_length, args.seed).items():
        if not cfg.has_mlm:
            inputs = {k: v for k, v in inputs.items() if k != "masked_lm_positions"}
        _progress(f"verify: {name} inputs [{args.batch}x{seq_length}]: TensorFlow ...")
        t0 = time.perf_counter()
        theirs = reference.run_savedmodel(savedmodel, inputs, mlm=cfg.has_mlm)
        t1 = time.perf_counter()
        call = (lambda e: e.mlm) if cfg.has_mlm else (lambda e: e)
        ours = engine.to_numpy(call(enc)(inputs))
        t2 = time.perf_counter()
        if enc64 is None:
            results = parity.compare(ours, theirs, args.rtol, pooled_rtol=args.pooled_rtol)
            table = parity.format_table(results)
        else:
            _progress(f"verify: {name} inputs: the engine in float64 (the truth) ...")
            exact = parity.flatten_outputs(engine.to_numpy(call(enc64)(inputs)))
            noise = parity.flatten_outputs(engine.to_numpy(call(other)(inputs)))
            results = verdict.judge_all(parity.flatten_outputs(ours), parity.flatten_outputs(theirs), exact,
                                        others=[noise])
            table = verdict.format_table(results)
        ok &= all(d.ok for d in results)
        report["cases"].append({"inputs": name, "batch": args.batch, "seq_length": seq_length,
                                "tensorflow_seconds": t1 - t0, "engine_seconds": t2 - t1,
                                "outputs": [d.as_dict() for d in results]})
        if not args.json:
            print(f"\n{name} inputs, batch {args.batch} x seq_length {seq_length} "
                  f"(TensorFlow {t1 - t0:.2f}s, engine {t2 - t1:.2f}s, {path} path):")
            print(table)
    return _finish_report(args, report, ok, f"{report['rule']}; model {weights_path}")


def _finish_report(args, report: dict, ok: bool, what: str) -> int:
    """Prints the JSON report (--json) or the closing PASS/FAIL line; the exit code of the verdict."""
    report["ok"] = bool(ok)
    if args.json:
        print(json.dumps(report, indent=1, default=float))
    else:
        print(f"\n{'PASS' if ok else 'FAIL'}: {what}")
    return EXIT_OK if ok else EXIT_MISMATCH


def _verify_trace(args, savedmodel, enc, enc64, seq_length, report) -> int:
    """verify --trace: every intermediate of the engine against TensorFlow's step-by-step trace."""
    from engine.tf import reference_trace
    from engine.tools import compare, parity, verdict
    table_of = verdict.format_table if enc64 is not None else compare.format_table
    ok = True
    for name, inputs in _verify_inputs(enc, args.batch, seq_length, args.seed).items():
        _progress(f"verify --trace: {name} inputs [{args.batch}x{seq_length}]: TensorFlow step by step ...")
        t0 = time.perf_counter()
        result = reference_trace.verify_trace(savedmodel, enc, inputs, enc64=enc64, rtol=args.rtol,
                                              pooled_rtol=args.pooled_rtol)
        first = result.first
        ok &= result.ok
        report["cases"].append({
            "inputs": name, "batch": args.batch, "seq_length": seq_length, "seconds": time.perf_counter() - t0,
            "tensorflow_trace_vs_savedmodel": [d.as_dict() for d in result.faithfulness],
            "first_divergence": None if first is None else first.as_dict(),
            "intermediates": [d.as_dict() for d in result.diffs]})
        if not args.json:
            print(f"\n{name} inputs, batch {args.batch} x seq_length {seq_length}:")
            print("TensorFlow's step-by-step trace against the SavedModel's own outputs "
                  f"({'faithful' if result.faithful else 'NOT FAITHFUL'}):")
            print((verdict.format_table if enc64 is not None else parity.format_table)(result.faithfulness))
            rows = table_of(result.diffs).split("\n")
            head = 2 if enc64 is not None else 1
            if first is not None:
                at = result.diffs.index(first) + head
                print("\n".join(rows[:head] + rows[max(head, at - 5):at + 3]))
                print(f"engine vs TensorFlow: first divergence at {first.name}: {first.status}"
                      f"{'; ' + first.detail if first.detail else ''}")
            else:
                print(f"engine vs TensorFlow: all {len(result.diffs)} intermediates agree")
    return _finish_report(args, report, ok, f"intermediates of engine vs TensorFlow ({report['rule']})")


def _trace_inputs(args, enc):
    """The inputs of `trace`: text through the preprocessor, or --ids (JSON: a list of id lists, or an
    object with input_word_ids [, input_mask, input_type_ids, masked_lm_positions]; inline or a file)."""
    if args.ids:
        source = args.ids
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as f:
                source = f.read()
        try:
            value = json.loads(source)
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
        return inputs, None
    texts = _read_texts(args)
    prep = _preprocessor(enc)
    needed = max(len(t) for t in prep.tokenize_flat(texts)) + 2
    return prep(texts, seq_length=_seq_length(args, enc, needed)), texts


def cmd_trace(args) -> int:
    import engine
    from engine.tools import tracefile
    enc = engine.load(args.weights, backend=args.backend)
    inputs, texts = _trace_inputs(args, enc)
    t0 = time.perf_counter()
    names = tracefile.trace_to_file(enc, inputs, args.out, texts=texts)
    size = os.path.getsize(args.out)
    _progress(f"trace: wrote {len(names)} intermediates of {enc.config.num_layers} blocks for "
              f"{inputs['input_word_ids'].shape[0]}x{inputs['input_word_ids'].shape[1]} inputs to {args.out} "
              f"({size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f}s)")
    return EXIT_OK


def cmd_compare(args) -> int:
    from engine.tools import compare, tracefile
    for path in (args.a, args.b):
        if not os.path.isfile(path):
            raise CliError(f"{path}: no such file")
    ours, theirs = tracefile.read(args.a), tracefile.read(args.b)
    try:
        name_map = compare.load_map(args.map)
    except (OSError, ValueError) as e:
        raise CliError(f"--map: {e}") from None
    if theirs.inputs and ours.inputs:
        same = set(ours.inputs) == set(theirs.inputs) and all(
            np.array_equal(ours.inputs[k], theirs.inputs[k]) for k in ours.inputs)
        if not same:
            _progress(f"compare: warning: the two files were traced on different inputs ({args.b} /inputs)")
    diffs = compare.compare(ours, theirs.tensors, args.rtol, name_map, pooled_rtol=args.pooled_rtol)
    first = compare.first_divergence(diffs)
    if args.json:
        print(json.dumps({"reference": args.a, "candidate": args.b, "tolerance": args.rtol,
                          "first_divergence": None if first is None else first.as_dict(),
                          "intermediates": [d.as_dict() for d in diffs]}, indent=1, default=float))
    else:
        print(compare.format_table(diffs))
        print(compare.summary(diffs))
    return EXIT_OK if compare.agree(diffs) else EXIT_MISMATCH


def _read_texts(args) -> list[str]:
    if args.input:
        try:
            with open(args.input, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--input {args.input}: {e}") from None
    else:
        texts = list(args.texts)
    if not texts:
        raise CliError("no text given: pass TEXT arguments or --input FILE")
    return texts


def cmd_encode(args) -> int:
    """Streams the texts (or --input, read lazily) through the encoder in token-budget batches;
    resumable. The design (lengths, batches, commits, --resume, --force) is in engine/tools/stream.py."""
    from engine.tools import stream
    from engine.tools.progress import Progress
    if not args.input and not args.texts:
        raise CliError("no text given: pass TEXT arguments or --input FILE")
    if args.resume and args.force:
        raise CliError("--resume and --force exclude each other")
    t0 = time.perf_counter()
    # checksums too: a corpus-sized run should not start on silently corrupted weights (flipped bits)
    enc = _load(args, verify_checksums=True)
    prep = _preprocessor(enc)
    key = "sequence_output" if args.sequence else "pooled_output"
    source = args.input if args.input else list(args.texts)
    total = os.path.getsize(args.input) if args.input and os.path.isfile(args.input) else len(args.texts)
    with Progress(total, "encode", bytes_unit=bool(args.input)) as bar:
        def advance(fraction, rows, tokens):
            if fraction is not None:
                bar.update(fraction * bar.total - bar.done, f"{rows} texts, {tokens} tokens")
        try:
            summary = stream.encode(enc, prep, source, args.output, key=key, seq_length=args.seq_length,
                                    max_tokens=args.max_tokens, max_rows=args.batch_size, resume=args.resume,
                                    force=args.force, progress=_progress, bar=advance)
        except stream.StreamError as e:
            raise CliError(str(e)) from None
    seconds = time.perf_counter() - t0
    rows = summary["rows"] - summary["resumed_from"]
    _progress(f"encode: wrote {tuple(summary['shape'])} {key} to {args.output}: {rows} texts, "
              f"{summary.get('tokens', 0)} tokens, {summary['batches']} batches in {seconds:.1f}s ({rows / max(seconds, 1e-9):.1f} texts/s, "
              f"model loading included; {enc.fast_forward is not None and 'fast' or 'readable'} path)")
    return EXIT_OK


def fill_mask(enc, prep, text: str, top_k: int = 5, seq_length: int | None = None):
    """Top-k (token, probability) for each [MASK] in `text`, in order. seq_length: default what the
    text needs, capped at the model's positions.

    The Hub preprocessor would split the literal "[MASK]" into "[", "mask", "]", so the text is cut
    at each [MASK] and the mask id is put between the tokenized pieces.
    """
    import engine
    from engine.core import kernels
    pieces = text.split("[MASK]")
    if len(pieces) < 2:
        raise CliError(f"no [MASK] in {text!r}")
    ids = []
    for i, piece in enumerate(pieces):
        ids += [t for word in prep.tokenize([piece])[0] for t in word]
        if i < len(pieces) - 1:
            ids.append(prep.mask_id)
    if seq_length is None:
        seq_length = min(len(ids) + 2, enc.config.max_position_embeddings)
    packed = prep.bert_pack_inputs([[ids]], seq_length=seq_length)
    positions = np.flatnonzero(packed["input_word_ids"][0] == prep.mask_id)
    if len(positions) < len(pieces) - 1:
        raise CliError(f"the text is longer than seq_length {seq_length}: a [MASK] was trimmed away")
    inputs = dict(packed, masked_lm_positions=positions[None].astype(np.int32))
    skip = bool(getattr(enc.fast_forward, "skips_padding", False))
    logits = engine.to_numpy(enc.mlm(inputs, skip_padding=skip)["mlm_logits"])[0].astype(np.float64)   # [P,V]
    probs = kernels.softmax(logits)
    result = []
    for p in probs:
        top = np.argsort(-p)[:top_k]
        result.append([(enc.vocab[i], float(p[i])) for i in top])
    return result


def cmd_fill_mask(args) -> int:
    enc = _load(args)
    prep = _preprocessor(enc)
    seq_length = None if args.seq_length is None else _seq_length(args, enc, 0)
    for n, candidates in enumerate(fill_mask(enc, prep, args.text, args.top_k, seq_length)):
        print(f"[MASK] #{n + 1}:")
        for token, prob in candidates:
            print(f"  {token:<20} {prob:.4f}")
    return EXIT_OK


def _stopped(result: dict) -> bool:
    """A training run stopped by --max-steps: says how to go on."""
    if "stopped_at_step" not in result:
        return False
    print(f"stopped at step {result['stopped_at_step']} (--max-steps); continue with --resume "
          f"({result['checkpoint']})", file=sys.stderr)
    return True


def _training_arguments(args) -> dict:
    """The values of the options _training_options adds, as keyword arguments of finetune/pretrain."""
    return {name: getattr(args, name) for name in TRAINING_OPTIONS}


def cmd_finetune(args) -> int:
    from engine.train import finetune
    result = finetune.finetune(args.weights, args.train, args.output, eval_path=args.eval, epochs=args.epochs,
                               **_training_arguments(args))
    if _stopped(result):
        return EXIT_OK
    print(f"finetune: {result['examples']} examples, {result['steps']} steps, seq_length {result['seq_length']}, "
          f"{result['seconds']:.1f} s, {result['samples_per_s']:.1f} samples/s; wrote {result['output']} "
          f"(labels {result['labels']})", file=sys.stderr)
    return EXIT_OK


def cmd_predict(args) -> int:
    import json
    from engine.train import finetune
    from weights.write import atomic_output
    rows = finetune.predict(args.weights, args.input, batch_size=args.batch_size, seq_length=args.seq_length)
    out = args.output
    with atomic_output(out, force=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"predict: {len(rows)} rows to {out}", file=sys.stderr)
    return EXIT_OK


def cmd_pretrain(args) -> int:
    from engine.train import pretrain
    result = pretrain.pretrain(args.weights, args.input, args.output, steps=args.steps, eval_path=args.eval,
                               **_training_arguments(args))
    if _stopped(result):
        return EXIT_OK
    held = (f"; held-out MLM loss {result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}"
            if result["eval_loss_before"] is not None else "")
    print(f"pretrain: {result['lines']} lines, {result['steps']} steps, seq_length {result['seq_length']}, "
          f"{result['seconds']:.1f} s, {result['samples_per_s']:.1f} samples/s{held}; wrote {result['output']}",
          file=sys.stderr)
    return EXIT_OK


def cmd_export_savedmodel(args) -> int:
    from engine.tf import export
    out = export.export_savedmodel(args.weights, args.output_dir, force=args.force)
    print(f"export-savedmodel: wrote {out}", file=sys.stderr)
    return EXIT_OK


def cmd_export_onnx(args) -> int:
    from weights.export_onnx import export_onnx
    out = export_onnx(args.weights, args.output, mlm=args.mlm, force=args.force)
    size = os.path.getsize(out) / 2**20
    print(f"export-onnx: wrote {out} ({size:.0f} MiB, opset 17, {'encoder + MLM head' if args.mlm else 'encoder'}; "
          "onnx checker passed)", file=sys.stderr)
    return EXIT_OK


def cmd_extract(args) -> int:
    from engine.tf import extract
    return extract.main([args.savedmodel, args.output] + (["--force"] if args.force else []))


def cmd_reference(args) -> int:
    from engine.tf import reference
    return reference.main(args.builder_args, prog="python -m engine reference")


# ------------------------------------------------------------------------------------------ parser

EXAMPLES = {
    "verify": "example:\n  python -m engine verify --savedmodel talkheads --weights talkheads.h5 --batch 8 --seq-length 128",
    "trace": "example:\n  python -m engine trace --weights talkheads.h5 \"The quick brown fox.\" --out trace.h5",
    "compare": "example:\n  python -m engine compare ours.h5 theirs.h5 --map theirs_to_ours.json --rtol 1e-5",
    "encode": "examples:\n  python -m engine encode --weights talkheads.h5 --input corpus.txt --output embeddings.npy\n"
              "  python -m engine encode --weights talkheads.h5 \"hello world\" --output one.jsonl --sequence",
    "fill-mask": "example:\n  python -m engine fill-mask --weights talkheads.h5 \"the [MASK] sat on the mat\" --top-k 5",
    "extract": "example:\n  python -m engine extract talkheads/ talkheads.h5",
    "finetune": "example:\n  python -m engine finetune --weights talkheads.h5 --train train.csv --eval dev.csv "
                "--output tuned.h5 --epochs 3",
    "pretrain": "example:\n  python -m engine pretrain --weights talkheads.h5 --input corpus.txt --output continued.h5 "
                "--steps 1000",
    "export-savedmodel": "example:\n  python -m engine export-savedmodel --weights tuned.h5 exported/",
    "export-onnx": "example:\n  python -m engine export-onnx --weights model.h5 --output model.onnx\n"
                   "  python -m engine export-onnx --weights model.h5 --mlm --output model_mlm.onnx",
    "predict": "example:\n  python -m engine predict --weights tuned.h5 --input test.csv --output predictions.jsonl",
}


def _command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def _model_arguments(p, weights_help: str = "the extracted HDF5 weights file (python -m engine extract)",
                     readable: bool = True) -> None:
    p.add_argument("--weights", required=True, help=weights_help)
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="the array backend (default: $TALKHEADS_BACKEND, else numpy)")
    if readable:
        p.add_argument("--readable", action="store_true",
                       help="run the readable path (engine/core) instead of the fast one: the same numbers "
                            "within float32 noise, slower")


TRAINING_OPTIONS = ("learning_rate", "batch_size", "seq_length", "warmup_fraction", "dropout", "seed", "resume",
                    "force", "checkpoint_every", "max_steps", "readable")


def _training_options(p, learning_rate: float, unit: str, dropout_in: str, seeded: str, checkpoints_also: str) -> None:
    """The options finetune and pretrain share (engine/train), with each command's defaults and words."""
    p.add_argument("--learning-rate", type=float, default=learning_rate, help=f"peak learning rate (default {learning_rate:g})")
    p.add_argument("--batch-size", type=int, default=32, help=f"{unit}s per step (default 32)")
    p.add_argument("--seq-length", type=int, default=None,
                   help=f"tokens per {unit} (default: what the longest needs, capped at the model's positions; "
                        "longer texts are truncated with a warning)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the steps spent warming up (default 0.1)")
    p.add_argument("--dropout", type=float, default=0.1, help=f"dropout rate {dropout_in} (default 0.1; 0: off)")
    p.add_argument("--seed", type=int, default=0, help=f"seed of {seeded} (default 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.ckpt.h5")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help=f"steps between checkpoints (default 100{checkpoints_also})")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this run, checkpointed (continue with --resume)")
    p.add_argument("--readable", action="store_true",
                   help="run the readable kernels (engine/core) instead of the fused element-wise and threaded "
                        "attention ones (engine/fast/tape_kernels.py): the same results within float32 noise, slower")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 ok, 1 verify or compare found a difference, 2 error, "
                                            "130 interrupted.\nexample:\n  python -m engine verify")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command")

    p = _command(sub, "verify", "the engine vs TensorFlow on the same SavedModel, with the engine's float64 run "
                                "as the truth: the noise verdict per output")
    p.add_argument("--savedmodel", help="SavedModel directory (default: the tiny reference model, built once)")
    p.add_argument("--weights", help="extracted HDF5 (default: extract the SavedModel once, cached)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="the engine's array backend (default: $TALKHEADS_BACKEND, else numpy)")
    p.add_argument("--readable", action="store_true",
                   help="judge the readable path (engine/core) instead of the fast one")
    p.add_argument("--batch", type=int, default=8,
                   help="rows per input set (default 8: pooled_output has one token per row)")
    p.add_argument("--seq-length", type=int, default=128,
                   help="sequence length, capped at the model's positions (default 128)")
    p.add_argument("--rtol", type=float, default=None,
                   help="a plain fixed tolerance instead of the noise verdict: max|engine - TF| <= RTOL x max|TF| "
                        "per output (no float64 run)")
    p.add_argument("--pooled-rtol", type=float, default=None,
                   help="with --rtol: the tolerance of pooled_output (default: RTOL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and MLM positions (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--trace", action="store_true",
                   help="compare every intermediate with TensorFlow's step by step; print the first divergence")
    p.set_defaults(func=cmd_verify)

    p = _command(sub, "trace", "every intermediate tensor, in order, to an HDF5 file (engine/core/trace.py)")
    p.add_argument("texts", nargs="*", help="texts to trace (or --input, or --ids)")
    _model_arguments(p, readable=False)
    p.add_argument("--ids", help="JSON ids instead of text: [[101, ...], ...] or {\"input_word_ids\": ...}, "
                                 "inline or a file")
    p.add_argument("--input", help="a UTF-8 text file, one text per line")
    p.add_argument("--out", required=True, help="the trace file to write (.h5)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="pack the texts to this length (default: what the longest needs, capped at the "
                        "model's positions)")
    p.set_defaults(func=cmd_trace)

    p = _command(sub, "compare", "two trace files: the first divergence in A's order, and a table (a fixed "
                                 "tolerance: trace files carry no float64 truth)")
    p.add_argument("a", help="the reference trace (ours)")
    p.add_argument("b", help="the trace to check (e.g. written by another port)")
    p.add_argument("--rtol", type=float, default=1e-5, help="max|A-B| <= RTOL x max|A| per intermediate (default 1e-5)")
    p.add_argument("--pooled-rtol", type=float, default=None, help="the tolerance of pooled_output (default: --rtol)")
    p.add_argument("--map", help="JSON {their_name: our_name | {name, transpose}} for B's dataset names")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_compare)

    p = _command(sub, "encode", "text to pooled (or sequence) embeddings, streamed, resumable (engine/tools/stream.py)")
    p.add_argument("texts", nargs="*", help="texts to encode (or --input)")
    _model_arguments(p)
    p.add_argument("--input", help="a UTF-8 text file, one text per line (read lazily: any size)")
    p.add_argument("--output", required=True, help="the file to write: .npy, .h5 or .jsonl (rows in input order)")
    p.add_argument("--sequence", action="store_true",
                   help="write sequence_output [rows, S, H] instead of pooled_output [rows, H]; padded positions "
                        "hold zeros")
    p.add_argument("--seq-length", type=int, default=None,
                   help="truncate texts to this many tokens with [CLS] and [SEP] (default: the model's positions; "
                        "truncated texts are counted in a warning); with --sequence also the row width (default: "
                        "what the longest text needs)")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="token budget per batch: real tokens on the fast path, rows x padded length on the "
                        "readable one (default 2048: as fast as larger batches on the base model, and "
                        "half the memory of 8192; a longer single text runs alone)")
    p.add_argument("--batch-size", type=int, default=None, help="at most this many rows per batch (default: no cap)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last committed batch")
    p.add_argument("--force", action="store_true", help="replace an existing output (or partial run)")
    p.set_defaults(func=cmd_encode)

    p = _command(sub, "fill-mask", "the top-k tokens and their probabilities for each [MASK] of a text")
    p.add_argument("text", help="a text with one or more [MASK]")
    _model_arguments(p, "an extracted HDF5 weights file with the MLM head")
    p.add_argument("--top-k", type=int, default=5, help="candidates per [MASK] (default 5)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="pack the text to this length (default: what it needs, capped at the model's positions)")
    p.set_defaults(func=cmd_fill_mask)

    p = _command(sub, "finetune", "fine-tune every weight and a classifier on pooled_output (Model Garden's "
                                  "AdamW, the bert_glue recipe); no TensorFlow needed")
    p.add_argument("--weights", required=True, help="the HDF5 weights file to start from")
    p.add_argument("--train", required=True, help="CSV, TSV or JSONL with columns text, optional text_b, label")
    p.add_argument("--eval", default=None, help="the same format: accuracy, macro-F1 and MCC after each epoch")
    p.add_argument("--output", required=True, help="the .h5 to write: the encoder, the head and the label names "
                                                   "(checkpoint OUT.ckpt.h5, log OUT.log.jsonl and OUT.loss.png beside it)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data (default 3)")
    _training_options(p, learning_rate=2e-5, unit="example",
                      dropout_in="in the encoder and the head", seeded="the head's initialization, the shuffles and dropout",
                      checkpoints_also="; also at every epoch's end")
    p.set_defaults(func=cmd_finetune)

    p = _command(sub, "predict", "class probabilities for each row, with a file written by finetune")
    p.add_argument("--weights", required=True, help="an .h5 written by finetune (with its head)")
    p.add_argument("--input", required=True, help="CSV, TSV or JSONL with a text column (and text_b for pairs)")
    p.add_argument("--output", required=True, help="JSONL to write: one {label, probabilities} object per row")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per row (default: what the longest needs, capped at the model's positions)")
    p.set_defaults(func=cmd_predict)

    p = _command(sub, "pretrain", "continued MLM training on plain text with BERT's masking; no TensorFlow needed")
    p.add_argument("--weights", required=True, help="the HDF5 weights file to start from (with the MLM head)")
    p.add_argument("--input", required=True, help="UTF-8 text, one example per non-empty line")
    p.add_argument("--eval", default=None, help="held-out text (one example per line): its MLM loss before and after")
    p.add_argument("--output", required=True, help="the .h5 to write (checkpoint, log and plot beside it)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    _training_options(p, learning_rate=1e-4, unit="line", dropout_in="in the encoder",
                      seeded="the shuffles, the masks and dropout", checkpoints_also="")
    p.set_defaults(func=cmd_pretrain)

    p = _command(sub, "export-savedmodel", "a weights file back to a TF Hub SavedModel, with Model Garden's "
                                           "classes (needs TensorFlow)")
    p.add_argument("--weights", required=True, help="the HDF5 weights file (extracted or trained)")
    p.add_argument("output_dir", help="the SavedModel folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_export_savedmodel)

    p = _command(sub, "export-onnx", "a weights file to an ONNX graph (opset 17, dynamic batch and sequence axes; "
                                      "no TensorFlow needed), for ONNX Runtime and other ONNX runtimes")
    p.add_argument("--weights", required=True, help="the HDF5 weights file (extracted or trained)")
    p.add_argument("--output", required=True, help="the .onnx file to write (written atomically)")
    p.add_argument("--mlm", action="store_true",
                   help="also take masked_lm_positions and return mlm_logits (needs a file with the MLM head)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export_onnx)

    p = _command(sub, "extract", "a SavedModel to one HDF5 weights file (needs TensorFlow)")
    p.add_argument("savedmodel", help="the SavedModel folder (with saved_model.pb)")
    p.add_argument("output", help="the .h5 file to write (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_extract)

    # Every argument, --help included, goes to the builder's own parser (engine.tf.reference.main).
    p = sub.add_parser("reference", help="build a randomized reference SavedModel (needs TensorFlow); "
                                         "`reference --help` lists its options", add_help=False)
    p.set_defaults(func=cmd_reference)
    return parser


def _validate(args) -> None:
    for name in ("batch", "seq_length", "top_k", "batch_size", "max_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "reference":
        args.builder_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:  # the embedded default: verify on the tiny reference model
        args = parser.parse_args(["--debug", "verify"] if args.debug else ["verify"])
    try:
        _validate(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        message = str(e) if isinstance(e, CliError) else f"{type(e).__name__}: {e}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
