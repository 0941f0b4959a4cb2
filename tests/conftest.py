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
    from engine.tf import reference
    return reference.cached("tiny", seed=0, conditioning="random")


@pytest.fixture(scope="session")
def base_savedmodel():
    """The base-size reference SavedModel (L=12, H=768, N=12, I=3072), seed 0."""
    from engine.tf import reference
    return reference.cached("base", seed=0, conditioning="random")


@pytest.fixture(scope="session")
def tf_tiny(tiny_savedmodel):
    import tensorflow as tf
    return tf.saved_model.load(tiny_savedmodel)


@pytest.fixture(scope="session")
def tf_base(base_savedmodel):
    import tensorflow as tf
    return tf.saved_model.load(base_savedmodel)


@pytest.fixture(scope="session")
def tiny_h5(tiny_savedmodel):
    """The tiny reference model extracted to HDF5 (once, cached: engine.tf.extract.cached_extraction)."""
    from engine.tf import extract
    return extract.cached_extraction(tiny_savedmodel)


@pytest.fixture(scope="session")
def base_h5(base_savedmodel):
    """The base-size reference model extracted to HDF5 (once, cached: engine.tf.extract.cached_extraction)."""
    from engine.tf import extract
    return extract.cached_extraction(base_savedmodel)


# Trained-like conditioning (engine.tf.reference._TrainedLike): sharp pre-softmax mixing, LayerNorm
# gammas and betas away from 1 and 0, outlier hidden dimensions, larger embeddings.

@pytest.fixture(scope="session")
def tiny_trained_savedmodel():
    from engine.tf import reference
    return reference.cached("tiny", seed=0, conditioning="trained")


@pytest.fixture(scope="session")
def base_trained_savedmodel():
    from engine.tf import reference
    return reference.cached("base", seed=0, conditioning="trained")


@pytest.fixture(scope="session")
def tiny_trained_h5(tiny_trained_savedmodel):
    from engine.tf import extract
    return extract.cached_extraction(tiny_trained_savedmodel)


@pytest.fixture(scope="session")
def base_trained_h5(base_trained_savedmodel):
    from engine.tf import extract
    return extract.cached_extraction(base_trained_savedmodel)


@pytest.fixture(scope="session")
def small_savedmodel():
    """A small reference model (L=3, H=48, N=4, I=192, 64 positions, real vocab), trained-like weights."""
    from engine.tf import reference
    return reference.cached("small", seed=0, conditioning="trained")


@pytest.fixture(scope="session")
def small_h5(small_savedmodel):
    from engine.tf import extract
    return extract.cached_extraction(small_savedmodel)
