"""Command line: `python -m engine` (also the console script `talkheads`).

    python -m engine                         # the main job: verify on the embedded default (tiny model)
    python -m engine verify --savedmodel DIR [--weights H5] [--backend numpy|cupy] [--batch B --seq-length S] [--json]
    python -m engine encode --weights H5 TEXT... | --input FILE  --output OUT.{npy,h5,jsonl} [--sequence]
                            [--pooling pooled|cls|mean] [--normalize] [--max-tokens 2048] [--resume | --force]
                            (streams; engine/tools/stream.py)
    python -m engine encode --weights H5 --input FILE... --output DIR --cluster local[:N] | tcp://HOST:PORT
                            [--partition-lines N] [--threads-per-worker T]   (Dask; engine/cluster)
    python -m engine fill-mask --weights H5 "the [MASK] sat on the mat" [--top-k K]
    python -m engine explain --weights H5 TEXT [--text-b TEXT] --output PAGE.html   (one HTML page: the heads)
    python -m engine finetune --weights H5 --train FILE [--eval FILE] --output OUT.h5 [--epochs E ...] [--resume]
    python -m engine predict --weights OUT.h5 --input FILE --output PRED.jsonl
    python -m engine pretrain --weights H5 --input TEXT --output OUT.h5 [--steps N ...] [--resume]
    python -m engine export-savedmodel --weights H5 --output DIR
    python -m engine export-onnx --weights H5 --output OUT.onnx [--mlm]      (no TensorFlow)
    python -m engine extract SAVEDMODEL --output OUT.h5 [--force]
    python -m engine import-hf HF_MODEL_DIR --output OUT.h5 [--force]        (no torch)
    python -m engine reference --output DIR --config tiny|small|base [--seed N]
    python -m engine trace --weights H5 TEXT... | --ids JSON  --output TRACE.h5   (every intermediate)
    python -m engine compare A.h5 B.h5 [--rtol R] [--map THEIRS.json]        (first divergence)
    python -m engine verify --trace ...      (engine vs TensorFlow, intermediate by intermediate)

Every command refuses an existing output without --force and a missing output folder (it never
creates one). Exit codes: 0 success; 1 verify (or compare) found a difference above tolerance; 2 bad
usage, bad input or a file problem (one line on stderr, `error: <what>: <why>`; --debug shows the
traceback); 3 a bug (the traceback is shown); 130 interrupted. `verify`, `extract`,
`export-savedmodel` and `reference` need TensorFlow (the `tf` extra); the others do not. This module
parses and dispatches; the commands are engine/cli/{checks,text,training,files,cluster}.py.
"""

from __future__ import annotations

import sys
import traceback

from engine.cli.common import (EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_MISMATCH, EXIT_OK, CliError,
                               is_user_error, one_line)
from engine.cli.parser import build_parser

__all__ = ["main", "build_parser", "CliError", "EXIT_OK", "EXIT_MISMATCH", "EXIT_ERROR", "EXIT_BUG",
           "EXIT_INTERRUPTED"]

# option -> the smallest value that makes sense; one wording for all: "--top-k must be at least 1, got 0"
MINIMUM = {"batch": 1, "seq_length": 2, "top_k": 1, "batch_size": 1, "max_tokens": 1, "epochs": 1, "steps": 1,
           "checkpoint_every": 1, "max_steps": 1}


def validate(args) -> None:
    for name, minimum in MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            why = " (room for [CLS] and [SEP])" if name == "seq_length" else ""
            raise CliError(f"--{name.replace('_', '-')} must be at least {minimum}{why}, got {value}")


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
        validate(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            raise
        if not is_user_error(e):   # a bug: the traceback, not a tidy line that would hide it
            traceback.print_exc()
            print(f"error: internal error ({type(e).__name__}): a bug; please report it with the traceback above",
                  file=sys.stderr)
            return EXIT_BUG
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
