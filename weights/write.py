"""Writing a weights file: atomic (a temp file beside the output, fsync, rename), checked against
the format before anything is written. h5py and NumPy only: the extractor (engine/tf/extract.py)
and the training commands (engine/train) both write through it.

    write_weights("model.h5", config, tensors, sources={path: "tf/variable:0"}, vocab=tokens)
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile

import h5py
import numpy as np

from weights import format as fmt


class WeightsWriteError(ValueError):
    """The tensors do not match the config; the message lists every problem."""


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


_TEMP_RE = r"\.{name}\.extract-(\d+)-[A-Za-z0-9_]+\.tmp"


def _temp_prefix(out_path: str) -> str:
    return f".{os.path.basename(out_path)}.extract-{os.getpid()}-"


def remove_stale_temps(out_path: str) -> list[str]:
    """Removes temp files of earlier writes to `out_path` whose process is gone (e.g. SIGKILLed)."""
    folder = os.path.dirname(os.path.abspath(out_path))
    pattern = re.compile(_TEMP_RE.format(name=re.escape(os.path.basename(out_path))))
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running: maybe another write in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(folder, entry))
            removed.append(entry)
        except OSError:
            pass
    return removed


def write_dataset(f: h5py.File, path: str, array: np.ndarray, source: str) -> None:
    """One float32 dataset with its `sha256` and `source` attributes (the one place datasets are written)."""
    ds = f.create_dataset(path, data=array, dtype="<f4")
    ds.attrs["sha256"] = fmt.tensor_checksum(array)
    ds.attrs["source"] = source


def fsync_folder(folder: str) -> None:
    """Makes a rename in `folder` durable (best effort: some file systems cannot fsync a folder)."""
    _fsync_path(folder, directory=True)


def _fsync_path(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # some platforms cannot open folders: best effort
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _publish(tmp: str, out: str, force: bool) -> None:
    """Moves the finished temp file to `out`: os.replace with force, else a no-clobber link."""
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if `out` appeared meanwhile: never replaces without --force
    except FileExistsError:
        raise FileExistsError(f"{out} exists (it appeared during the write); "
                              "pass --force to replace it") from None
    except OSError:  # a file system without hard links
        if os.path.lexists(out):
            raise FileExistsError(f"{out} exists; pass --force to replace it") from None
        os.replace(tmp, out)
        return
    os.unlink(tmp)


def check_output_path(out_path: str, force: bool) -> str:
    """Refuses an output that is a folder, or that exists without force; returns its absolute path."""
    out = os.path.abspath(out_path)
    if os.path.isdir(out):
        raise WeightsWriteError(f"{out}: is a folder; give the path of the file to write")
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    return out


@contextlib.contextmanager
def atomic_output(out_path: str, force: bool):
    """Yields a temp path beside `out_path` to write into; when the block ends without an exception
    the temp file is fsynced and moved to `out_path` (replacing it only with force), else removed.
    Temp files of earlier writers that were killed are removed first. Every file this project
    writes (weights, checkpoints, ONNX graphs) goes through here, so a killed run never leaves a
    half-written output under the real name."""
    out = check_output_path(out_path, force)
    folder = os.path.dirname(out)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(out)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        yield tmp
        _fsync_path(tmp)
        _publish(tmp, out, force)
        _fsync_path(folder, directory=True)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_weights(out_path: str, config: fmt.ModelConfig, tensors: dict[str, np.ndarray], *,
                  sources: dict[str, str] | None = None, vocab: list[str] | None = None,
                  vocab_source: str = "", provenance: dict | None = None, force: bool = False,
                  on_progress=None, head: dict | None = None) -> str:
    """Writes an HDF5 weight file atomically (temp file, fsync, rename); returns its absolute path.

    `tensors` must hold exactly the datasets of `format.expected_shapes(config)`, float32, with those
    shapes. An existing `out_path` is replaced only with force=True. On any exception (including
    KeyboardInterrupt) the temp file is removed and `out_path` is untouched. on_progress(nbytes,
    path), when given, is called after each dataset. head: {"kernel" [H,C], "bias" [C], "labels"
    [C] strings}, a classifier written under /head. Raises WeightsWriteError (one message listing
    every problem) or FileExistsError.
    """
    expected = fmt.expected_shapes(config)
    problems = []
    for path, shape in expected.items():
        if path not in tensors:
            problems.append("missing: " + path)
        elif tuple(np.shape(tensors[path])) != shape:
            problems.append(f"mis-shaped: {path} has shape {_shape_str(np.shape(tensors[path]))}, "
                            f"expected {_shape_str(shape)}")
        elif np.asarray(tensors[path]).dtype != np.float32:
            problems.append("wrong dtype: " + f"{path} is {np.asarray(tensors[path]).dtype}, expected float32")
    for path in tensors:
        if path not in expected:
            problems.append("unexpected: " + path)
    if vocab is not None and len(vocab) != config.vocab_size:
        problems.append(f"mis-shaped: vocab has {len(vocab)} tokens, expected {config.vocab_size}")
    if head is not None:
        k, b, names = np.asarray(head["kernel"]), np.asarray(head["bias"]), list(head["labels"])
        if k.ndim != 2 or k.shape[0] != config.hidden_size or b.shape != (k.shape[1],) or len(names) != k.shape[1]:
            problems.append(f"mis-shaped: head kernel {k.shape}, bias {b.shape}, {len(names)} labels; expected "
                            f"({config.hidden_size}, C), (C,), C")
    if problems:
        listed = "\n".join(f"  {p}" for p in problems)
        raise WeightsWriteError(f"{out_path}: the tensors do not match the config ({len(problems)} problem"
                                f"{'s' if len(problems) != 1 else ''}):\n{listed}")

    with atomic_output(out_path, force) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = fmt.FORMAT_NAME
            f.attrs["format_version"] = fmt.FORMAT_VERSION
            for key, value in config.to_attrs().items():
                f.attrs[key] = value
            for key, value in (provenance or {}).items():
                if key in fmt.FORMAT_ATTRS or key in fmt.config_attr_names():
                    raise ValueError(f"provenance attribute {key!r} would overwrite a format/config attribute")
                f.attrs[key] = value
            for path in expected:
                array = np.ascontiguousarray(tensors[path], dtype=np.float32)
                write_dataset(f, path, array, (sources or {}).get(path, ""))
                if on_progress is not None:
                    on_progress(array.nbytes, path)
            if head is not None:
                for name in ("kernel", "bias"):
                    write_dataset(f, f"head/{name}", np.ascontiguousarray(head[name], dtype=np.float32),
                                   head.get("sources", {}).get(name, ""))
                f.create_dataset("head/labels", data=np.array(list(head["labels"]), dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))
            if vocab is not None:
                ds = f.create_dataset(fmt.VOCAB_DATASET, data=np.array(vocab, dtype=object),
                                      dtype=h5py.string_dtype("utf-8"))
                ds.attrs["sha256"] = fmt.vocab_checksum(vocab)
                ds.attrs["source"] = vocab_source or ""
    return os.path.abspath(out_path)
