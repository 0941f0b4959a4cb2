"""TensorFlow's own pipeline for the end-to-end encode benchmark: the TF-Text preprocessing SavedModel
(bert_en_uncased_preprocess/3, as Model Garden exports it) and the encoder SavedModel, text in,
pooled embeddings out, as the Hub snippets use them. Run as a whole process by bench_encode.py.

    python -m benchmarks.tf_encode --savedmodel DIR --preprocess DIR --input corpus.txt --output out.npy
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--savedmodel", required=True, help="the encoder SavedModel")
    parser.add_argument("--preprocess", required=True, help="the preprocessing SavedModel")
    parser.add_argument("--input", required=True, help="one text per line, UTF-8")
    parser.add_argument("--output", required=True, help="the .npy file of pooled_output rows")
    parser.add_argument("--batch", type=int, default=32, help="texts per call (default 32, as the tutorials)")
    parser.add_argument("--seq-length", type=int, default=128, help="the preprocessor's seq_length (default 128)")
    args = parser.parse_args(argv)
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the preprocessing ops)

    preprocess = tf.saved_model.load(args.preprocess)
    encoder = tf.saved_model.load(args.savedmodel)
    with open(args.input, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f]
    rows = []
    for i in range(0, len(texts), args.batch):
        tokens = preprocess.tokenize(tf.constant(texts[i:i + args.batch]))
        packed = preprocess.bert_pack_inputs([tokens], seq_length=args.seq_length)
        rows.append(encoder(packed)["pooled_output"].numpy())
    np.save(args.output, np.concatenate(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
