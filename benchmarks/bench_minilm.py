"""Sentence embeddings with a real model: the engine against sentence-transformers (PyTorch, CPU) on
all-MiniLM-L6-v2, the same texts and the same threads, one run, side by side.

    .venv/bin/python -m benchmarks.bench_minilm [--paragraphs 512] [--reps 5] [--threads 1,2]

The texts: bench_encode's corpus (prose paragraphs of the Python Language Reference, 40-1500
characters), truncated at the model's 256 tokens by both. Each side encodes all of them per
repetition, batches of 32 in order of length (what SentenceTransformer.encode does), tokenization
included, after one warm-up batch: the engine by engine.load(h5, fast=True, threads=T).embed (the
file's pooling: mean over the mask, L2-normalized) on its own preprocessor's ids with padding
skipped; sentence-transformers by benchmarks/hf_peer.py --time in the peer's venv
(torch.set_num_threads(T), eager attention as loaded by default). The two sides' vectors are
compared (the smallest cosine). Writes benchmarks/results/minilm_<host>.json. A benchmark, never a
test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.bench_encode import REPO, RESULTS, corpus, machine

PEER_PYTHON = os.path.join(REPO, ".venv-peer", "bin", "python")


def engine_times(h5: str, texts: list[str], threads: int, reps: int, batch: int = 32) -> tuple[list[float], np.ndarray]:
    import engine
    from engine.text.preprocess import Preprocessor
    enc = engine.load(h5, fast=True, threads=threads)
    prep = Preprocessor.from_weights(enc)
    limit = enc.config.max_seq_length
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))       # longest first, as ST does

    def run():
        out = np.empty((len(texts), enc.config.hidden_size), np.float32)
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            ids = prep.tokenize_flat([texts[i] for i in idx])
            width = min(limit, max(len(t) for t in ids) + 2)
            out[idx] = engine.to_numpy(enc.embed(prep([texts[i] for i in idx], seq_length=width), skip_padding=True))
        return out

    run()                                                                   # warm-up (kernels, buffers)
    times, vectors = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        vectors = run()
        times.append(time.perf_counter() - t0)
    return times, vectors


def peer_times(folder: str, src: str, n: int, threads: int, reps: int, vectors_out: str) -> dict:
    cmd = [PEER_PYTHON, os.path.join(REPO, "benchmarks", "hf_peer.py"), "--time", "--model", folder, "--texts", src,
           "--n", str(n), "--reps", str(reps), "--threads", str(threads), "--batch-size", "32",
           "--save", vectors_out]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the peer failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paragraphs", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    args = parser.parse_args(argv)
    if not os.access(PEER_PYTHON, os.X_OK):
        raise SystemExit("bench_minilm: the peer's venv is missing: run `bash scripts/setup_peer.sh`")
    from engine.tools.real_models import real_model_folder
    from weights.hf_import import import_hf
    folder = real_model_folder("minilm")
    tmp = os.path.join(RESULTS, "tmp")
    os.makedirs(tmp, exist_ok=True)
    h5 = import_hf(folder, os.path.join(tmp, "minilm.h5"), force=True)
    texts = corpus(args.paragraphs)
    src = os.path.join(tmp, "minilm_corpus.txt")
    with open(src, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in texts))
    info = machine()
    results = {}
    for threads in (int(t) for t in args.threads.split(",")):
        peer_vectors = os.path.join(tmp, f"minilm_st_{threads}.npy")
        peer = peer_times(folder, src, len(texts), threads, args.reps, peer_vectors)
        ours, vectors = engine_times(h5, texts, threads, args.reps)
        theirs = np.load(peer_vectors)
        cos = np.sum(vectors * theirs, axis=1)
        row = {"engine_median_s": statistics.median(ours), "engine_times_s": ours,
               "sentence_transformers_median_s": peer["median_s"], "sentence_transformers_times_s": peer["times_s"],
               "engine_texts_per_s": len(texts) / statistics.median(ours),
               "sentence_transformers_texts_per_s": len(texts) / peer["median_s"],
               "speedup": peer["median_s"] / statistics.median(ours), "min_cosine": float(cos.min()),
               "max_abs_diff": float(np.abs(vectors - theirs).max())}
        results[str(threads)] = row
        print(f"{threads} thread(s): engine {row['engine_texts_per_s']:.1f} texts/s, sentence-transformers "
              f"{row['sentence_transformers_texts_per_s']:.1f} texts/s ({row['speedup']:.2f}x); min cosine "
              f"{row['min_cosine']:.7f}", flush=True)
    info["loadavg_end"] = os.getloadavg()
    report = {"machine": info, "texts": len(texts), "reps": args.reps, "model": "all-MiniLM-L6-v2 (import-hf)",
              "peer_versions": peer.get("versions"), "results": results,
              "command": "python -m benchmarks.bench_minilm " + " ".join(argv or sys.argv[1:])}
    path = os.path.join(RESULTS, f"minilm_{platform.node() or 'host'}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
