"""`encode --cluster` on a LocalCluster of two worker processes (engine/cluster): the same rows as the
single-process encode, a worker killed with SIGKILL mid-partition, the client killed and --resume,
corrupt shards, bad input; and the folder's reader (engine.read_embeddings). Tiny random weights
written without TensorFlow; every wait has a timeout."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import engine
from engine.cluster import run
from engine.cluster.plan import ClusterError
from engine.embeddings import Embeddings, EmbeddingsError, file_sha256, read_embeddings
from engine.text.preprocess import Preprocessor
from engine.tools import stream
from weights.format import ModelConfig
from weights.write import write_weights

from tests.random_weights import random_tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the cat sat on a mat dog is hello world and of to in it was for with as by über naïve "
         "quick brown fox jumps over lazy").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [".", ","]
CFG = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, head_size=8, intermediate_size=64,
                  vocab_size=len(VOCAB), max_position_embeddings=48, type_vocab_size=2)


def _lines(n: int, seed: int) -> list[str]:
    """Random sentences of 0 to 60 words (some past the 48 positions: truncated), one empty."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, rng.integers(1, 61))) for _ in range(n)]
    lines[7] = ""
    return lines


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    weights = write_weights(str(folder / "model.h5"), CFG, random_tensors(CFG, seed=1), vocab=VOCAB)
    corpus, second = str(folder / "corpus.txt"), str(folder / "second.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(_lines(1500, 0)) + "\n")
    with open(second, "w", encoding="utf-8") as f:
        f.write("\n".join(_lines(130, 1)))                      # no "\n" after the last line
    return {"folder": folder, "weights": weights, "inputs": [corpus, second]}


@pytest.fixture(scope="module")
def single(files):
    """The single-process encode of each input (as the command line runs it), rows concatenated."""
    enc = engine.load(files["weights"], fast=True, verify_checksums=True)
    prep = Preprocessor.from_weights(enc, max_seq_length=None)
    rows, truncated = [], 0
    for i, path in enumerate(files["inputs"]):
        out = str(files["folder"] / f"single{i}.npy")
        truncated += stream.encode(enc, prep, path, out)["truncated"]
        rows.append(np.load(out))
    return np.concatenate(rows), truncated


@pytest.fixture(scope="module")
def client():
    with run.connect("local:2", dashboard_address=":0") as c:
        yield c


def _encode(client, files, out, **kw):
    return run.encode(client, files["weights"], files["inputs"], str(out), **kw)


def _settle(client) -> None:
    """Waits until no worker runs a task (those of a failed run finish after it raised)."""
    deadline = time.monotonic() + 60
    while any(client.run(lambda dask_worker: len(dask_worker.state.executing)).values()):
        assert time.monotonic() < deadline, "tasks still running after 60 s"
        time.sleep(0.05)


def _stamps(folder) -> dict:
    """{shard: (inode, mtime)}: a rewritten shard (a rename onto it) gets another inode."""
    return {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in glob.glob(os.path.join(folder, "part-*.npy"))}


def test_the_rows_equal_the_single_process_encode_bit_for_bit(client, files, single, tmp_path):
    summary = _encode(client, files, tmp_path / "out", lines_per_partition=97)
    expected, truncated = single
    vectors = read_embeddings(tmp_path / "out", verify=True)
    assert isinstance(vectors, Embeddings) and all(isinstance(s, np.memmap) for s in vectors.shards)
    assert vectors.shape == expected.shape == (1630, 32) and vectors.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(vectors), expected)   # same batches within a partition, same kernels
    for index in (0, 96, 97, -1, (5, 3), (slice(10, 400, 7),), [3, 1500, 0], expected[:, 0] > 0):
        np.testing.assert_array_equal(vectors[index], expected[index])
    np.testing.assert_array_equal(read_embeddings(tmp_path / "out", dask=True).compute(), expected)
    assert summary["workers"] == 2 and summary["retried"] == 0 and summary["rows"] == 1630
    assert summary["truncated"] == truncated > 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    parts = manifest["partitions"]
    assert manifest["status"] == "complete" and len(parts) == 16 + 2        # 1500 = 15 x 97 + 45; 130 = 97 + 33
    assert [p["file"] for p in parts] == [files["inputs"][0]] * 16 + [files["inputs"][1]] * 2
    assert parts[15]["end"] == os.path.getsize(files["inputs"][0]) and parts[16]["start"] == 0
    assert [(p["first_line"], p["lines"]) for p in parts[15:]] == [(1456, 45), (1, 97), (98, 33)]
    for p in parts:
        assert p["sha256"] == file_sha256(str(tmp_path / "out" / p["shard"]))


def test_a_worker_killed_mid_partition_loses_and_duplicates_nothing(client, files, single, tmp_path):
    _settle(client)                                   # the busy worker is busy with this run
    killed = []

    def kill_a_busy_worker(result):
        if killed:
            return
        pids = client.run(os.getpid)
        for _ in range(200):                          # a worker inside a partition (not between two)
            busy = client.run(lambda dask_worker: len(dask_worker.state.executing))
            address = next((a for a, n in busy.items() if n), None)
            if address:
                os.kill(pids[address], signal.SIGKILL)
                killed.append(address)
                return
            time.sleep(0.005)

    summary = _encode(client, files, tmp_path / "out", lines_per_partition=50, on_done=kill_a_busy_worker)
    assert killed and summary["retried"] >= 1
    np.testing.assert_array_equal(np.asarray(read_embeddings(tmp_path / "out", verify=True)), single[0])
    assert summary["rows"] == 1630 and summary["partitions"] == 30 + 3
    assert not glob.glob(str(tmp_path / "out" / ".*.tmp"))
    client.wait_for_workers(2, timeout=60)            # the nanny started a new one


def test_the_client_killed_then_resume_recomputes_only_the_missing(client, files, single, tmp_path):
    import psutil
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "engine", "encode", "--weights", files["weights"], "--input", *files["inputs"],
           "--output", str(out), "--cluster", "local:2", "--partition-lines", "20"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children = []
    try:
        deadline = time.monotonic() + 90
        while len(glob.glob(str(out / "part-*.json"))) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            children = psutil.Process(proc.pid).children(recursive=True) or children
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, alive = psutil.wait_procs(children, timeout=30)   # the workers follow their client
        for p in alive:
            p.kill()
        proc.stderr.close()
    assert not alive, f"worker processes outlived their killed client: {alive}"
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    before = {p: s for p, s in _stamps(out).items() if os.path.exists(p[:-len(".npy")] + ".json")}
    summary = _encode(client, files, out, lines_per_partition=20, resume=True)
    assert summary["skipped"] == len(before) >= 4 and summary["encoded"] == 82 - len(before)
    after = _stamps(out)
    assert {p: after[p] for p in before} == before, "an intact shard was rewritten"
    np.testing.assert_array_equal(np.asarray(read_embeddings(out, verify=True)), single[0])


def test_corrupt_or_missing_shards_are_found_and_only_they_recomputed(client, files, single, tmp_path):
    out = tmp_path / "out"
    _encode(client, files, out, lines_per_partition=200)
    with open(out / "part-000003.npy", "r+b") as f:       # one flipped bit in a row
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x10]))
    with open(out / "part-000005.npy", "r+b") as f:       # cut short
        f.truncate(500)
    os.unlink(out / "part-000007.json")                   # never committed
    with pytest.raises(EmbeddingsError, match=r"part-000003\.npy: its sha256 differs"):
        read_embeddings(out, verify=True)
    before = _stamps(out)
    with pytest.raises(ClusterError, match="holds an encode .*--resume"):
        _encode(client, files, out, lines_per_partition=200)
    with pytest.raises(ClusterError, match=r"--resume: this run differs .*lines_per_partition 200 -> 100"):
        _encode(client, files, out, lines_per_partition=100, resume=True)
    summary = _encode(client, files, out, lines_per_partition=200, resume=True)
    assert (summary["encoded"], summary["skipped"]) == (3, 9 - 3)      # 1500 = 7 x 200 + 100; 130
    after = _stamps(out)
    redone = {p for p in before if after[p] != before[p]}
    assert {os.path.basename(p) for p in redone} == {"part-000003.npy", "part-000005.npy", "part-000007.npy"}
    np.testing.assert_array_equal(np.asarray(read_embeddings(out, verify=True)), single[0])


def test_a_bad_line_is_named_with_its_file_and_number_as_without_cluster(client, files, tmp_path):
    bad = tmp_path / "bad.txt"
    lines = [line.encode() for line in _lines(100, 2)]
    lines[56] = b"caf\xe9 au lait"                      # Latin-1, not UTF-8: line 57
    bad.write_bytes(b"\n".join(lines) + b"\n")
    enc = engine.load(files["weights"], fast=True)
    with pytest.raises(stream.StreamError) as alone:
        stream.encode(enc, Preprocessor.from_weights(enc, max_seq_length=None), str(bad), str(tmp_path / "a.npy"))
    with pytest.raises(ClusterError) as clustered:
        run.encode(client, files["weights"], [str(bad)], str(tmp_path / "out"), lines_per_partition=20)
    assert str(clustered.value) == str(alone.value) == \
        f"--input {bad}: line 57 is not valid UTF-8 (invalid continuation byte at byte 3)"
    lines[56] = "café au lait".encode()                 # fixed: one byte longer, the partitions after it move
    bad.write_bytes(b"\n".join(lines) + b"\n")
    _settle(client)
    committed = len(glob.glob(str(tmp_path / "out" / "part-*.json")))
    summary = run.encode(client, files["weights"], [str(bad)], str(tmp_path / "out"), lines_per_partition=20,
                         resume=True)
    assert (summary["skipped"], summary["encoded"]) == (committed, 5 - committed)
    stream.encode(enc, Preprocessor.from_weights(enc, max_seq_length=None), str(bad), str(tmp_path / "a.npy"))
    np.testing.assert_array_equal(np.asarray(read_embeddings(tmp_path / "out")), np.load(tmp_path / "a.npy"))


def test_an_input_a_worker_cannot_read_is_named_with_the_worker(client, files, tmp_path):
    with pytest.raises(ClusterError, match=rf"worker tcp://\S+: --weights {tmp_path}/none.h5: .*no such file"):
        run.encode(client, str(tmp_path / "none.h5"), files["inputs"], str(tmp_path / "w"))
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(ClusterError, match=rf"worker tcp://\S+ cannot read --input {missing}: No such file"):
        run.encode(client, files["weights"], [missing], str(tmp_path / "a"))
    gone = tmp_path / "gone.txt"                          # there for the plan, gone when a partition is read
    gone.write_text("\n".join(_lines(60, 3)) + "\n")
    with pytest.raises(ClusterError, match=rf"worker tcp://\S+ cannot read --input {gone}: No such file"):
        run.encode(client, files["weights"], [str(gone)], str(tmp_path / "b"), lines_per_partition=20,
                   on_start=lambda rows, partitions: os.unlink(gone))


def test_the_output_folder_and_options_are_checked(tmp_path, files):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ClusterError, match="not empty and holds no manifest.json"):
        run.prepare_folder(str(tmp_path / "notes"), resume=False, force=True)
    with pytest.raises(ClusterError, match="the folder .* does not exist"):
        run.prepare_folder(str(tmp_path / "no" / "out"), resume=False, force=False)
    with pytest.raises(ClusterError, match="expected local, local:N or a scheduler address"):
        run.parse_cluster("local2")
    assert run.parse_cluster("local:3") == ("local", 3) and run.parse_cluster("tcp://h:8786") == ("address", "tcp://h:8786")
    with pytest.raises(EmbeddingsError, match="no manifest.json"):
        read_embeddings(tmp_path / "notes")
    from engine.cli.main import main
    base = ["encode", "--weights", files["weights"], "--output", str(tmp_path / "o")]
    assert main(base + ["hello", "--cluster", "local:2"]) == 2                     # TEXT arguments
    assert main(base + ["--input", *files["inputs"]]) == 2                         # two files, no --cluster
    assert main(base + ["--input", files["inputs"][0], "--cluster", "local:2", "--partition-lines", "0"]) == 2


def test_without_dask_cluster_says_how_to_install(files, tmp_path):
    code = ("import sys; sys.modules['dask'] = sys.modules['distributed'] = None\n"
            "import engine; assert callable(engine.read_embeddings)\n"
            "from engine.cli.main import main\n"
            f"sys.exit(main(['encode', '--weights', {files['weights']!r}, '--input', {files['inputs'][0]!r}, "
            f"'--output', {str(tmp_path / 'out')!r}, '--cluster', 'local']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--cluster needs Dask: pip install 'talkheads-ggelu-engine[cluster]'" in result.stderr
