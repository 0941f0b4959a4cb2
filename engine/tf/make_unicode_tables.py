"""Generates `engine/text/unicode_tables.npz`, the Unicode data of the TensorFlow-free preprocessor, FROM TF-Text.

TF-Text's `BertTokenizer(lower_case=True)` (what `bert_en_uncased_preprocess/3` runs) normalizes with
ICU and splits with RE2, each with its own Unicode version (neither is Python's `unicodedata`).
Rather than re-deriving ICU or RE2 behaviour from Python's tables, this script asks the very ops
that the SavedModel runs, one code point at a time (all 1,112,064 scalar values, batched):

- `fold[c]`: `normalize_utf8(case_fold_utf8(c), "NFD")`, i.e. ICU NFKC_Casefold then ICU NFD
  (stored where it is not the identity: casing, compatibility and canonical decompositions,
  Hangul syllables, default-ignorables mapped to nothing).
- `ccc[c]`: the canonical combining class ICU reorders with, up to order (the value is 2*ccc, or
  an odd number between two known classes for a class Python's tables lack), measured by how ICU's
  NFD reorders "a" + x + y against one reference mark of each class.
- RE2 classes, as the BasicTokenizer's regexes see them: `\\p{Mn}` (removed after NFD),
  `\\p{Cc}|\\p{Cf}` (become spaces), `\\s` (split, dropped) and the kept delimiters (ASCII and
  `\\p{P}` punctuation, CJK ideograph blocks: each becomes a token of its own).

Why this is enough: ICU applies NFKC_Casefold by appending each input character's full mapping to a
buffer that is canonically reordered (and then recomposed, which the NFD that follows undoes), so
NFD(NFKC_Casefold(s)) == canonical_reorder(concat(fold[c] for c in s)); `engine.text.preprocess` does
exactly that, and tests/test_preprocess.py checks it on real text, targeted cases and fuzzing.

    python -m engine.tf.make_unicode_tables [--out engine/text/unicode_tables.npz] [--check]

Needs TensorFlow and tensorflow-text (like `engine.tf.reference`); the engine only reads the file.
"""

from __future__ import annotations

import argparse
import os
import sys
import unicodedata

import numpy as np

TABLES_FORMAT_VERSION = 1
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "text", "unicode_tables.npz")
_LOW_MARK = "\u0334"   # ccc 1, the lowest non-zero class
_HIGH_MARK = "\u0345"  # ccc 240, the highest class


def scalar_values() -> np.ndarray:
    """Every Unicode scalar value (code points less the surrogates), as int32."""
    cps = np.arange(0x110000, dtype=np.int32)
    return cps[(cps < 0xD800) | (cps > 0xDFFF)]


def _ranges(cps: np.ndarray) -> np.ndarray:
    """Sorted code points -> [n, 2] inclusive ranges."""
    cps = np.asarray(cps, dtype=np.int64)
    if cps.size == 0:
        return np.zeros((0, 2), np.int32)
    breaks = np.nonzero(np.diff(cps) != 1)[0]
    starts = np.concatenate([[cps[0]], cps[breaks + 1]])
    ends = np.concatenate([cps[breaks], [cps[-1]]])
    return np.stack([starts, ends], axis=1).astype(np.int32)


def _tf_strings(strs):
    import tensorflow as tf
    return tf.constant([s.encode("utf-8") for s in strs])


def _decode(t) -> list[str]:
    return [b.decode("utf-8") for b in t.numpy()]


def _tf_fold(t):
    import tensorflow_text as text
    return text.normalize_utf8(text.case_fold_utf8(t), "NFD")


def tf_fold(strs: list[str]) -> list[str]:
    """What BertTokenizer(lower_case=True) does before its regexes: NFKC_Casefold, then NFD."""
    return _decode(_tf_fold(_tf_strings(strs)))


def _tf_nfd(t):
    import tensorflow_text as text
    return text.normalize_utf8(t, "NFD")


def _derive_ccc(marks) -> dict[int, int]:
    """ICU's canonical combining class of each of `marks` (a tensor of one-character strings, all
    fixed points of NFD), as 2*ccc (or odd: between two classes); those with class 0 are left out."""
    import tensorflow as tf
    join = tf.strings.join
    # Screening: x has ccc > 0 iff ICU moves it before U+0345 (0 < ccc < 240) or after U+0334 (ccc > 1).
    moved = (tf.equal(_tf_nfd(join(["a" + _HIGH_MARK, marks])), join(["a", marks, _HIGH_MARK]))
             | tf.equal(_tf_nfd(join(["a", marks, _LOW_MARK])), join(["a" + _LOW_MARK, marks]))).numpy()
    nonzero = [b.decode("utf-8") for b in marks.numpy()[moved]]
    # One reference mark per class that Python knows (classes are stable across Unicode versions).
    refs: dict[int, str] = {}
    for cp in range(0x110000):
        v = unicodedata.combining(chr(cp))
        if v and v not in refs and unicodedata.normalize("NFD", chr(cp)) == chr(cp):
            refs[v] = chr(cp)
    values = sorted(refs)
    pairs_xr = tf_nfd(["a" + x + refs[v] for x in nonzero for v in values])
    pairs_rx = tf_nfd(["a" + refs[v] + x for x in nonzero for v in values])
    out: dict[int, int] = {}
    for i, x in enumerate(nonzero):
        less, greater, equal = [], [], []
        for j, v in enumerate(values):
            r = refs[v]
            if x == r:
                equal.append(v)
                continue
            k = i * len(values) + j
            if pairs_xr[k] == "a" + r + x:      # ICU put r first: ccc(r) < ccc(x)
                less.append(v)
            elif pairs_rx[k] == "a" + x + r:    # ICU put x first: ccc(x) < ccc(r)
                greater.append(v)
            else:
                equal.append(v)
        if len(equal) > 1 or (less and greater and max(less) > min(greater)):
            raise RuntimeError(f"inconsistent ICU ordering for U+{ord(x):04X}: {less} {equal} {greater}")
        if equal:
            out[ord(x)] = 2 * equal[0]
        else:
            out[ord(x)] = 2 * max(less) + 1 if less else 1
    return out


def tf_nfd(strs: list[str]) -> list[str]:
    return _decode(_tf_nfd(_tf_strings(strs)))


def compute_tables() -> dict[str, np.ndarray]:
    """Asks TF-Text about every scalar value; returns the arrays that go into the .npz file."""
    import tensorflow as tf
    import tensorflow_text as text
    from tensorflow_text.python.ops import bert_tokenizer

    cps = scalar_values()
    chars = tf.strings.unicode_encode(tf.reshape(tf.constant(cps), [-1, 1]), "UTF-8")
    folded = _tf_fold(chars)
    changed = ~tf.equal(folded, chars).numpy()
    keys = cps[changed]
    outs = [b.decode("utf-8") for b in folded.numpy()[changed]]
    offsets = np.cumsum([0] + [len(o) for o in outs])
    values = [ord(c) for o in outs for c in o]
    # The folding must be idempotent per character, or one table lookup would not be enough.
    produced = sorted(set(values))
    refolded = tf_fold([chr(c) for c in produced])
    bad = [c for c, o in zip(produced, refolded) if o != chr(c)]
    if bad:
        raise RuntimeError(f"case folding is not idempotent on {[hex(c) for c in bad[:10]]}")
    # Combining classes of what folding produces: the unchanged characters and the outputs.
    codomain = np.union1d(cps[~changed], np.array(produced, np.int32))
    ccc = _derive_ccc(tf.strings.unicode_encode(tf.reshape(tf.constant(codomain), [-1, 1]), "UTF-8"))

    whitespace_pattern = bert_tokenizer._DELIM_REGEX[0]
    if not whitespace_pattern.endswith("+"):
        raise RuntimeError(f"unexpected BasicTokenizer whitespace regex {whitespace_pattern!r}")
    classes = {
        "mn": r"\p{Mn}",
        "cc_cf": r"\p{Cc}|\p{Cf}",
        "space": whitespace_pattern[:-1],
        "keep": bert_tokenizer._KEEP_DELIM_NO_WHITESPACE_PATTERN,
    }
    tables = {
        "format_version": np.array(TABLES_FORMAT_VERSION, np.int32),
        "fold_keys": keys.astype(np.int32),
        "fold_offsets": offsets.astype(np.int32),
        "fold_values": np.array(values, np.int32),
        "ccc_keys": np.array(sorted(ccc), np.int32),
        "ccc_values": np.array([ccc[k] for k in sorted(ccc)], np.int16),
        "versions": np.array([f"tensorflow {tf.__version__}", f"tensorflow-text {text.__version__}"]),
    }
    for name, pattern in classes.items():
        tables[f"{name}_ranges"] = _ranges(cps[tf.strings.regex_full_match(chars, pattern).numpy()])
    return tables


def tables_equal(a: dict, b: dict) -> list[str]:
    """Names of the arrays that differ (versions excluded)."""
    names = sorted((set(a) | set(b)) - {"versions"})
    return [n for n in names if n not in a or n not in b or not np.array_equal(np.asarray(a[n]), np.asarray(b[n]))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.tf.make_unicode_tables", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    tables = compute_tables()
    if args.check:
        with np.load(args.out) as f:
            diff = tables_equal(tables, dict(f))
        print("tables match TF-Text" if not diff else f"tables differ from TF-Text: {diff}")
        return 1 if diff else 0
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **tables)
    os.replace(tmp, args.out)
    sizes = ", ".join(f"{k} {v.shape}" for k, v in tables.items() if v.ndim)
    print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes): {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
