"""Behaviour of the command line and the fast path that nothing else covers, and
that every command is fast and fitting by default: help texts, examples, lengths fitted to the model."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import engine
from engine.cli import main as cli
from engine.tools import parity, verdict
from tests.conftest import REPO
from tests.test_cli import ENV, run


def test_every_option_has_help_and_every_command_an_example():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        if name == "reference":   # its own parser: checked below through the command line
            continue
        missing = [a.dest for a in command._actions if not a.help]
        assert not missing, (name, missing)
        assert command.format_help().rstrip().splitlines()[-1].strip().startswith("python -m engine"), name
    proc = run("reference", "--help")
    assert proc.returncode == 0 and proc.stdout.rstrip().splitlines()[-1].strip().startswith("python -m engine reference")


def test_verify_on_an_encoder_only_savedmodel():
    from engine.tf import reference
    savedmodel = reference.cached("tiny", seed=0, conditioning="random", with_mlm=False)
    proc = run("verify", "--savedmodel", savedmodel, "--json", "--batch", "3", "--seq-length", "32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    names = {o["name"] for c in report["cases"] for o in c["outputs"]}
    assert "mlm_logits" not in names and {"pooled_output", "sequence_output", "encoder_outputs[1]"} <= names
    assert report["ok"]


def test_fill_mask_fits_any_model_and_says_when_a_mask_is_trimmed(tmp_path):
    """A model with 64 positions: fill-mask with no options works (the default length is what the
    text needs); a [MASK] beyond --seq-length is a clear error."""
    from engine.tf import extract, reference
    small = reference.ReferenceConfig(layers=1, hidden=32, heads=2, intermediate=64, positions=64)
    h5 = extract.cached_extraction(reference.cached(small, seed=0))
    proc = run("fill-mask", "--weights", h5, "the [MASK] sat on the mat")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("[MASK] #1:")
    proc = run("fill-mask", "--weights", h5, "one two three four five six [MASK]", "--seq-length", "5")
    assert proc.returncode == 2 and "a [MASK] was trimmed away" in proc.stderr
    proc = run("fill-mask", "--weights", h5, "a [MASK]", "--seq-length", "128")
    assert proc.returncode == 2 and "exceeds the model's 64 positions" in proc.stderr
    long_text = "word " * 100 + "[MASK]"
    proc = run("encode", "--weights", h5, long_text, "short", "--output", str(tmp_path / "e.npy"))
    assert proc.returncode == 0 and "1 text was longer than 64 tokens and truncated (first at line 1)" in proc.stderr


def test_interrupt_exits_130_and_keeps_the_committed_rows(tiny_h5, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i} of a corpus that takes a while to encode\n" for i in range(40_000)))
    out = tmp_path / "o.npy"
    cmd = [sys.executable, "-m", "engine", "encode", "--weights", tiny_h5, "--input", str(src), "--output", str(out),
           "--max-tokens", "256"]
    # the child starts with SIGINT at its default, as under a terminal: a shell running this suite in
    # the background (no job control) hands its children SIGINT ignored, which Python keeps
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    record = str(out) + ".partial.json"
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(record):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "--resume" in err
    assert json.load(open(record))["rows_done"] > 0 and not out.exists()


def test_compare_json_and_trace_input(tiny_h5, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("The quick brown fox.\nTalking heads mix attention.\n", encoding="utf-8")
    ours = tmp_path / "ours.h5"
    proc = run("trace", "--weights", tiny_h5, "--input", str(texts), "--output", str(ours))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(ours, "r") as f:
        assert f["layers/0/q"].shape[:2] == (2, 7)             # fitted: 5 tokens + [CLS] + [SEP]
        assert json.loads(f.attrs["texts"]) == ["The quick brown fox.", "Talking heads mix attention."]
    theirs = tmp_path / "theirs.h5"
    shutil.copy(ours, theirs)
    with h5py.File(theirs, "r+") as f:
        f["layers/1/geglu"][...] *= np.float32(1.001)
    proc = run("compare", str(ours), str(theirs), "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["first_divergence"]["name"] == "layers/1/geglu" and report["tolerance"] == 1e-5
    assert len(report["intermediates"]) == 41 and report["intermediates"][0]["status"] == "ok"


def test_encode_batch_size_cap_and_resuming_a_complete_run(tiny_h5, tmp_path):
    out = tmp_path / "o.npy"
    texts = ["one", "two words", "three words here", "four", "five"]
    proc = run("encode", "--weights", tiny_h5, *texts, "--output", str(out), "--batch-size", "2")
    assert proc.returncode == 0 and "3 batches" in proc.stderr, proc.stderr[-2000:]
    before = out.read_bytes()
    proc = run("encode", "--weights", tiny_h5, *texts, "--output", str(out), "--resume")
    assert proc.returncode == 2 and "is complete: no interrupted run to resume" in proc.stderr
    assert out.read_bytes() == before


def test_fast_path_thread_modes_agree(tiny_h5):
    """The split mode (OpenBLAS single-threaded, the work over our pool of 2: the default on a
    multi-core machine), OpenBLAS's own threading (blas="native") and one thread (threads=1), each
    an encoder's own settings in one process: the same outputs within float32 noise of the float64
    truth."""
    import weights
    loaded = weights.load(tiny_h5)
    inputs = parity.random_inputs(np.random.default_rng(0), 4, 48, loaded.config.vocab_size)
    inputs = {k: v for k, v in inputs.items() if k != "masked_lm_positions"}
    exact = engine.load(tiny_h5, dtype="float64")(inputs)
    modes = {"split": dict(threads=2), "native": dict(threads=2, blas="native"), "single": dict(threads=1)}
    got = {}
    for name, settings in modes.items():
        enc = engine.Encoder(loaded.config, loaded.tensors, fast=True, **settings)
        assert (enc.settings.threads, enc.settings.blas) == (settings["threads"], settings.get("blas", "pool"))
        got[name] = enc(inputs)
    for name in ("native", "single"):
        for out in ("pooled_output", "sequence_output"):
            j = verdict.judge(f"{name} {out}", got[name][out], got["split"][out], exact[out])
            assert j.ok, j.detail


def test_float64_with_the_fast_path(tiny_h5):
    inputs = parity.random_inputs(np.random.default_rng(1), 3, 40, engine.load(tiny_h5).config.vocab_size,
                                  all_padding_row=True, num_positions=8)
    fast = engine.to_numpy(engine.load(tiny_h5, fast=True, dtype="float64").mlm(inputs))
    readable = engine.to_numpy(engine.load(tiny_h5, dtype="float64").mlm(inputs))
    for name, a in parity.flatten_outputs(fast).items():
        b = parity.flatten_outputs(readable)[name]
        assert a.dtype == np.float64
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), name   # float64 rounding only
    skipped = engine.to_numpy(engine.load(tiny_h5, fast=True, dtype="float64").mlm(inputs, skip_padding=True))
    real = inputs["input_mask"].astype(bool)
    assert np.abs(skipped["sequence_output"][real] - readable["sequence_output"][real]).max() <= \
        1e-12 * np.abs(readable["sequence_output"]).max()


def test_skip_padding_with_masks_that_are_not_prefixes(tiny_h5):
    """Holes in the mask (keys masked anywhere, as TF allows): skip_padding packs the real tokens,
    keeps their positions, and gives the readable path's real-token outputs."""
    enc, fast = engine.load(tiny_h5), engine.load(tiny_h5, fast=True)
    rng = np.random.default_rng(2)
    inputs = parity.random_inputs(rng, 3, 24, enc.config.vocab_size, padding=False)
    inputs.pop("masked_lm_positions", None)
    inputs["input_mask"] = (rng.random((3, 24)) < 0.7).astype(np.int32)
    inputs["input_mask"][:, 0] = 1
    real = inputs["input_mask"].astype(bool)
    assert not all(np.all(np.diff(row.astype(int)) <= 0) for row in real)   # not prefixes
    want = enc(inputs)
    exact = engine.load(tiny_h5, dtype="float64")(inputs)
    got = fast(inputs, skip_padding=True)
    for key in ("sequence_output", "pooled_output"):
        sel = real if key == "sequence_output" else real[:, 0]
        j = verdict.judge(key, got[key][sel], want[key][sel], exact[key][sel])
        assert j.ok, j.detail
    assert np.all(got["sequence_output"][~real] == 0)


def test_extraction_cache_is_keyed_on_the_extractor(tiny_savedmodel, monkeypatch):
    from engine.tf import extract
    first = extract.cached_extraction(tiny_savedmodel, progress=False)
    assert extract.cached_extraction(tiny_savedmodel, progress=False) == first   # cached
    monkeypatch.setattr(extract, "extractor_version", lambda: "a-changed-extractor")
    changed = extract.cached_extraction(tiny_savedmodel, progress=False)
    assert changed != first and os.path.isfile(changed)
    os.unlink(changed)
