"""Shared fixtures: reference SavedModels built once per test session (and cached on disk)."""

import os
import warnings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", message="Input dict contained keys")

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_savedmodel():
    """The tiny reference SavedModel (L=2, H=64, N=4, I=256, real 30522 vocab), seed 0."""
    from weights import reference
    return reference.cached("tiny", seed=0)


@pytest.fixture(scope="session")
def base_savedmodel():
    """The base-size reference SavedModel (L=12, H=768, N=12, I=3072), seed 0."""
    from weights import reference
    return reference.cached("base", seed=0)


@pytest.fixture(scope="session")
def tf_tiny(tiny_savedmodel):
    import tensorflow as tf
    return tf.saved_model.load(tiny_savedmodel)


@pytest.fixture(scope="session")
def tf_base(base_savedmodel):
    import tensorflow as tf
    return tf.saved_model.load(base_savedmodel)


def _extracted_h5(savedmodel: str) -> str:
    """The HDF5 extraction of `savedmodel`, made once and kept next to it (keyed by its path).

    A file lock makes concurrent test sessions wait for one extraction; the write itself is atomic,
    so an existing file is always complete.
    """
    import fcntl

    from weights import format as fmt
    savedmodel = os.path.normpath(os.path.abspath(savedmodel))
    out = f"{savedmodel}.format{fmt.FORMAT_VERSION}.h5"
    if os.path.isfile(out):
        return out
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(out):
            from weights import extract
            extract.extract(savedmodel, out, force=True)
    return out


@pytest.fixture(scope="session")
def tiny_h5(tiny_savedmodel):
    """The tiny reference model extracted to HDF5 (built once, cached next to the SavedModel)."""
    return _extracted_h5(tiny_savedmodel)


@pytest.fixture(scope="session")
def base_h5(base_savedmodel):
    """The base-size reference model extracted to HDF5 (built once, cached next to the SavedModel)."""
    return _extracted_h5(base_savedmodel)
