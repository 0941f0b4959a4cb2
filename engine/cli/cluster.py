"""`encode --cluster`: the same encode on Dask distributed workers (engine/cluster), into a folder of
.npy shards and a manifest (engine/embeddings.py). Called by engine/cli/text.py's cmd_encode when
--cluster is given."""

from __future__ import annotations

import contextlib
import os
import time

from engine.cli.common import EXIT_OK, CliError, say


def check_options(args) -> None:
    """The options that --cluster takes or refuses, checked before any worker starts."""
    if args.texts:
        raise CliError("--cluster reads --input files (every worker opens them): TEXT arguments are for the "
                       "single-process encode")
    if not args.input:
        raise CliError("--cluster needs --input FILE [FILE ...]")
    if args.sequence and args.seq_length is None:
        raise CliError("--sequence with --cluster needs --seq-length: every shard's row width must be known "
                       "before the partitions run")
    for option, value in (("--partition-lines", args.partition_lines), ("--threads-per-worker", args.threads_per_worker)):
        if value < 1:
            raise CliError(f"{option} must be at least 1, got {value}")
    if args.cluster.startswith("local"):   # the workers are this machine: say so before starting them
        for path in args.input:
            if not os.path.isfile(path):
                raise CliError(f"--input {path}: {'is a folder, not a file' if os.path.isdir(path) else 'no such file'}")
        if not os.path.isfile(args.weights):
            raise CliError(f"--weights {args.weights}: no such file")


def cmd_encode_cluster(args) -> int:
    from engine.cluster import run
    from engine.tools.progress import Progress
    check_options(args)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(run.connect(args.cluster, args.threads_per_worker))
        workers = len(client.scheduler_info()["workers"])
        say(f"encode: cluster {args.cluster}: {workers} workers, dashboard {client.dashboard_link}")
        bar = None

        def on_start(rows, partitions):
            nonlocal bar
            bar = stack.enter_context(Progress(rows, "encode", bytes_unit=False))

        def on_done(result):
            stats = result["stats"]
            bar.update(result["record"]["rows"], f"partition {stats['index']}"
                       + (" intact" if stats["skipped"] else f" on {stats['worker']}"))

        try:
            summary = run.encode(client, args.weights, args.input, args.output,
                                 lines_per_partition=args.partition_lines, threads_per_worker=args.threads_per_worker,
                                 sequence=args.sequence, pooling=args.pooling, normalize=args.normalize,
                                 seq_length=args.seq_length, max_tokens=args.max_tokens, max_rows=args.batch_size,
                                 readable=args.readable, backend=args.backend, resume=args.resume, force=args.force,
                                 say=say, on_start=on_start, on_done=on_done)
        except KeyboardInterrupt:
            say(f"encode: interrupted; the partitions written so far stay in {args.output}: continue with --resume")
            raise
    seconds = time.perf_counter() - t0
    if summary["truncated"]:
        say(f"encode: warning: {summary['truncated']} text{'s were' if summary['truncated'] > 1 else ' was'} "
            f"longer than the sequence length and truncated (the first at line {summary['first_truncated_line']} "
            f"of its file); --seq-length sets the length, at most the model's positions")
    intact = f"{summary['skipped']} intact from before, " if summary["skipped"] else ""
    say(f"encode: wrote {tuple(summary['shape'])} {summary['key']}{', L2-normalized' if summary['normalize'] else ''} "
        f"to {args.output}/: {summary['rows']} rows, {summary['partitions']} partition"
        f"{'s' if summary['partitions'] > 1 else ''} ({intact}"
        f"{summary['retried']} retried) on {summary['workers']} workers in {seconds:.1f}s "
        f"({summary['rows_encoded'] / max(seconds, 1e-9):.1f} rows/s, cluster start and model loading included)")
    return EXIT_OK
