"""Shared fixtures: reference SavedModels built once per test session (and cached on disk). Each
base-size (`slow`) test runs in a process of its own (tests/isolated.py), and the session ends with
the suite's peak memory (tests/memory_record.py)."""

import os
import warnings

# For the tests that import tensorflow directly (engine.tf sets the same defaults for its own imports).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", message="Input dict contained keys")

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tests import isolated  # noqa: E402
from tests.memory_record import MemoryRecord  # noqa: E402

_MEMORY = MemoryRecord()


def pytest_configure(config):
    if not isolated.in_child():
        _MEMORY.start()


# A base-size variant whose twin runs in every suite (the other conditioning, the other kernel set):
# skipped unless $TALKHEADS_EXHAUSTIVE is 1, so that the whole suite fits CI's budget.
EXHAUSTIVE = os.environ.get("TALKHEADS_EXHAUSTIVE", "").strip() == "1"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    if not EXHAUSTIVE:
        skip = pytest.mark.skip(reason="a base-size variant whose twin runs in every suite: TALKHEADS_EXHAUSTIVE=1 runs it")
        for item in items:
            if item.get_closest_marker("exhaustive"):
                item.add_marker(skip)
    isolated.isolate(items)


def pytest_runtest_logstart(nodeid, location):
    _MEMORY.current = nodeid


def pytest_runtest_logfinish(nodeid, location):
    _MEMORY.current = None


def pytest_runtest_logreport(report):
    if isolated.in_child():
        isolated.send_report(report)
    _MEMORY.own_peaks.update({report.nodeid: v for k, v in report.user_properties if k == "own_peak_rss_mb"})


def pytest_sessionfinish(session):
    _MEMORY.stop()
    if isolated.in_child():
        isolated.send_peak()


def pytest_terminal_summary(terminalreporter):
    lines = _MEMORY.summary()
    if lines:
        terminalreporter.section("memory")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_savedmodel():
    """The tiny reference SavedModel (L=2, H=64, N=4, I=256, real 30522 vocab), seed 0."""
    from engine.tf import reference
    return reference.cached("tiny", seed=0, conditioning="random")


@pytest.fixture(scope="session")
def base_savedmodel():
    """The base-size reference SavedModel (L=12, H=768, N=12, I=3072), seed 0."""
    return isolated.base_model("random")[0]


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
def base_h5():
    """The base-size reference model extracted to HDF5 (once, cached: engine.tf.extract.cached_extraction)."""
    return isolated.base_model("random")[1]


# Trained-like conditioning (engine.tf.reference, conditioning="trained"): sharp pre-softmax mixing, LayerNorm
# gammas and betas away from 1 and 0, outlier hidden dimensions, larger embeddings.

@pytest.fixture(scope="session")
def tiny_trained_savedmodel():
    from engine.tf import reference
    return reference.cached("tiny", seed=0, conditioning="trained")


@pytest.fixture(scope="session")
def base_trained_savedmodel():
    return isolated.base_model("trained")[0]


@pytest.fixture(scope="session")
def tiny_trained_h5(tiny_trained_savedmodel):
    from engine.tf import extract
    return extract.cached_extraction(tiny_trained_savedmodel)


@pytest.fixture(scope="session")
def base_trained_h5():
    return isolated.base_model("trained")[1]


@pytest.fixture(scope="session")
def small_savedmodel():
    """A small reference model (L=3, H=48, N=4, I=192, 64 positions, real vocab), trained-like weights."""
    from engine.tf import reference
    return reference.cached("small", seed=0, conditioning="trained")


@pytest.fixture(scope="session")
def small_h5(small_savedmodel):
    from engine.tf import extract
    return extract.cached_extraction(small_savedmodel)
