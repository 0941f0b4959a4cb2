"""The engine's settings (engine/core/settings.py): their defaults, the environment's defaults, bad
values refused in one line naming the setting, read once at load, and no process-wide side effect
unless asked for: OpenBLAS's thread count restored after a fast call, malloc tuning opt-in."""

import os

import numpy as np
import pytest

import engine
from engine.core import backend
from engine.core.settings import ENVIRONMENT, SettingError, Settings
from engine.fast import threads
from engine.tools import parity
from tests.random_weights import random_tensors
from weights.format import ModelConfig

TINY = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, head_size=16, intermediate_size=256,
                   vocab_size=3000, max_position_embeddings=64, type_vocab_size=2)


@pytest.fixture
def no_environment(monkeypatch):
    for variable in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def _inputs(config=TINY, batch=2, seq_length=40, seed=0):
    inputs = parity.random_inputs(np.random.default_rng(seed), batch, seq_length, config.vocab_size)
    return {k: v for k, v in inputs.items() if k != "masked_lm_positions"}


def test_built_in_defaults(no_environment):
    s = Settings.resolve()
    assert s == Settings()
    assert (s.backend, s.fused, s.packed, s.blas) == ("numpy", True, True, "pool")
    assert (s.gpu_path, s.precision, s.cuda_graphs, s.malloc_tuning) == ("fused", "float32", False, False)
    assert s.threads == len(os.sched_getaffinity(0))


def test_environment_gives_defaults_and_arguments_win(no_environment):
    no_environment.setenv("TALKHEADS_THREADS", " 3 ")
    no_environment.setenv("TALKHEADS_BACKEND", "NumPy")
    s = Settings.resolve()
    assert (s.threads, s.backend) == (3, "numpy")
    assert Settings.resolve(threads=1, fused=False).threads == 1
    assert Settings.resolve(threads=None).threads == 3          # None: the environment's default
    assert Settings.resolve(precision="TF32").precision == "tf32"


@pytest.mark.parametrize("given, message", [
    (dict(threads=0), "setting threads = 0: a whole number >= 1"),
    (dict(threads="two"), "setting threads = 'two': a whole number >= 1"),
    (dict(threads=True), "setting threads = True: a whole number >= 1"),
    (dict(fused="no"), "setting fused = 'no': True or False"),
    (dict(packed=1), "setting packed = 1: True or False"),
    (dict(blas="openblas"), "setting blas = 'openblas': choose one of pool, native"),
    (dict(backend="torch"), "setting backend = 'torch': choose one of numpy, cupy"),
    (dict(gpu_path="fast"), "setting gpu_path = 'fast': choose one of fused, plain"),
    (dict(precision="fp8"), "setting precision = 'fp8': choose one of float32, tf32, float16, bfloat16"),
    (dict(malloc_tuning="on"), "setting malloc_tuning = 'on': True or False"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_bad_values_are_named(given, message):
    for make in (Settings.resolve, Settings):          # the plain constructor checks too
        with pytest.raises(SettingError) as caught:
            make(**given)
        assert str(caught.value) == message


def test_bad_environment_value_names_the_variable(no_environment):
    no_environment.setenv("TALKHEADS_THREADS", "lots")
    with pytest.raises(SettingError) as caught:
        Settings.resolve()
    assert str(caught.value) == "setting threads (from $TALKHEADS_THREADS) = 'lots': a whole number >= 1"
    assert Settings.resolve(threads=2).threads == 2    # an argument does not read the variable


def test_unknown_setting_is_named():
    with pytest.raises(TypeError, match="unknown setting 'thread': the settings are backend, threads, "):
        Settings.resolve(thread=2)
    with pytest.raises(TypeError, match="unknown setting 'thread'"):
        engine.Encoder(TINY, random_tensors(TINY), thread=2)


def test_load_refuses_a_bad_setting_in_one_line(tiny_h5):
    with pytest.raises(SettingError) as caught:
        engine.load(tiny_h5, fast=True, threads=0)
    assert str(caught.value) == "setting threads = 0: a whole number >= 1"


def test_settings_are_read_once_at_load(tiny_h5, no_environment):
    """The environment at load decides; changing it afterwards changes nothing: the encoder keeps
    its Settings, and its calls ask the thread pool for its thread count only."""
    asked = []

    def pool_of(n, real=threads.thread_pool):
        asked.append(n)
        return real(n)
    from engine.fast import forward
    no_environment.setattr(threads, "thread_pool", pool_of)
    no_environment.setattr(forward, "thread_pool", pool_of)
    no_environment.setenv("TALKHEADS_THREADS", "1")
    enc = engine.load(tiny_h5, fast=True)
    inputs = _inputs(enc.config, seq_length=16)
    first = enc(inputs)
    no_environment.setenv("TALKHEADS_THREADS", "2")
    no_environment.setenv("TALKHEADS_BACKEND", "cupy")
    second = enc(inputs)
    assert enc.settings.threads == enc.fast_forward.settings.threads == 1 and enc.backend == "numpy"
    assert asked and set(asked) == {1}, asked
    np.testing.assert_array_equal(first["sequence_output"], second["sequence_output"])
    no_environment.delenv("TALKHEADS_BACKEND")
    assert engine.load(tiny_h5, fast=True).settings.threads == 2      # a new load reads it again


@pytest.mark.skipif(threads.blas_thread_setter() is None, reason="NumPy's OpenBLAS thread setter not found")
def test_blas_thread_count_restored_after_a_fast_call(monkeypatch):
    """A fast call with blas "pool" runs OpenBLAS at one thread and puts back the count it found,
    also when the call fails; blas "native" leaves it alone."""
    from engine.fast.forward import FastEncoder
    during = []
    real_encode = FastEncoder._encode

    def watched(self, *args, **kwargs):
        during.append(threads.blas_threads())
        if kwargs.get("skip_padding") or (len(args) > 3 and args[3]):
            raise RuntimeError("a failing call")
        return real_encode(self, *args, **kwargs)
    monkeypatch.setattr(FastEncoder, "_encode", watched)
    setter = threads.blas_thread_setter()
    found = setter(3)
    try:
        tensors = random_tensors(TINY)
        pooled = engine.Encoder(TINY, tensors, fast=True, threads=2)
        pooled(_inputs())
        assert (during, threads.blas_threads()) == ([1], 3)
        with pytest.raises(RuntimeError, match="a failing call"):
            pooled(_inputs(), skip_padding=True)
        assert (during[-1], threads.blas_threads()) == (1, 3)
        engine.Encoder(TINY, tensors, fast=True, threads=2, blas="native")(_inputs())
        assert (during[-1], threads.blas_threads()) == (3, 3)
    finally:
        setter(found)


def test_malloc_tuning_is_opt_in(monkeypatch):
    """The tape tunes glibc's malloc (a process-wide change) only when the settings ask for it."""
    calls = []
    monkeypatch.setattr(backend, "reuse_freed_memory", lambda: calls.append(1) or True)
    tensors = random_tensors(TINY)
    for fast in (False, True):
        with engine.Encoder(TINY, tensors, fast=fast).tape(_inputs()) as tape:
            assert tape.outputs["pooled_output"].shape == (2, TINY.hidden_size)
    assert calls == []
    with engine.Encoder(TINY, tensors, malloc_tuning=True).tape(_inputs()):
        pass
    assert calls == [1]


def test_default_threads_is_read_once(no_environment):
    """The thread count of callers given none (the tape's fused kernels, the optimizer) is the
    settings' default, read at its first use and kept."""
    first = threads.default_threads()
    no_environment.setenv("TALKHEADS_THREADS", str(first + 1))
    assert threads.default_threads() == first


def test_the_readme_table_names_every_setting_and_variable():
    """The README's settings table lists each field of Settings, with its environment variable where
    one gives its default, and no other."""
    import dataclasses
    import re
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8") as f:
        rows = [line for line in f if re.match(r"\| `[a-z_]+` \|", line)]
    table = {re.match(r"\| `([a-z_]+)`", row).group(1): re.findall(r"TALKHEADS_[A-Z_]+", row) for row in rows}
    fields = [field.name for field in dataclasses.fields(Settings)]
    print(f"README settings table: {sorted(table)}")
    assert sorted(table) == sorted(fields)
    assert {name: variables for name, variables in table.items() if variables} == \
        {name: [variable] for name, variable in ENVIRONMENT.items()}
