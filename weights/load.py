"""Loads and validates an HDF5 weight file (layout: `weights.format`). h5py and NumPy only.

    from weights import load
    w = load("model.h5")                       # WeightsFileError on anything wrong
    w.config.hidden_size, w.tensors["layers/0/attention/query/kernel"], w.vocab

Everything is checked before use: an HDF5 file, the `format`/`format_version` attributes, the config
attributes (present, of the right kind, consistent), every expected dataset present with the
expected shape and dtype float32, nothing unexpected, every value finite, and, with
verify_checksums=True, each dataset's sha256 attribute. Every failure is a `WeightsFileError` whose
message names the file and, where there is one, the dataset.

Note: `weights.load` is this function once `weights` is imported (the package re-exports it); the
module itself is `sys.modules["weights.load"]`.
"""

from __future__ import annotations

import dataclasses
import os

import h5py
import numpy as np

from weights import format as fmt

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_INT_FIELDS = ("num_layers", "hidden_size", "num_heads", "head_size", "intermediate_size",
               "vocab_size", "max_position_embeddings", "type_vocab_size", "max_seq_length")
_FLOAT_FIELDS = ("layer_norm_epsilon", "attention_mask_constant")
_BOOL_FIELDS = ("do_lower_case", "has_mlm", "normalize")
_STR_FIELDS = ("hidden_activation", "attention", "feed_forward", "pooling")
_MAX_LISTED = 40


class WeightsFileError(ValueError):
    """The weight file is missing, unreadable, corrupt or not in the expected layout."""


@dataclasses.dataclass
class LoadedWeights:
    config: fmt.ModelConfig
    tensors: dict[str, np.ndarray]      # dataset path -> float32 C-contiguous array, canonical order
    vocab: list[str] | None             # None when the file has no /vocab
    provenance: dict                    # the root attributes that are neither format nor config
    path: str
    sources: dict = dataclasses.field(default_factory=dict)  # dataset path -> `source` attribute (the
                                                              # SavedModel variable it was read from)
    head: dict | None = None            # {"kernel" [H,C], "bias" [C], "labels" [C] str} of a fine-tuned file


def _python(value):
    """An HDF5 attribute value as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _read_head(found: dict, config) -> tuple[dict | None, list[str]]:
    """The optional classifier head: kernel [H,C], bias [C], labels [C]."""
    missing = [p for p in fmt.HEAD_DATASETS if p not in found]
    if missing:
        return None, [f"head: dataset {p} is missing (a head needs {', '.join(fmt.HEAD_DATASETS)})" for p in missing]
    kernel, bias, labels = (found[p] for p in fmt.HEAD_DATASETS)
    problems = []
    if len(kernel.shape) != 2 or kernel.shape[0] != config.hidden_size:
        problems.append(f"dataset head/kernel has shape {kernel.shape}, expected ({config.hidden_size}, C)")
    elif bias.shape != (kernel.shape[1],) or labels.shape != (kernel.shape[1],):
        problems.append(f"head: bias {bias.shape} and labels {labels.shape} must both be ({kernel.shape[1]},)")
    if problems:
        return None, problems
    try:
        names = [str(x) for x in labels.asstr("utf-8")[()]]
    except (OSError, RuntimeError, ValueError, TypeError, UnicodeDecodeError) as e:
        return None, [f"dataset head/labels cannot be read as UTF-8 strings: {e}"]
    return {"kernel": np.asarray(kernel[()], np.float32), "bias": np.asarray(bias[()], np.float32),
            "labels": names}, []


def _fail(path: str, problems: list[str]):
    if len(problems) == 1:
        raise WeightsFileError(f"{path}: {problems[0]}")
    listed = problems[:_MAX_LISTED]
    more = [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
    raise WeightsFileError(f"{path}: {len(problems)} problems:\n" +
                           "\n".join(f"  {p}" for p in listed + more))


def _read_config(path: str, attrs) -> fmt.ModelConfig:
    problems = []
    values = {}
    for name in fmt.config_attr_names():
        if name not in attrs:
            if name not in fmt.OPTIONAL_ATTRS:
                problems.append(f"config attribute {name!r} is missing")
            continue
        value = _python(attrs[name])
        if name in _INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"config attribute {name!r} = {value!r} is not an integer")
        elif name in _FLOAT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                problems.append(f"config attribute {name!r} = {value!r} is not a finite number")
        elif name in _BOOL_FIELDS:
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                problems.append(f"config attribute {name!r} = {value!r} is not a boolean")
        elif name in _STR_FIELDS:
            if not isinstance(value, str):
                problems.append(f"config attribute {name!r} = {value!r} is not a string")
        values[name] = value
    if problems:
        _fail(path, problems)
    try:
        return fmt.ModelConfig.from_attrs(values)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsFileError(f"{path}: inconsistent config attributes: {e}") from None


def _check_file(path: str) -> None:
    """Clear errors for what h5py would report as an OSError traceback."""
    if not os.path.lexists(path):
        raise WeightsFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightsFileError(f"{path}: is a directory, not an HDF5 weight file")
    if not os.path.exists(path):
        raise WeightsFileError(f"{path}: a broken symbolic link")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except PermissionError:
        raise WeightsFileError(f"{path}: permission denied (cannot read the file)") from None
    except OSError as e:
        raise WeightsFileError(f"{path}: cannot read the file: {e.strerror or e}") from None
    if len(head) == 0:
        raise WeightsFileError(f"{path}: the file is empty, not an HDF5 weight file")
    if head != _HDF5_SIGNATURE and not h5py.is_hdf5(path):
        raise WeightsFileError(f"{path}: not an HDF5 file (no HDF5 signature)")


def load(path, *, verify_checksums: bool = False) -> LoadedWeights:
    """Reads and validates an HDF5 weight file; raises WeightsFileError naming file and dataset."""
    path = os.fspath(path)
    _check_file(path)
    try:
        f = h5py.File(path, "r")
    except PermissionError:
        raise WeightsFileError(f"{path}: permission denied (cannot read the file)") from None
    except OSError as e:
        raise WeightsFileError(f"{path}: cannot open as HDF5 (truncated or corrupt file?): {e}") from None
    try:
        return _load_open(path, f, verify_checksums)
    except WeightsFileError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:  # h5py on a corrupt file
        raise WeightsFileError(f"{path}: cannot read the file (corrupt?): {type(e).__name__}: {e}") from None
    finally:
        try:
            f.close()
        except Exception:  # closing a corrupt file must not hide the real error
            pass


def _load_open(path: str, f: h5py.File, verify_checksums: bool) -> LoadedWeights:
    attrs = f.attrs
    try:
        attr_names = set(attrs.keys())
    except (OSError, RuntimeError) as e:
        raise WeightsFileError(f"{path}: cannot read the root attributes (corrupt?): {e}") from None
    if "format" not in attr_names:
        raise WeightsFileError(f"{path}: no 'format' attribute: not a {fmt.FORMAT_NAME} weight file")
    name = _python(attrs["format"])
    if name != fmt.FORMAT_NAME:
        raise WeightsFileError(f"{path}: format is {name!r}, expected {fmt.FORMAT_NAME!r}")
    if "format_version" not in attr_names:
        raise WeightsFileError(f"{path}: no 'format_version' attribute")
    version = _python(attrs["format_version"])
    if isinstance(version, bool) or not isinstance(version, int):
        raise WeightsFileError(f"{path}: format_version {version!r} is not an integer")
    if version not in fmt.READABLE_VERSIONS:
        newer = " (written by a newer version of this project)" if version > fmt.FORMAT_VERSION else ""
        raise WeightsFileError(f"{path}: format_version {version}{newer}; this loader reads versions "
                               f"{', '.join(map(str, fmt.READABLE_VERSIONS))}")
    config = _read_config(path, attrs)
    skip = set(fmt.FORMAT_ATTRS) | set(fmt.config_attr_names())
    provenance = {k: _python(attrs[k]) for k in sorted(attr_names - skip)}

    # Structure: every expected dataset, nothing else.
    expected = fmt.expected_shapes(config)
    found: dict[str, h5py.Dataset] = {}
    others: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found[name] = obj
        elif not isinstance(obj, h5py.Group):
            others.append(name)

    f.visititems(visit)
    problems = []
    for ds_path, shape in expected.items():
        ds = found.get(ds_path)
        if ds is None:
            problems.append(f"dataset {ds_path} is missing (expected shape {shape})")
        elif ds.shape != shape:
            problems.append(f"dataset {ds_path} has shape {ds.shape}, expected {shape}")
        elif ds.dtype.kind != "f" or ds.dtype.itemsize != 4:
            problems.append(f"dataset {ds_path} has dtype {ds.dtype}, expected float32")
    head = None
    if any(p in found for p in fmt.HEAD_DATASETS):
        head, head_problems = _read_head(found, config)
        problems += head_problems
    for ds_path in sorted(found):
        if ds_path not in expected and ds_path != fmt.VOCAB_DATASET and ds_path not in fmt.HEAD_DATASETS:
            problems.append(f"dataset {ds_path} is unexpected (shape {found[ds_path].shape}, "
                            f"has_mlm={config.has_mlm})")
    for other in others:
        problems.append(f"object {other} is unexpected")
    vocab_ds = found.get(fmt.VOCAB_DATASET)
    if vocab_ds is not None:
        if vocab_ds.shape != (config.vocab_size,):
            problems.append(f"dataset {fmt.VOCAB_DATASET} has shape {vocab_ds.shape}, "
                            f"expected ({config.vocab_size},)")
        elif h5py.check_string_dtype(vocab_ds.dtype) is None:
            problems.append(f"dataset {fmt.VOCAB_DATASET} has dtype {vocab_ds.dtype}, expected UTF-8 strings")
    if problems:
        _fail(path, problems)

    # Values.
    tensors: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for ds_path in expected:
        ds = found[ds_path]
        sources[ds_path] = str(_python(ds.attrs["source"])) if "source" in ds.attrs else ""
        array = np.empty(ds.shape, dtype=np.float32)
        try:
            if array.size:
                ds.read_direct(array)
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            raise WeightsFileError(f"{path}: dataset {ds_path} cannot be read (truncated or corrupt "
                                   f"file?): {e}") from None
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            problems.append(f"dataset {ds_path} has {int(bad.sum())} non-finite values (NaN/inf), "
                            f"first at {first}")
        if verify_checksums:
            stored = _python(ds.attrs["sha256"]) if "sha256" in ds.attrs else None
            if stored is None:
                problems.append(f"dataset {ds_path} has no sha256 attribute to verify")
            elif fmt.tensor_checksum(array) != stored:
                problems.append(f"dataset {ds_path} fails its sha256 checksum (corrupt data)")
        tensors[ds_path] = array
    vocab = None
    if vocab_ds is not None:
        try:
            raw = vocab_ds.asstr("utf-8")[()]
        except (OSError, RuntimeError, ValueError, UnicodeDecodeError) as e:
            raise WeightsFileError(f"{path}: dataset {fmt.VOCAB_DATASET} cannot be read: {e}") from None
        vocab = [str(t) for t in raw]
        if verify_checksums and "sha256" in vocab_ds.attrs:
            if fmt.vocab_checksum(vocab) != _python(vocab_ds.attrs["sha256"]):
                problems.append(f"dataset {fmt.VOCAB_DATASET} fails its sha256 checksum (corrupt data)")
    if problems:
        _fail(path, problems)
    return LoadedWeights(config=config, tensors=tensors, vocab=vocab, provenance=provenance, path=path,
                         sources=sources, head=head)
