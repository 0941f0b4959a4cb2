"""The command line driven as a user would: subprocesses, exit codes, printed tables, written files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1", PYTHONUNBUFFERED="1")


def run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_main_job_prints_the_parity_table_for_the_tiny_model(tiny_savedmodel):
    proc = run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("PASS: noise verdict")
    assert "engine vs TF" in proc.stdout and "TF vs float64" in proc.stdout and "engine vs float64" in proc.stdout
    for name in ("encoder_outputs[0]", "encoder_outputs[1]", "sequence_output", "pooled_output", "mlm_logits"):
        rows = [l for l in proc.stdout.splitlines() if l.split()[:1] == [name]]
        assert len(rows) == 2 and all(l.endswith("PASS") for l in rows)  # text inputs and random inputs
        assert all(len(l.split()) == 11 for l in rows)                  # name, 3 x (max, rms, median), verdict


def _rules_hold(o):
    """The two rules of engine.tools.verdict, recomputed from the reported figures."""
    floor = 2.0 ** -23
    for s in ("max", "rms", "median"):
        e, t = max(o["ruled_engine_vs_float64"][s], floor), max(o["ruled_tf_vs_float64"][s], floor)
        n = max(o["ruled_noise"][s], floor)
        if e > o["accuracy_factor"][s] * t or t > o["noise_factor"][s] * n or n < e:
            return False
    return True


def test_verify_json_on_tiny_reports_every_figure(tiny_savedmodel, tiny_h5):
    proc = run("verify", "--savedmodel", tiny_savedmodel, "--weights", tiny_h5, "--json", "--batch", "3",
               "--seq-length", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["path"] == "fast" and report["rule"].startswith("noise verdict")
    outputs = [o for case in report["cases"] for o in case["outputs"]]
    assert {case["inputs"] for case in report["cases"]} == {"text", "random"}
    assert len(outputs) == 2 * 5
    for o in outputs:
        assert o["ok"] and _rules_hold(o), o
        assert set(o["engine_vs_tf"]) == set(o["tf_vs_float64"]) == set(o["engine_vs_float64"]) == {"max", "rms", "median"}
    print("worst engine vs TF (max, relative):", max(o["engine_vs_tf"]["max"] for o in outputs))
    # the readable path, one flag away, and the plain fixed tolerance
    proc = run("verify", "--savedmodel", tiny_savedmodel, "--weights", tiny_h5, "--json", "--batch", "3",
               "--seq-length", "64", "--readable", "--rtol", "1e-5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["path"] == "readable" and report["rule"].startswith("fixed tolerance")
    assert all(o["max_abs_diff"] <= 1e-5 * o["max_abs_reference"] for c in report["cases"] for o in c["outputs"])


def test_verify_fails_a_weights_file_that_differs_from_the_savedmodel(tiny_savedmodel, tiny_h5, tmp_path):
    import shutil

    import h5py
    bad = tmp_path / "shifted.h5"
    shutil.copy(tiny_h5, bad)
    with h5py.File(bad, "r+") as f:
        f["layers/1/attention_layer_norm/beta"][...] += np.float32(1e-4)
    proc = run("verify", "--savedmodel", tiny_savedmodel, "--weights", str(bad), "--json", "--batch", "3",
               "--seq-length", "64")
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    failed = {o["name"] for c in report["cases"] for o in c["outputs"] if not o["ok"]}
    assert "encoder_outputs[1]" in failed and "encoder_outputs[0]" not in failed, failed
    proc = run("verify", "--savedmodel", tiny_savedmodel, "--pooled-rtol", "1e-5")
    assert proc.returncode == 2 and "--pooled-rtol goes with --rtol" in proc.stderr


@pytest.mark.slow
def test_verify_json_on_base(base_savedmodel, base_h5):
    proc = run("verify", "--savedmodel", base_savedmodel, "--weights", base_h5, "--json", "--batch", "3",
               "--seq-length", "64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["config"]["num_layers"] == 12
    outputs = [o for case in report["cases"] for o in case["outputs"]]
    assert len(outputs) == 2 * (12 + 3)
    assert all(o["ok"] and _rules_hold(o) for o in outputs)


@pytest.mark.slow
def test_verify_passes_the_base_trained_like_model(base_trained_savedmodel, base_trained_h5):
    """The acceptance case of the noise verdict: base size, trained-like conditioning, defaults."""
    proc = run("verify", "--savedmodel", base_trained_savedmodel, "--weights", base_trained_h5)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "TF vs float64" in proc.stdout and proc.stdout.rstrip().splitlines()[-1].startswith("PASS")
    print(proc.stdout)


def test_verify_exits_1_above_tolerance(tiny_savedmodel, tiny_h5):
    proc = run("verify", "--savedmodel", tiny_savedmodel, "--weights", tiny_h5, "--rtol", "1e-12",
               "--pooled-rtol", "1e-12", "--batch", "2", "--seq-length", "16")
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and " NO" in proc.stdout


def test_encode_writes_npy_h5_and_jsonl_matching_the_api(tiny_h5, tmp_path):
    import h5py

    import engine
    from engine.text.preprocess import Preprocessor
    from engine.tools import verdict
    texts = ["hello world", "the cat sat on the mat", "ünïcödé and 漢字"]
    enc = engine.load(tiny_h5)
    inputs = Preprocessor(enc.vocab)(texts, seq_length=128)
    expected = enc(inputs)["pooled_output"]                                   # the readable path, Hub packing
    exact = engine.load(tiny_h5, dtype="float64")(inputs)["pooled_output"]
    for ext, flags in (("npy", []), ("h5", []), ("jsonl", []), ("npy", ["--readable"])):
        out = tmp_path / f"emb.{ext}"
        proc = run("encode", "--weights", tiny_h5, *texts, "--output", str(out), "--force", *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("readable path" if flags else "fast path") in proc.stderr
        if ext == "npy":
            got = np.load(out)
        elif ext == "h5":
            with h5py.File(out, "r") as f:
                got = f["pooled_output"][()]
        else:
            rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
            assert [r["text"] for r in rows] == texts
            got = np.array([r["pooled_output"] for r in rows])
        judgement = verdict.judge("pooled_output", got, expected, exact)   # within float32 noise of the API
        assert judgement.ok, judgement.detail
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_encode_sequence_output_from_input_file(tiny_h5, tmp_path):
    corpus = tmp_path / "in.txt"
    corpus.write_text("first line\nsecond line is longer\n", encoding="utf-8")
    out = tmp_path / "seq.npy"
    proc = run("encode", "--weights", tiny_h5, "--input", str(corpus), "--output", str(out), "--sequence",
               "--seq-length", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(out).shape == (2, 16, 64)
    # without --seq-length, rows are as wide as the longest text needs: [CLS] second line is longer [SEP]
    out = tmp_path / "fit.npy"
    proc = run("encode", "--weights", tiny_h5, "--input", str(corpus), "--output", str(out), "--sequence")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = np.load(out)
    assert rows.shape == (2, 6, 64) and np.all(rows[0, 4:] == 0)             # padded positions hold zeros


def test_fill_mask_prints_top_k_per_mask(tiny_h5):
    proc = run("fill-mask", "--weights", tiny_h5, "the [MASK] sat on the [MASK] .", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "[MASK] #1:" and "[MASK] #2:" in lines
    probs = [float(l.split()[-1]) for l in lines if l.startswith("  ")]
    assert len(probs) == 6 and all(0 < p <= 1 for p in probs)
    assert probs[:3] == sorted(probs[:3], reverse=True)


def test_fill_mask_agrees_with_tensorflow_mlm(tiny_h5, tiny_savedmodel):
    """The probabilities come from mlm_logits at the [MASK] positions: compare with TF's logits."""
    import engine
    from engine.cli.main import fill_mask
    from engine.text.preprocess import Preprocessor
    from engine.tf import reference
    enc = engine.load(tiny_h5)
    prep = Preprocessor(enc.vocab)
    result = fill_mask(enc, prep, "paris is the [MASK] of france", top_k=4)
    ids = [t for w in prep.tokenize(["paris is the"])[0] for t in w] + [prep.mask_id] + \
          [t for w in prep.tokenize(["of france"])[0] for t in w]
    packed = prep.bert_pack_inputs([[ids]], seq_length=128)
    pos = np.flatnonzero(packed["input_word_ids"][0] == prep.mask_id)[None].astype(np.int32)
    logits = reference.run_savedmodel(tiny_savedmodel, dict(packed, masked_lm_positions=pos))["mlm_logits"][0, 0]
    top = np.argsort(-logits)[:4]
    assert [tok for tok, _ in result[0]] == [enc.vocab[i] for i in top]
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    np.testing.assert_allclose([prob for _, prob in result[0]], p[top], rtol=1e-4)


def test_extract_and_reference_are_reachable(tiny_savedmodel, tmp_path):
    out = tmp_path / "m.h5"
    proc = run("extract", tiny_savedmodel, str(out))
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    before = out.read_bytes()
    proc = run("extract", tiny_savedmodel, str(out))
    assert proc.returncode == 2 and "exists" in proc.stderr
    assert out.read_bytes() == before
    for route in (["reference"], ["--debug", "reference"]):   # one route, with and without --debug
        proc = run(*route, "--help")
        assert proc.returncode == 0 and "--config" in proc.stdout and "python -m engine reference" in proc.stdout
    proc = run("reference", str(tmp_path / "m"), "--config", "tiny", "--layers", "0")
    assert proc.returncode == 2 and "layers must be a positive integer" in proc.stderr, proc.stderr[-2000:]
    proc = run("encode", "--weights", str(out), "hi", "--output", str(tmp_path / "x.npy"), "--no-such-flag")
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["encode", "--weights", "/nonexistent/model.h5", "hi", "--output", "/tmp/x.npy"], "/nonexistent/model.h5"),
    (["fill-mask", "--weights", "/nonexistent/model.h5", "a [MASK]"], "/nonexistent/model.h5"),
    (["verify", "--savedmodel", "/nonexistent/dir"], "/nonexistent/dir"),
    (["verify", "--batch", "0"], "--batch"),
])
def test_errors_are_one_line_with_exit_code_2(args, needle):
    proc = run(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert needle in _error_line(proc)


def test_encode_and_fill_mask_errors(tiny_h5, tmp_path):
    proc = run("encode", "--weights", tiny_h5, "hi", "--output", str(tmp_path / "x.csv"))
    assert proc.returncode == 2 and ".csv" in _error_line(proc)
    proc = run("fill-mask", "--weights", tiny_h5, "no mask here")
    assert proc.returncode == 2 and "[MASK]" in _error_line(proc)
    not_h5 = tmp_path / "not.h5"
    not_h5.write_text("hello")
    proc = run("fill-mask", "--weights", str(not_h5), "a [MASK]")
    assert proc.returncode == 2 and str(not_h5) in _error_line(proc)


def test_debug_shows_the_traceback():
    proc = run("--debug", "encode", "--weights", "/nonexistent/model.h5", "hi", "--output", "/tmp/x.npy")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "talkheads")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0 and "verify" in proc.stdout
