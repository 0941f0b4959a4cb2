"""Throughput of engine.text.preprocess against TF-Text's preprocessing SavedModel, on the same real text.

    .venv/bin/python -m benchmarks.bench_preprocess [--repeats 5] [--batch 128] [--out PATH]

The corpus is engine.text.corpus (CLDR names from babel, and the machine's gettext catalogs when it
has them), fed in batches of --batch texts. For each side, median over --repeats runs of the whole
corpus, in texts per second:
- "call": the root call (tokenize + pack to seq_length 128), what a user runs on raw text;
- "tokenize": `.tokenize` alone (ours returns nested lists, TF a RaggedTensor kept as a tensor).
Ours is timed "cold" (a new preprocessor before every run, made outside the timing: its per-word
WordPiece memo empty, as for text never seen) and "warm" (memo kept from the previous run). TF runs
eagerly on the loaded SavedModel's concrete functions, after one warm-up batch. Both check the ids agree on the corpus first.
Writes benchmarks/results/preprocess_<host>.json (machine, versions, date) unless --out says otherwise.
Not a test: the numbers depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _batches(texts, size):
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def _median_rate(fn, n_texts, repeats, before=None):
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {"texts_per_s": n_texts / med, "median_s": med, "runs_s": [round(t, 4) for t in times]}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128, help="texts per call (default 128)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/preprocess_<host>.json)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be positive")

    import tensorflow as tf
    import tensorflow_text

    from engine.text.preprocess import Preprocessor
    from engine.tf import reference
    from engine.text import corpus as text_corpus
    from weights.vocab import default_vocab_path

    cldr, catalogs = text_corpus.cldr_lines(), text_corpus.gettext_lines()
    texts = cldr + catalogs
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {len(texts):,} texts ({len(cldr):,} CLDR, {len(catalogs):,} gettext), {n_bytes / 1e6:.2f} MB UTF-8")

    prep = Preprocessor.from_vocab_file(default_vocab_path())
    tf_prep = tf.saved_model.load(reference.cached_preprocessing())
    ours_batches = _batches(texts, args.batch)
    tf_batches = [tf.constant([t.encode("utf-8") for t in b]) for b in ours_batches]

    # The numbers only mean something if both sides produce the same ids.
    tf_prep(tf_batches[0])
    mismatched = 0
    for b, tb in zip(ours_batches, tf_batches):
        theirs, ours = tf_prep(tb), prep(b)
        mismatched += int(sum(np.any(theirs[k].numpy() != ours[k], axis=1).sum() for k in ours))
    print(f"ids agree with TF-Text on every text: {mismatched == 0} ({mismatched} rows differ)")

    def tf_call():
        for tb in tf_batches:
            out = tf_prep(tb)
        out["input_word_ids"].numpy()

    def tf_tokenize():
        for tb in tf_batches:
            out = tf_prep.tokenize(tb)
        out.flat_values.numpy()

    ours = [prep]   # the preprocessor timed; "cold" runs get a new one, whose word memo is empty

    def ours_call():
        for b in ours_batches:
            ours[0](b)

    def ours_tokenize():
        for b in ours_batches:
            ours[0].tokenize(b)

    def clear_memo():
        ours[0] = Preprocessor.from_vocab_file(default_vocab_path())

    results = {}
    for name, fn, before in (("tf-text savedmodel: call", tf_call, None),
                             ("tf-text savedmodel: tokenize", tf_tokenize, None),
                             ("ours cold: call", ours_call, clear_memo),
                             ("ours cold: tokenize", ours_tokenize, clear_memo),
                             ("ours warm: call", ours_call, None),
                             ("ours warm: tokenize", ours_tokenize, None)):
        if before is None and name.startswith("ours warm"):
            ours_tokenize()  # fill the memo
        results[name] = r = _median_rate(fn, len(texts), args.repeats, before)
        print(f"{name:32s} {r['texts_per_s']:10,.0f} texts/s   (median {r['median_s']:.3f}s of {args.repeats})")
    for kind in ("call", "tokenize"):
        base = results[f"tf-text savedmodel: {kind}"]["texts_per_s"]
        for temp in ("cold", "warm"):
            ratio = results[f"ours {temp}: {kind}"]["texts_per_s"] / base
            print(f"ours {temp} / tf-text, {kind}: {ratio:.2f}x")

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "tensorflow": tf.__version__, "tensorflow_text": tensorflow_text.__version__,
        "corpus_texts": len(texts), "corpus_cldr": len(cldr), "corpus_gettext": len(catalogs),
        "corpus_bytes": n_bytes, "batch": args.batch, "repeats": args.repeats, "seq_length": 128,
        "ids_agree": mismatched == 0,
    }
    out = args.out or os.path.join(RESULTS, f"preprocess_{platform.node() or 'host'}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {out}")
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
