"""What every command shares: exit codes, the user-error rule, loading a model, checking the files
named on the command line before any work starts.

The rules, the same for every command:
- an output that exists is refused without --force (named: `--output OUT: exists; pass --force to
  replace it`); a missing output folder is refused, never created: `--output OUT: the folder DIR
  does not exist`;
- an input file that is missing or a folder is refused naming its option;
- every user-facing problem is one line `error: <what>: <why>`, exit code 2; anything else is a bug
  and shows its traceback (exit code 3).
"""

from __future__ import annotations

import os
import sys

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# The exceptions that report a problem of the user's input, files or options (module, class). Looked
# up in sys.modules: a class whose module was never imported cannot have been raised.
USER_ERRORS = (
    ("engine.cli.common", "CliError"), ("engine.core.inputs", "InputError"), ("engine.core.backend", "BackendError"),
    ("engine.tools.workfile", "WorkfileError"), ("engine.tools.fill_mask", "FillMaskError"),
    ("engine.tools.explain", "ExplainError"),
    ("engine.train.data", "DataError"), ("engine.train.run", "RunError"), ("engine.train.run", "TrainingError"),
    ("weights.load", "WeightsFileError"), ("weights.write", "WeightsWriteError"),
    ("weights.export_onnx", "OnnxExportError"), ("engine.tf.verify", "VerifyError"),
    ("weights.tf_names", "ExtractionError"), ("weights.hf_names", "HfImportError"),
    ("weights.safetensors_file", "SafetensorsError"), ("weights.torch_checkpoint", "TorchCheckpointError"),
    ("engine.tf.export", "ExportError"),
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def is_user_error(error: BaseException) -> bool:
    """A problem of the user's input, files or options (OSError included: a disk full, a permission)."""
    if isinstance(error, OSError):
        return True
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False


def one_line(error: BaseException) -> str:
    """The message of a user error on one line, without the exception's class name."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = str(error)
    return message.replace(":\n  ", ": ").replace("\n  ", "; ").replace("\n", "; ")


def say(message: str) -> None:
    """A progress or summary line, on stderr (stdout holds the results)."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ files

def input_file(path: str, option: str) -> str:
    """An existing file named by `option`, else CliError naming both."""
    if not os.path.exists(path):
        raise CliError(f"{option} {path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{option} {path}: is a folder, not a file")
    return path


def output_path(path: str, option: str, force: bool, folder_output: bool = False) -> str:
    """Checks an output before any work: its folder exists (never created), it is not a folder (for a
    file output), and it does not exist unless --force."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CliError(f"{option} {path}: the folder {parent} does not exist")
    if not folder_output and os.path.isdir(path):
        raise CliError(f"{option} {path}: is a folder; give the path of the file to write")
    if os.path.lexists(path) and not force:
        raise CliError(f"{option} {path}: exists; pass --force to replace it")
    return path


# ------------------------------------------------------------------------------------------ models

def load_model(args, verify_checksums: bool = False):
    """The model of a command: the fast path by default (the fused GPU path on cupy), the readable
    one with --readable. Weight-file problems come as one line naming --weights."""
    import engine
    from engine.core.backend import resolve_name
    from weights import WeightsFileError
    readable = getattr(args, "readable", False)
    fast = not readable and resolve_name(args.backend) == "numpy"
    extra = {"gpu_path": "plain"} if readable and resolve_name(args.backend) == "cupy" else {}
    try:
        return engine.load(args.weights, backend=args.backend, fast=fast, verify_checksums=verify_checksums, **extra)
    except WeightsFileError as e:
        raise CliError(f"--weights {one_line(e)}") from None


def preprocessor(enc):
    """The preprocessor of the loaded model. max_seq_length stays unset: each command checks its
    --seq-length against the model's positions with its own message."""
    from engine.text.preprocess import Preprocessor
    if not enc.vocab:
        raise CliError("--weights: the weights file holds no vocab: text input needs one")
    return Preprocessor.from_weights(enc, max_seq_length=None)


def seq_length(args, enc, needed: int) -> int:
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


def read_texts(args) -> list[str]:
    """The TEXT arguments, or the lines of --input (UTF-8, one text per line)."""
    if args.input:
        input_file(args.input, "--input")
        try:
            with open(args.input, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f]
        except UnicodeDecodeError as e:
            raise CliError(f"--input {args.input}: not valid UTF-8 (byte offset {e.start})") from None
    else:
        texts = list(args.texts)
    if not texts:
        raise CliError("no text given: pass TEXT arguments or --input FILE")
    return texts
