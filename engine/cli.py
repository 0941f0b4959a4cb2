"""Command line: `python -m engine` (console script `talkheads`).

Placeholder of the foundation: with no arguments it builds (or reuses) the tiny reference model and
loads it with TensorFlow. The parity report replaces this (see README).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from weights import reference  # imports TensorFlow: only on this path, never from `import engine`
    import tensorflow as tf

    path = reference.cached("tiny", seed=0)
    model = tf.saved_model.load(path)
    print(f"tiny reference model: {path}, {len(model.variables)} variables")
    return 0
