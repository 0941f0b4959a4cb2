"""Streaming `encode` (engine/tools/stream.py): bounded memory, input order, refusing to overwrite, resume
after an interruption (simulated, and a real SIGKILL) with neither duplicate nor missing rows."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import engine
from engine.tools import stream, workfile
from tests.conftest import REPO

WORDS = ("the quick brown fox jumps over lazy dog cat sat on mat paris is capital of france "
         "talking heads attention mixes logits zürich café naïve 東京 , . !").split()


def corpus(path, n, seed=0, max_words=12):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words))) + "\n")
    return path


@pytest.fixture(scope="module")
def model(tiny_h5):
    from engine.text.preprocess import Preprocessor
    enc = engine.load(tiny_h5)
    return enc, Preprocessor(enc.vocab, lower_case=enc.config.do_lower_case)


def read(path):
    path = str(path)
    if path.endswith(".npy"):
        return np.load(path), None
    if path.endswith(".h5"):
        with h5py.File(path, "r") as f:
            key = "sequence_output" if "sequence_output" in f else "pooled_output"
            data = f[key][()]
        return data, stream.read_texts(path)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return np.array([r["pooled_output"] for r in rows], np.float32), [r["text"] for r in rows]


def test_streamed_rows_are_the_api_rows_in_input_order(model, tiny_h5, tmp_path):
    enc, prep = model
    src = corpus(tmp_path / "in.txt", 200, max_words=20)
    texts = src.read_text(encoding="utf-8").split("\n")[:-1]
    expected = np.concatenate([enc(prep(texts[i:i + 50], seq_length=32))["pooled_output"]
                               for i in range(0, len(texts), 50)])
    # each batch is packed to its longest text: the Hub's tokens, shorter padding, which padded keys
    # do not see; the rows agree with the seq_length packing within float32 noise
    for ext in ("npy", "h5", "jsonl"):
        out = tmp_path / f"o.{ext}"
        summary = stream.encode(enc, prep, str(src), str(out), seq_length=32, max_tokens=1000)
        assert summary["rows"] == 200 and summary["tokens"] == int(prep(texts, seq_length=32)["input_mask"].sum())
        got, got_texts = read(out)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
        assert got_texts in (None, texts)
    assert not [p for p in os.listdir(tmp_path) if "partial" in p or p.endswith(".tmp")]
    # the fast path, padding skipped, the budget in real tokens: the same rows within float32 noise
    fast = engine.load(tiny_h5, fast=True)
    out = tmp_path / "fast.npy"
    summary = stream.encode(fast, prep, str(src), str(out), seq_length=32, max_tokens=1000)
    assert summary["batches"] < -(-200 // (1000 // 32))                  # fewer batches than padded rows allow
    assert np.abs(np.load(out) - expected).max() <= 1e-5 * np.abs(expected).max()
    # sequence_output: [rows, seq_length, H], as enc(prep(texts, seq_length))
    seq = tmp_path / "seq.npy"
    stream.encode(enc, prep, texts[:20], str(seq), key="sequence_output", seq_length=16, max_tokens=100)
    np.testing.assert_allclose(np.load(seq), enc(prep(texts[:20], seq_length=16))["sequence_output"], atol=2e-6)


def test_token_budget_batches(model):
    enc, prep = model
    lines = iter([(t.encode() + b"\n", t) for t in ["a"] * 10 + ["word " * 40] + ["a"] * 3])
    truncated = []
    batches = list(stream.batches(lines, prep, 16, 24, None, False, False, truncated))
    widths = [(len(b[2]), b[3]) for b in batches]
    assert all(n * w <= 24 or n == 1 for n, w in widths), widths
    assert [len(b[0]) for b in batches] == [8, 2, 1, 3]                 # greedy, nothing sorted
    assert widths[2] == (1, 16) and truncated == [11]                   # a long line is cut to seq_length
    assert sum((b[0] for b in batches), []) == ["a"] * 10 + ["word " * 40] + ["a"] * 3


def test_existing_output_is_refused_without_force_and_kept(model, tmp_path):
    enc, prep = model
    out = tmp_path / "o.npy"
    np.save(out, np.arange(3))
    before = out.read_bytes()
    with pytest.raises(stream.StreamError, match="exists; pass --force"):
        stream.encode(enc, prep, ["a", "b"], str(out))
    assert out.read_bytes() == before
    with pytest.raises(stream.StreamError, match="is complete: no interrupted run"):
        stream.encode(enc, prep, ["a", "b"], str(out), resume=True)
    stream.encode(enc, prep, ["a", "b"], str(out), force=True)
    assert np.load(out).shape == (2, 64)


class Crash(KeyboardInterrupt):
    pass


def _crash_on_record(monkeypatch, after_records):
    """The process 'dies' right after the rows of a batch were written but before its record."""
    real = stream.write_json_atomic
    calls = []

    def write(path, value):
        calls.append(value.get("rows_done"))
        if len(calls) > after_records:
            raise Crash()
        real(path, value)
    monkeypatch.setattr(stream, "write_json_atomic", write)
    return calls


@pytest.mark.parametrize("ext", ["npy", "h5", "jsonl"])
def test_resume_after_a_crash_between_rows_and_record(model, tmp_path, monkeypatch, ext):
    enc, prep = model
    src = str(corpus(tmp_path / "in.txt", 400))
    one_shot = tmp_path / f"one.{ext}"
    stream.encode(enc, prep, src, str(one_shot), seq_length=24, max_tokens=300)
    out = tmp_path / f"o.{ext}"
    _crash_on_record(monkeypatch, after_records=6)   # the first record (0 rows) and 5 batches
    with pytest.raises(Crash):
        stream.encode(enc, prep, src, str(out), seq_length=24, max_tokens=300)
    monkeypatch.undo()
    partial, record_path = stream.paths(str(out))
    record = json.load(open(record_path))
    rows_in_file = (os.path.getsize(partial) - workfile.HEADER_LEN) // (64 * 4)
    assert not out.exists() and rows_in_file > record["rows_done"] > 0   # a batch past the record
    with pytest.raises(stream.StreamError, match="pass --resume to continue it or --force"):
        stream.encode(enc, prep, src, str(out), seq_length=24, max_tokens=300)
    messages = []
    summary = stream.encode(enc, prep, src, str(out), seq_length=24, max_tokens=300,
                            resume=True, progress=messages.append)
    assert summary["resumed_from"] == record["rows_done"] and summary["rows"] == 400
    assert any("resuming" in m for m in messages)
    a, ta = read(one_shot)
    b, tb = read(out)
    assert np.array_equal(a, b) and ta == tb                             # bit for bit, in order
    assert not os.path.exists(partial) and not os.path.exists(record_path)


def test_resume_refuses_another_input_or_other_parameters(model, tiny_h5, tmp_path, monkeypatch):
    import weights
    enc, prep = model
    src = corpus(tmp_path / "in.txt", 200)
    out = str(tmp_path / "o.npy")
    _crash_on_record(monkeypatch, after_records=4)
    with pytest.raises(Crash):
        stream.encode(enc, prep, str(src), out, seq_length=24, max_tokens=300)
    monkeypatch.undo()
    with pytest.raises(stream.StreamError, match=r"differs from the interrupted one \(max_tokens 300 -> 400\)"):
        stream.encode(enc, prep, str(src), out, seq_length=24, max_tokens=400, resume=True)
    with pytest.raises(stream.StreamError, match="seq_length 24 -> 32"):
        stream.encode(enc, prep, str(src), out, seq_length=32, max_tokens=300, resume=True)
    lines = src.read_text(encoding="utf-8").split("\n")
    changed = tmp_path / "changed.txt"
    changed.write_text("\n".join(["something else"] + lines[1:]), encoding="utf-8")
    os.replace(changed, src)                                                 # same name, other first line
    with pytest.raises(stream.StreamError, match="first .* lines of the input differ"):
        stream.encode(enc, prep, str(src), out, seq_length=24, max_tokens=300, resume=True)
    src.write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")           # shorter than the rows done
    with pytest.raises(stream.StreamError, match="not the same input"):
        stream.encode(enc, prep, str(src), out, seq_length=24, max_tokens=300, resume=True)
    other = engine.Encoder(enc.config, {**weights.load(tiny_h5).tensors, "pooler/bias": np.ones(64, np.float32)})
    with pytest.raises(stream.StreamError, match="weights"):
        stream.encode(other, prep, str(src), out, seq_length=24, max_tokens=300, resume=True)
    stream.encode(enc, prep, str(src), out, seq_length=24, max_tokens=300, force=True)   # starts over
    assert np.load(out).shape == (3, 64)


def test_a_bad_line_keeps_the_committed_rows_for_resume(model, tmp_path):
    enc, prep = model
    good = corpus(tmp_path / "good.txt", 100).read_bytes()
    lines = good.split(b"\n")
    bad = tmp_path / "in.txt"
    bad.write_bytes(b"\n".join(lines[:60] + [b"broken \xff line"] + lines[61:]))
    out = str(tmp_path / "o.npy")
    with pytest.raises(stream.StreamError, match=r"line 61 is not valid UTF-8 .*rows before it are committed"):
        stream.encode(enc, prep, str(bad), out, seq_length=24, max_tokens=200)
    bad.write_bytes(good)                                                    # fixed
    stream.encode(enc, prep, str(bad), out, seq_length=24, max_tokens=200, resume=True)
    stream.encode(enc, prep, str(bad), str(tmp_path / "ref.npy"), seq_length=24, max_tokens=200)
    assert np.array_equal(np.load(out), np.load(tmp_path / "ref.npy"))


# ----------------------------------------------------------------------------------------------
# Real processes: memory and SIGKILL.

# The peak RSS of the encode process itself: VmHWM (reset by exec), not getrusage's ru_maxrss, which on
# Linux keeps the high-water mark of the forking parent (pytest with TensorFlow loaded: ~700 MiB).
_RSS = ("import sys\nfrom engine.cli.main import main\nrc = main(sys.argv[1:])\n"
        "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print('MAXRSS_KB', hwm, file=sys.stderr)\nsys.exit(rc)\n")
# one BLAS thread: on a loaded 2-core machine OpenBLAS's spinning threads make tiny products 40x slower
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", OPENBLAS_NUM_THREADS="1")


def _encode_rss(tiny_h5, src, out, *extra):
    proc = subprocess.run([sys.executable, "-c", _RSS, "encode", "--weights", tiny_h5, "--input", str(src),
                           "--output", str(out), *extra], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stderr.split("MAXRSS_KB")[1].split()[0]) / 1024, proc.stderr


def test_memory_stays_bounded_on_a_corpus_larger_than_the_batches(tiny_h5, tmp_path):
    """sequence_output of 20,000 lines is 20000 x 16 x 64 float32 = 78 MiB: streamed, the peak RSS
    of the process stays that of 2,000 lines (8 MiB of output) within a few MiB."""
    small = corpus(tmp_path / "small.txt", 2_000, seed=1, max_words=6)
    large = corpus(tmp_path / "large.txt", 20_000, seed=2, max_words=6)
    args = ("--sequence", "--seq-length", "16", "--max-tokens", "1024")
    rss_small, _ = _encode_rss(tiny_h5, small, tmp_path / "small.h5", *args)
    t0 = time.perf_counter()
    rss_large, err = _encode_rss(tiny_h5, large, tmp_path / "large.h5", *args)
    seconds = time.perf_counter() - t0
    with h5py.File(tmp_path / "large.h5", "r") as f:
        assert f["sequence_output"].shape == (20_000, 16, 64) and f["texts"].shape == (20_000,)
    assert "encode: 100% " in err and "texts/s" in err                      # progress and summary lines
    print(f"peak RSS: {rss_small:.0f} MiB for 2k lines, {rss_large:.0f} MiB for 20k lines "
          f"(output 78 MiB), {seconds:.1f}s")
    assert rss_large - rss_small < 8, (rss_small, rss_large)


def test_sigkill_mid_run_then_resume_gives_the_one_shot_rows(tiny_h5, tmp_path):
    src = corpus(tmp_path / "in.txt", 6_000, seed=3)
    args = ["--input", str(src), "--seq-length", "32", "--max-tokens", "256"]
    one = tmp_path / "one.jsonl"
    _encode_rss(tiny_h5, src, one, *args[2:])
    out = tmp_path / "o.jsonl"
    partial, record_path = stream.paths(str(out))
    cmd = [sys.executable, "-m", "engine", "encode", "--weights", tiny_h5, "--output", str(out), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.load(open(record_path))["rows_done"] >= 1500:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = json.load(open(record_path))["rows_done"]
    assert 1500 <= done < 6000 and not out.exists()
    refused = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out} after {done} rows" in resumed.stderr
    a, ta = read(one)
    b, tb = read(out)
    texts = src.read_text(encoding="utf-8").split("\n")[:-1]
    assert ta == tb == texts                                  # every line once, in order
    assert np.array_equal(a, b)                               # bit for bit
    assert not os.path.exists(partial) and not os.path.exists(record_path)


def test_a_line_with_a_nul_byte_is_kept_in_h5_and_resumes(model, tiny_h5, tmp_path, monkeypatch, capsys):
    """HDF5 strings end at a NUL byte; `texts` holds UTF-8 bytes, so every line comes back as it was,
    in a one-shot run, after a resume, and through the command line."""
    from engine.cli.main import main
    enc, prep = model
    lines = [f"line {i} of the corpus" for i in range(120)]
    lines[37] = "a NUL \x00 inside, and ünïcödé"
    src = tmp_path / "odd.txt"
    src.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    one = tmp_path / "one.h5"
    stream.encode(enc, prep, str(src), str(one), seq_length=24, max_tokens=200)
    rows, texts = read(one)
    assert texts == lines and rows.shape == (120, 64)
    out = tmp_path / "odd.h5"
    _crash_on_record(monkeypatch, after_records=3)
    with pytest.raises(Crash):
        stream.encode(enc, prep, str(src), str(out), seq_length=24, max_tokens=200)
    monkeypatch.undo()
    summary = stream.encode(enc, prep, str(src), str(out), seq_length=24, max_tokens=200, resume=True)
    assert 0 < summary["resumed_from"] < 120 and summary["rows"] == 120
    resumed, resumed_texts = read(out)
    assert np.array_equal(resumed, rows) and resumed_texts == lines
    cli_out = tmp_path / "cli.h5"
    assert main(["encode", "--weights", tiny_h5, "--input", str(src), "--output", str(cli_out)]) == 0, \
        capsys.readouterr().err
    assert read(cli_out)[1] == lines
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_the_summary_of_a_resumed_run_counts_every_row_and_token(model, tmp_path, monkeypatch):
    enc, prep = model
    src = str(corpus(tmp_path / "in.txt", 300))
    one = stream.encode(enc, prep, src, str(tmp_path / "one.npy"), seq_length=24, max_tokens=300)
    _crash_on_record(monkeypatch, after_records=4)
    with pytest.raises(Crash):
        stream.encode(enc, prep, src, str(tmp_path / "o.npy"), seq_length=24, max_tokens=300)
    monkeypatch.undo()
    resumed = stream.encode(enc, prep, src, str(tmp_path / "o.npy"), seq_length=24, max_tokens=300, resume=True)
    assert resumed["rows"] == one["rows"] == 300 and resumed["tokens"] == one["tokens"]
    assert 0 < resumed["tokens_this_run"] < one["tokens"] and resumed["resumed_from"] > 0
