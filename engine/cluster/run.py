"""The client's side of a distributed encode: connect (or start a LocalCluster), load the model on
every worker, plan the partitions, run them, follow their progress, write the manifest.

    with connect("local:2") as client:                                  # or "tcp://HOST:PORT"
        summary = encode(client, "model.h5", ["corpus.txt"], "out/", lines_per_partition=1000)
    vectors = engine.read_embeddings("out/")

The client holds no corpus: the plan is made on a worker (engine/cluster/plan.py) and each worker
reads its own partitions' bytes; what comes back per partition is its commit record and a few
timings. Faults: a worker that dies mid-partition is replaced (by its nanny) and the scheduler runs
the partition again elsewhere; the task is idempotent (engine/cluster/work.py), so nothing is lost
or written twice. A client that dies leaves committed shards and their records; `resume=True` runs
every partition again, and each one whose shard is intact (its sha256 checked) returns at once.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time
import uuid

from engine.cluster.plan import ClusterError
from engine.embeddings import MANIFEST, EmbeddingsError, read_manifest, write_manifest
from engine.tools.stream import OUTPUT_NAMES

INSTALL = ("--cluster needs Dask: pip install 'talkheads-ggelu-engine[cluster]', or in this checkout "
           ".venv/bin/python -m pip install dask==2026.8.0 distributed==2026.8.0 bokeh==3.9.2 "
           "(scripts/setup.sh installs them)")
JOB_FIELDS = ("key", "normalize", "seq_length", "max_tokens", "max_rows", "skip_padding", "dtype", "row_shape",
              "fingerprint")


def require_dask() -> None:
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError:
        raise ClusterError(INSTALL) from None


def parse_cluster(spec: str) -> tuple[str, int | str | None]:
    """("local", workers or None) or ("address", "tcp://HOST:PORT") from --cluster's value."""
    if spec == "local":
        return "local", None
    if spec.startswith("local:"):
        count = spec[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise ClusterError(f"--cluster {spec}: expected local:N with N a whole number of workers >= 1")
        return "local", int(count)
    if "://" in spec:
        return "address", spec
    raise ClusterError(f"--cluster {spec}: expected local, local:N or a scheduler address tcp://HOST:PORT")


@contextlib.contextmanager
def connect(spec: str, threads_per_worker: int = 1, dashboard_address: str = "127.0.0.1:8787",
            timeout: float = 60.0):
    """A distributed.Client: on a LocalCluster of N worker processes (default: the CPUs divided by
    threads_per_worker), each running one partition at a time, or on the scheduler at an address."""
    require_dask()
    import logging

    from distributed import Client, LocalCluster
    kind, value = parse_cluster(spec)
    if kind == "local":
        from engine.core.settings import usable_cpus
        workers = value or max(1, usable_cpus() // threads_per_worker)
        # one task thread per worker: the model's own threads (threads_per_worker) do the parallel work
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=dashboard_address, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(value, timeout=min(timeout, 20.0))
    except (OSError, TimeoutError) as e:
        raise ClusterError(f"--cluster {value}: cannot reach the scheduler ({e})") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ClusterError(f"--cluster {value}: no worker joined the scheduler in {timeout:.0f}s") from None
        yield client


# ------------------------------------------------------------------------------------------ the folder

def _ours(folder: str) -> list[str]:
    names = ("manifest.json", "part-*.npy", "part-*.json", ".part-*.tmp", ".manifest.json.*.tmp")
    return sorted({p for pattern in names for p in glob.glob(os.path.join(folder, pattern))})


def prepare_folder(output: str, resume: bool, force: bool) -> dict | None:
    """The output folder made ready; returns the interrupted run's manifest to resume, or None."""
    folder = os.path.abspath(output)
    parent = os.path.dirname(folder)
    if not os.path.isdir(parent):
        raise ClusterError(f"--output {output}: the folder {parent} does not exist")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ClusterError(f"--output {output}: is a file; with --cluster the output is a folder of shards")
    if os.path.exists(os.path.join(folder, MANIFEST)):
        if resume:
            try:
                return read_manifest(folder)
            except EmbeddingsError as e:
                raise ClusterError(f"--resume: {e}") from None
        if not force:
            raise ClusterError(f"--output {output}: holds an encode ({MANIFEST}); pass --resume to finish or "
                               f"check it, or --force to start over")
    elif os.path.isdir(folder) and os.listdir(folder) and set(_ours(folder)) != {
            os.path.join(folder, f) for f in os.listdir(folder)}:
        raise ClusterError(f"--output {output}: is a folder that is not empty and holds no {MANIFEST}: give a "
                           f"new or empty folder")
    os.makedirs(folder, exist_ok=True)
    for path in _ours(folder):       # --force, or the leftovers of a run killed before its manifest
        os.unlink(path)
    return None


def output_kind(config: dict, sequence: bool, pooling: str | None, normalize: bool | None) -> tuple[str, bool]:
    """(what is written, L2-normalized?): --sequence, else --pooling and --normalize, each defaulting
    to the weights file's config, as the single-process encode chooses."""
    if sequence:
        return "sequence_output", False
    key = OUTPUT_NAMES[pooling or config.get("pooling", "pooled")]
    return key, bool(config.get("normalize", False) if normalize is None else normalize)


# ------------------------------------------------------------------------------------------ the model

def load_model(client, weights: str, threads: int, readable: bool, backend: str | None) -> dict:
    """Loads the model on every worker (a plugin: workers that join later load it too); returns
    {worker address: info} after checking every worker has the same model."""
    from engine.cluster.work import EncoderPlugin, plugin_info
    try:
        client.register_plugin(EncoderPlugin(weights, threads, readable, backend))
    except ClusterError as e:
        raise ClusterError(str(e)) from None
    infos = client.run(plugin_info)
    errors = [info["error"] for info in infos.values() if "error" in info]
    if errors:
        raise ClusterError(errors[0])
    prints = {info["fingerprint"] for info in infos.values()}
    if len(prints) > 1:
        raise ClusterError(f"--weights {weights}: the workers loaded {len(prints)} different models: every "
                           f"worker must see the same file at that path")
    return infos


def job_of(info: dict, output: str, key: str, normalize: bool, seq_length: int | None, max_tokens: int,
           max_rows: int | None) -> dict:
    """What every partition is encoded with; its digest marks the shards made with it."""
    config = info["config"]
    positions = config["max_position_embeddings"]
    if seq_length is None and key == "sequence_output":
        raise ClusterError("--sequence with --cluster needs --seq-length: every shard's row width must be "
                           "known before the partitions run")
    if seq_length is not None and not 2 <= seq_length <= positions:
        raise ClusterError(f"--seq-length {seq_length}: must be between 2 and the model's {positions} positions")
    seq_length = seq_length or config.get("max_seq_length") or positions
    hidden = config["hidden_size"]
    job = {"key": key, "normalize": normalize, "seq_length": int(seq_length), "max_tokens": int(max_tokens),
           "max_rows": None if max_rows is None else int(max_rows), "skip_padding": info["skip_padding"],
           "dtype": info["dtype"], "row_shape": [int(seq_length), hidden] if key == "sequence_output" else [hidden],
           "fingerprint": info["fingerprint"]}
    digest = hashlib.sha256(json.dumps({k: job[k] for k in JOB_FIELDS}, sort_keys=True).encode()).hexdigest()
    return dict(job, digest=digest, output=os.path.abspath(output))


def check_resumable(manifest: dict, params: dict) -> None:
    """Refuses a resume whose options differ from the interrupted run's."""
    before = manifest.get("params", {})
    differ = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in params.items() if before.get(k) != v]
    if differ:
        raise ClusterError(f"--resume: this run differs from the one in the folder ({'; '.join(differ)}): use "
                           f"the same options, or start over with --force")


# ------------------------------------------------------------------------------------------ running

def _suspicious(keys, dask_scheduler=None) -> int:
    """How many times the scheduler had to run these tasks again because their worker died."""
    tasks = dask_scheduler.tasks
    return sum(tasks[k].suspicious for k in keys if k in tasks)


def _failure(error: BaseException, part: dict) -> BaseException:
    """A task's exception as the client reports it: our errors as they are, a worker killed again and
    again named with its partition, anything else (a bug) unchanged."""
    from distributed import KilledWorker
    where = f"partition {part['index']} ({part['file']} lines {part['first_line']}-" \
            f"{part['first_line'] + part['lines'] - 1})"
    if isinstance(error, ClusterError):
        return ClusterError(str(error))
    if isinstance(error, KilledWorker):
        return ClusterError(f"{where} killed the workers that ran it, again and again (out of memory? lower "
                            f"--partition-lines or --max-tokens)")
    return error


def run_partitions(client, parts: list[dict], job: dict, on_done=None) -> tuple[list[dict], list[dict], int]:
    """Runs every partition; returns (records in input order, stats in completion order, retries)."""
    from distributed import as_completed

    from engine.cluster.work import encode_partition
    token = uuid.uuid4().hex[:8]
    keys = [f"talkheads-encode-{token}-{p['index']:06d}" for p in parts]
    futures = client.map(encode_partition, parts, job=job, key=keys)
    index = {f.key: i for i, f in enumerate(futures)}
    records, stats = [None] * len(parts), []
    try:
        for future in as_completed(futures):
            i = index[future.key]
            if future.status == "error":
                raise _failure(future.exception(), parts[i])
            result = future.result()
            records[i] = result["record"]
            stats.append(result["stats"])
            if on_done is not None:
                on_done(result)
        retried = client.run_on_scheduler(_suspicious, keys)
    finally:
        client.cancel(futures)
    return records, stats, retried


def summarize(records: list[dict], stats: list[dict], infos: dict, seconds: float, retried: int) -> dict:
    """The run in numbers: what was encoded or found intact, where the time went (summed over the
    workers' tasks), the truncated texts."""
    encoded = [s for s in stats if not s["skipped"]]
    first = min((s["first_truncated_line"] for s in encoded if s["truncated"]), default=None)
    stages = {k: sum(s[f"{k}_seconds"] for s in stats) for k in ("check", "read", "encode", "write")}
    return {"rows": sum(r["rows"] for r in records), "partitions": len(records), "encoded": len(encoded),
            "skipped": len(stats) - len(encoded), "rows_encoded": sum(s["rows"] for s in encoded),
            "retried": retried, "workers": len(infos), "seconds": seconds,
            "tokens": sum(s["tokens"] for s in encoded), "truncated": sum(s["truncated"] for s in encoded),
            "first_truncated_line": first, "load_seconds": {w: i["load_seconds"] for w, i in infos.items()},
            "stage_seconds": stages}


def encode(client, weights: str, inputs: list[str], output: str, *, lines_per_partition: int = 1000,
           threads_per_worker: int = 1, sequence: bool = False, pooling: str | None = None,
           normalize: bool | None = None, seq_length: int | None = None, max_tokens: int = 2048,
           max_rows: int | None = None, readable: bool = False, backend: str | None = None,
           resume: bool = False, force: bool = False, say=None, on_start=None, on_done=None) -> dict:
    """Encodes every line of `inputs` (paths every worker can open) into the folder `output` on the
    cluster of `client`; see the module docstring. on_start(total rows, partitions) and
    on_done(partition result) follow the progress. Returns summarize()'s numbers plus key, normalize,
    shape and the manifest's path. Raises ClusterError on a user-facing problem."""
    from engine.cluster.work import scan
    say = say or (lambda message: None)
    t0 = time.perf_counter()
    if lines_per_partition < 1:
        raise ClusterError(f"--partition-lines must be at least 1, got {lines_per_partition}")
    if resume and force:
        raise ClusterError("--resume and --force exclude each other")
    inputs = [os.path.abspath(os.fspath(p)) for p in inputs]
    before = prepare_folder(output, resume, force)
    folder = os.path.abspath(output)
    infos = load_model(client, os.path.abspath(weights), threads_per_worker, readable, backend)
    info = next(iter(infos.values()))
    say(f"encode: model loaded on {len(infos)} workers ({info['path']} path, {threads_per_worker} thread"
        f"{'s' if threads_per_worker > 1 else ''} each) in {max(i['load_seconds'] for i in infos.values()):.1f}s")
    key, normalize = output_kind(info["config"], sequence, pooling, normalize)
    job = job_of(info, folder, key, normalize, seq_length, max_tokens, max_rows)
    params = dict({k: job[k] for k in JOB_FIELDS}, inputs=inputs, lines_per_partition=lines_per_partition)
    if before is not None:
        check_resumable(before, params)
    t_plan = time.perf_counter()
    try:
        parts, files = client.submit(scan, inputs, lines_per_partition, pure=False).result()
    except ClusterError as e:
        raise ClusterError(str(e)) from None
    plan_seconds = time.perf_counter() - t_plan
    if not parts:
        raise ClusterError("no text given: the input is empty")
    manifest = {"status": "running", "key": key, "normalize": normalize, "dtype": job["dtype"],
                "row_shape": job["row_shape"], "rows": sum(p["lines"] for p in parts), "params": params,
                "weights": {"path": os.path.abspath(weights), "fingerprint": job["fingerprint"]},
                "inputs": files, "partitions": parts}
    write_manifest(folder, manifest)
    say(f"encode: {manifest['rows']} lines of {len(files)} file{'s' if len(files) > 1 else ''} in {len(parts)} "
        f"partitions of at most {lines_per_partition} lines, planned in {plan_seconds:.1f}s")
    if on_start is not None:
        on_start(manifest["rows"], len(parts))
    t_run = time.perf_counter()
    records, stats, retried = run_partitions(client, parts, job, on_done)
    summary = summarize(records, stats, infos, time.perf_counter() - t0, retried)
    summary.update(plan_seconds=plan_seconds, run_seconds=time.perf_counter() - t_run, key=key, normalize=normalize,
                   shape=[manifest["rows"], *job["row_shape"]], manifest=os.path.join(folder, MANIFEST),
                   dashboard=client.dashboard_link)
    entries = [dict(r, start=p["start"], end=p["end"]) for r, p in zip(records, parts)]  # same bytes, maybe moved
    write_manifest(folder, dict(manifest, status="complete", partitions=entries, summary=summary))
    for path in glob.glob(os.path.join(folder, ".part-*.tmp")):   # left by a worker killed mid-write
        with contextlib.suppress(OSError):
            os.unlink(path)
    return summary
