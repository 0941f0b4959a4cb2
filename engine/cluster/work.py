"""What runs on a Dask worker: the model, loaded once per worker process by a worker plugin, and the
task that encodes one partition into one shard.

    client.register_plugin(EncoderPlugin(weights, threads=1))   # every worker, and each that joins later
    client.map(encode_partition, parts, job=job)                # -> {"record": ..., "stats": ...} each

The task is idempotent: a partition whose shard and commit record are already in the output folder,
for the same job and the same input bytes, and whose shard still hashes to its record's sha256, is
not encoded again. So a task recomputed after its worker died, and every task of a resumed run,
costs a hash of its shard when that shard is intact; nothing is ever appended to, so nothing is
written twice. Imported only where Dask is installed (it subclasses distributed.WorkerPlugin).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
from distributed import WorkerPlugin, get_worker

from engine.cluster.plan import ClusterError, partition_lines, read_range
from engine.embeddings import read_record, shard_problem, write_shard
from engine.core import backend as backend_mod
from engine.tools import stream

PLUGIN = "talkheads-encoder"
# What a commit record must share with the plan to count: the same lines (by their bytes' sha256) at
# the same place in the output. Not the byte offsets: after a line before it is fixed, a partition of
# the same bytes at another offset is the same work.
PLAN_FIELDS = ("file", "first_line", "lines", "input_sha256", "index", "row_start")


class EncoderPlugin(WorkerPlugin):
    """Loads the model (and its preprocessor) once on each worker, off the worker's event loop."""

    name = PLUGIN

    def __init__(self, weights: str, threads: int, readable: bool = False, backend: str | None = None):
        self.weights, self.threads, self.readable, self.backend = weights, threads, readable, backend

    async def setup(self, worker):
        self.address = worker.address
        self.lock = threading.Lock()       # one partition at a time on the model, whatever the worker's nthreads
        self.error = None
        await asyncio.get_running_loop().run_in_executor(None, self.load)
        if self.error is not None:
            raise ClusterError(self.error)

    def load(self) -> None:
        import engine
        from engine.core.backend import resolve_name
        from engine.text.preprocess import Preprocessor
        t0 = time.perf_counter()
        try:
            fast = not self.readable and resolve_name(self.backend) == "numpy"
            self.encoder = engine.load(self.weights, backend=self.backend, fast=fast, verify_checksums=True,
                                       threads=self.threads)
        except Exception as e:        # WeightsFileError, a missing file, a bad setting: said on the client
            why = str(e).removeprefix(f"{self.weights}: ")               # the loader names the file too
            self.error = f"worker {self.address}: --weights {self.weights}: {why}"
            return
        if not self.encoder.vocab:
            self.error = f"--weights {self.weights}: the weights file holds no vocab: text input needs one"
            return
        self.preprocessor = Preprocessor.from_weights(self.encoder, max_seq_length=None)
        self.info = {"fingerprint": stream.weights_fingerprint(self.encoder),
                     "config": dataclasses.asdict(self.encoder.config),
                     "dtype": np.dtype(self.encoder.dtype).str,
                     "skip_padding": bool(getattr(self.encoder.fast_forward, "skips_padding", False)),
                     "path": "readable" if self.encoder.fast_forward is None else "fast",
                     "load_seconds": time.perf_counter() - t0}


def plugin_info(dask_worker) -> dict:
    """The model's fingerprint, config and load time on this worker (client.run calls it on all)."""
    plugin = dask_worker.plugins.get(PLUGIN)
    if plugin is None or getattr(plugin, "error", "not set up") is not None:
        return {"error": getattr(plugin, "error", None) or f"worker {dask_worker.address}: the model is not loaded"}
    return plugin.info


def scan(paths: list[str], lines_per_partition: int) -> tuple[list[dict], list[dict]]:
    """The plan (engine/cluster/plan.py), made on a worker: the client never reads the input."""
    from engine.cluster.plan import scan_inputs
    return scan_inputs(paths, lines_per_partition, where=f"worker {get_worker().address}")


def _committed(folder: str, part: dict, job: dict) -> dict | None:
    """The partition's commit record when its shard is already there, intact, for this job."""
    record = read_record(folder, part["index"])
    if record is None or record.get("job") != job["digest"]:
        return None
    if any(record.get(k) != part[k] for k in PLAN_FIELDS):
        return None
    return record if shard_problem(folder, record) is None else None


def batch_rows(enc, packed: dict, key: str, normalize: bool, skip_padding: bool) -> np.ndarray:
    """One batch's rows as the single-process encode computes them (engine/tools/stream.py):
    enc.embed for a sentence embedding [B,H], else the output itself ([B,S,H] sequence_output)."""
    if key in stream.POOLINGS:
        rows = enc.embed(packed, stream.POOLINGS[key], normalize, skip_padding)
    else:
        rows = enc(packed, skip_padding=skip_padding, outputs=(key,))[key]
    return backend_mod.to_numpy(rows)


def encode_rows(plugin, lines, job: dict, first_line: int, truncated: list) -> tuple[np.ndarray, int]:
    """The partition's rows in input order [lines, ...] and its real tokens: the single-process
    encode's batching (engine/tools/stream.py's batches), restarted at the partition's first line."""
    enc, prep = plugin.encoder, plugin.preprocessor
    key, seq_length = job["key"], job["seq_length"]
    out, tokens = [], 0
    for _texts, _raws, rows, width in stream.batches(lines, prep, seq_length, job["max_tokens"], job["max_rows"],
                                                     key == "sequence_output", job["skip_padding"], truncated,
                                                     first_line=first_line):
        packed = prep.bert_pack_inputs([rows], seq_length=width)
        tokens += int(packed["input_mask"].sum())
        out.append(batch_rows(enc, packed, key, job["normalize"], job["skip_padding"]))
    if not out:
        return np.empty((0, *job["row_shape"]), job["dtype"]), 0
    return np.concatenate(out), tokens


def encode_partition(part: dict, job: dict) -> dict:
    """Encodes one partition into output/part-<index>.npy (unless already committed there) and
    returns {"record": its commit record, "stats": what it did, where and how long}."""
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN)
    if plugin is None or getattr(plugin, "error", "not set up") is not None:
        raise ClusterError(getattr(plugin, "error", None) or f"worker {worker.address}: the model is not loaded")
    if plugin.info["fingerprint"] != job["fingerprint"]:
        raise ClusterError(f"worker {worker.address}: --weights {plugin.weights} is another model than the other "
                           f"workers' (fingerprints differ): every worker must see the same file")
    folder, t0 = job["output"], time.perf_counter()
    stats = {"index": part["index"], "rows": part["lines"], "worker": worker.address, "skipped": False, "read_seconds": 0.0, "encode_seconds": 0.0,
             "write_seconds": 0.0, "tokens": 0, "truncated": 0, "first_truncated_line": None}
    record = _committed(folder, part, job)
    stats["check_seconds"] = time.perf_counter() - t0
    if record is not None:
        stats["skipped"] = True
        return {"record": record, "stats": stats}
    t1 = time.perf_counter()
    data = read_range(part, where=f"worker {worker.address}")
    t2 = time.perf_counter()
    truncated = []
    with plugin.lock:
        rows, stats["tokens"] = encode_rows(plugin, partition_lines(part, data), job, part["first_line"], truncated)
    stats.update(truncated=len(truncated), first_truncated_line=truncated[0] if truncated else None)
    t3 = time.perf_counter()
    if rows.shape[0] != part["lines"]:   # a bug, not an input problem: the plan and the lines disagree
        raise RuntimeError(f"partition {part['index']}: {rows.shape[0]} rows for {part['lines']} planned lines")
    entry = {k: part[k] for k in (*PLAN_FIELDS, "start", "end")}
    record = write_shard(folder, part["index"], rows, dict(entry, job=job["digest"]))
    stats.update(read_seconds=t2 - t1, encode_seconds=t3 - t2, write_seconds=time.perf_counter() - t3)
    return {"record": record, "stats": stats}
