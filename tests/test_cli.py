"""The command line driven as a user would: subprocesses, exit codes, printed tables, written files."""

import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

import engine
from engine.cli.main import main as cli_main
from tests.conftest import REPO

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1", PYTHONUNBUFFERED="1")


def run(*args, timeout=900, env=ENV):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_main_job_prints_the_parity_table_for_the_tiny_model(tiny_savedmodel):
    """As a user runs it: neither TF variable set (engine/tf sets their defaults), so the start-up
    lines TensorFlow writes at its default log level are what the command must hold back."""
    user_env = {k: v for k, v in ENV.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS")}
    proc = run(env=user_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("PASS: noise verdict")
    noise = [line for line in proc.stderr.splitlines()                 # TensorFlow's start-up lines, held back
             if any(n in line for n in ("oneDNN", "cuInit", "cudart_stub", "absl::InitializeLog", "masked_lm_positions"))]
    assert not noise, noise
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
@pytest.mark.exhaustive
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
    assert "FAIL" in proc.stdout and "  FAIL  <-- first" in proc.stdout   # the table marks the first failing output


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
    from engine.text.preprocess import Preprocessor
    from engine.tf import reference
    from engine.tools.fill_mask import fill_mask
    enc = engine.load(tiny_h5)
    prep = Preprocessor(enc.vocab)
    result = fill_mask(enc, prep, "paris is the [MASK] of france", top_k=4).candidates
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
    proc = run("extract", tiny_savedmodel, "--output", str(out))
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    before = out.read_bytes()
    proc = run("extract", tiny_savedmodel, "--output", str(out))
    assert proc.returncode == 2 and "exists" in proc.stderr
    assert out.read_bytes() == before
    for route in (["reference"], ["--debug", "reference"]):   # one route, with and without --debug
        proc = run(*route, "--help")
        assert proc.returncode == 0 and "--config" in proc.stdout and "python -m engine reference" in proc.stdout
    proc = run("reference", "--output", str(tmp_path / "m"), "--config", "tiny", "--layers", "0")
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


# ----------------------------------------------------------------------------------------------
# One rule for every command: outputs, messages, ranges. In-process (engine.cli.main.main), tiny model.

EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b")


def _cli_error(capsys, *argv):
    """The one `error:` line of a command that must fail as a user error (exit 2, no traceback,
    no Python exception name)."""
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
    assert not EXCEPTION_NAME.search(lines[0]), lines[0]
    return lines[0]


def _train_csv(path):
    path.write_text("text,label\nthe cat sat,animal\nstocks fell,money\na dog barked,animal\nbanks lent,money\n",
                    encoding="utf-8")
    return str(path)


def test_a_missing_output_folder_is_refused_by_every_command(tiny_h5, tmp_path, capsys):
    train, corpus = _train_csv(tmp_path / "t.csv"), tmp_path / "c.txt"
    corpus.write_text("the cat sat\n", encoding="utf-8")
    missing = tmp_path / "typo"
    commands = {
        "encode": ["--weights", tiny_h5, "hi", "--output", missing / "o.npy"],
        "trace": ["--weights", tiny_h5, "hi", "--output", missing / "t.h5"],
        "predict": ["--weights", tiny_h5, "--input", train, "--output", missing / "p.jsonl"],
        "export-onnx": ["--weights", tiny_h5, "--output", missing / "m.onnx"],
        "finetune": ["--weights", tiny_h5, "--train", train, "--output", missing / "f.h5"],
        "pretrain": ["--weights", tiny_h5, "--input", corpus, "--output", missing / "p.h5"],
        "extract": [tmp_path, "--output", missing / "e.h5"],
        "export-savedmodel": ["--weights", tiny_h5, "--output", missing / "saved"],
        "reference": ["--output", missing / "ref"],
    }
    for command, argv in commands.items():
        line = _cli_error(capsys, command, *argv)
        assert f"the folder {missing} does not exist" in line, (command, line)
        assert not missing.exists(), command                       # never created


def test_every_command_refuses_an_existing_output_without_force(tiny_h5, tmp_path, capsys):
    train, corpus = _train_csv(tmp_path / "t.csv"), tmp_path / "c.txt"
    corpus.write_text("the cat sat\n", encoding="utf-8")
    out = tmp_path / "existing"
    out.write_bytes(b"keep me")
    commands = {
        "encode": ["--weights", tiny_h5, "hi", "--output", out.with_suffix(".npy")],
        "trace": ["--weights", tiny_h5, "hi", "--output", out.with_suffix(".h5")],
        "predict": ["--weights", tiny_h5, "--input", train, "--output", out.with_suffix(".jsonl")],
        "export-onnx": ["--weights", tiny_h5, "--output", out.with_suffix(".onnx")],
        "finetune": ["--weights", tiny_h5, "--train", train, "--output", out.with_suffix(".f.h5")],
        "pretrain": ["--weights", tiny_h5, "--input", corpus, "--output", out.with_suffix(".p.h5")],
        "extract": [tmp_path, "--output", out.with_suffix(".e.h5")],
        "export-savedmodel": ["--weights", tiny_h5, "--output", out.with_suffix(".saved")],
        "reference": ["--output", out.with_suffix(".ref")],
    }
    for command, argv in commands.items():
        target = argv[-1]
        target.write_bytes(b"keep me")
        line = _cli_error(capsys, command, *argv)
        assert line.endswith(f"{target}: exists; pass --force to replace it"), (command, line)
        assert target.read_bytes() == b"keep me", command
    trace = out.with_suffix(".h5")
    assert cli_main(["trace", "--weights", tiny_h5, "hi", "--output", str(trace), "--force"]) == 0
    with h5py.File(trace, "r") as f:
        assert "pooled_output" in f


def test_ranges_are_checked_naming_the_option(tiny_h5, tmp_path, capsys):
    train, corpus = _train_csv(tmp_path / "t.csv"), tmp_path / "c.txt"
    corpus.write_text("the cat sat\n", encoding="utf-8")
    finetune = ["finetune", "--weights", tiny_h5, "--train", train, "--output", tmp_path / "f.h5"]
    vocab = len(engine.load(tiny_h5).vocab)
    cases = [
        (finetune + ["--learning-rate", "-1"], "--learning-rate must be above 0, got -1"),
        (finetune + ["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (finetune + ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (finetune + ["--warmup-fraction", "1"], "--warmup-fraction must be at least 0 and below 1, got 1"),
        (finetune + ["--dropout", "-0.1"], "--dropout must be at least 0 and below 1, got -0.1"),
        (["pretrain", "--weights", tiny_h5, "--input", corpus, "--output", tmp_path / "p.h5", "--steps", "0"],
         "--steps must be at least 1, got 0"),
        (["fill-mask", "--weights", tiny_h5, "a [MASK]", "--top-k", "100000"],
         f"--top-k must be at most {vocab} (the vocabulary's size), got 100000"),
        (["fill-mask", "--weights", tiny_h5, "a [MASK]", "--top-k", "0"], "--top-k must be at least 1, got 0"),
    ]
    for argv, needle in cases:
        assert needle in _cli_error(capsys, *argv), needle
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.log.jsonl").exists()


def test_messages_name_the_option_file_or_row(tiny_h5, tmp_path, capsys):
    trace = tmp_path / "trace.h5"
    assert cli_main(["trace", "--weights", tiny_h5, "hello world", "--output", str(trace)]) == 0
    odd = tmp_path / "odd.txt"
    odd.write_text("not hdf5\n", encoding="utf-8")
    missing = tmp_path / "missing.txt"
    quote = tmp_path / "badquote.csv"
    quote.write_text('text,label\nfine,1\n"never closed,2\nmore,1\n', encoding="utf-8")
    cases = [
        (["pretrain", "--weights", tiny_h5, "--input", missing, "--output", tmp_path / "p.h5"],
         f"error: --input {missing}: no such file"),
        (["compare", trace, odd], f"error: B {odd}: not an HDF5 file"),
        (["compare", trace, tiny_h5], f"error: B {tiny_h5}: a weights file, not a trace file"),
        (["finetune", "--weights", tiny_h5, "--train", quote, "--output", tmp_path / "f.h5"],
         f"error: {quote}: row 2 (line 3): a quoted field is not closed"),
        (["fill-mask", "--weights", tiny_h5, "no mask"], "error: no [MASK] in 'no mask'"),
    ]
    for argv, needle in cases:
        line = _cli_error(capsys, *argv)
        assert line.startswith(needle), (needle, line)


def test_a_bug_shows_its_traceback_and_is_not_exit_code_2(tiny_h5, monkeypatch, capsys):
    from engine.tools import fill_mask

    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'vocab'")
    monkeypatch.setattr(fill_mask, "fill_mask", broken)
    rc = cli_main(["fill-mask", "--weights", tiny_h5, "a [MASK]"])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" in err and "AttributeError" in err and "a bug" in err, (rc, err[-2000:])


def test_verify_says_what_differs_when_the_weights_are_another_model(tiny_savedmodel, small_h5, capsys):
    line = _cli_error(capsys, "verify", "--savedmodel", tiny_savedmodel, "--weights", small_h5)
    assert f"--weights {small_h5}: does not match --savedmodel {tiny_savedmodel}" in line
    assert "num_layers: SavedModel 2, weights 3" in line and "hidden_size: SavedModel 64, weights 48" in line


def test_fill_mask_warns_when_it_truncates(tiny_h5, capsys):
    assert cli_main(["fill-mask", "--weights", tiny_h5, "the [MASK] sat on the mat in the sun all day",
                     "--seq-length", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("[MASK] #1:")
    assert "fill-mask: warning: the text needs 13 tokens with [CLS] and [SEP]; the last 7 were cut" in err


def test_trace_estimates_its_size_and_shows_progress(tiny_h5, tmp_path, capsys):
    out = tmp_path / "t.h5"
    texts = ["the quick brown fox jumps over the lazy dog"] * 6
    assert cli_main(["trace", "--weights", tiny_h5, *texts, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    estimate = float(re.search(r"about ([\d.]+) MiB", err).group(1))
    size = os.path.getsize(out) / 2**20
    print(f"trace: estimated {estimate:.2f} MiB, wrote {size:.2f} MiB")
    assert 0.9 * size <= estimate <= 1.1 * size
    assert "trace: 100%" in err                                       # the progress line
    assert err.index("about") < err.index("trace: 100%") < err.index("trace: wrote")


def test_encode_summary_after_resume_counts_every_row(tiny_h5, tmp_path, monkeypatch, capsys):
    from engine.tools import stream
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i} of the corpus\n" for i in range(300)), encoding="utf-8")
    out = tmp_path / "o.npy"
    argv = ["encode", "--weights", tiny_h5, "--input", str(src), "--output", str(out), "--max-tokens", "200"]
    real, calls = stream.write_json_atomic, []

    def dying(path, value):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        real(path, value)
    monkeypatch.setattr(stream, "write_json_atomic", dying)
    assert cli_main(argv) == 130
    monkeypatch.undo()
    done = json.load(open(str(out) + ".partial.json"))["rows_done"]
    capsys.readouterr()
    assert 0 < done < 300 and cli_main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"300 texts ({done} of them before the resume, {300 - done} in this run)" in err, err
    assert np.load(out).shape == (300, 64)
