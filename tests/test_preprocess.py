"""engine.text.preprocess against the real thing: the preprocessing SavedModel that Model Garden's
`export_tfhub_lib.export_preprocessing` builds from the uncased vocab (bert_en_uncased_preprocess/3).

Every comparison is id for id (`.tokenize` ragged values and splits, the root call, and
`.bert_pack_inputs`); any difference fails. The number of strings compared is reported at the end
of the module (`preprocess parity: ...` in pytest's output).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.text import preprocess
from engine.text.preprocess import Preprocessor
from engine.text import corpus as text_corpus
from weights.vocab import default_vocab_path, read_vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS: collections.Counter = collections.Counter()
DIFFERENCES: collections.Counter = collections.Counter()
TABLES = "tables: code points"


# -- fixtures and comparison helpers ---------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    strings = {k: v for k, v in COUNTS.items() if k != TABLES}
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(strings.items()))
    line = (f"preprocess parity: {sum(strings.values()):,} strings (or packed rows) compared with TF-Text "
            f"({parts}); {sum(DIFFERENCES.values())} differences")
    if COUNTS[TABLES]:
        line += f"; unicode tables re-derived from TF-Text for {COUNTS[TABLES]:,} code points"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(line)
    else:  # pragma: no cover
        print(line)


@pytest.fixture(scope="module")
def tf():
    import tensorflow
    import tensorflow_text  # noqa: F401  (registers the ops the SavedModel uses)
    return tensorflow


@pytest.fixture(scope="module")
def tf_prep(tf):
    from engine.tf import reference
    return tf.saved_model.load(reference.cached_preprocessing())


@pytest.fixture(scope="module")
def prep():
    return Preprocessor.from_vocab_file(default_vocab_path())


def _nested_arrays(nested):
    """Our [B, (words), (pieces)] lists -> (flat values, word splits, piece splits)."""
    values, word_splits, piece_splits = [], [0], [0]
    for row in nested:
        for word in row:
            values.extend(word)
            piece_splits.append(len(values))
        word_splits.append(len(piece_splits) - 1)
    return np.array(values, np.int64), np.array(word_splits), np.array(piece_splits)


def _bad_rows_tokenize(rt, ours) -> list[int]:
    values = rt.flat_values.numpy()
    word_splits, piece_splits = (s.numpy() for s in rt.nested_row_splits)
    mine = _nested_arrays(ours)
    if (len(values) == len(mine[0]) and np.array_equal(values, mine[0])
            and np.array_equal(word_splits, mine[1]) and np.array_equal(piece_splits, mine[2])):
        return []
    bad = []
    for i, row in enumerate(ours):
        a, b = word_splits[i], word_splits[i + 1]
        theirs = [values[piece_splits[j]:piece_splits[j + 1]].tolist() for j in range(a, b)]
        if theirs != row:
            bad.append(i)
    return bad or [-1]


def _bad_rows_dense(tf_out, ours) -> list[int]:
    bad = np.zeros(ours["input_word_ids"].shape[0], bool)
    for key in ("input_word_ids", "input_mask", "input_type_ids"):
        theirs = tf_out[key].numpy()
        assert theirs.shape == ours[key].shape, (key, theirs.shape, ours[key].shape)
        assert ours[key].dtype == np.int32
        bad |= np.any(theirs != ours[key], axis=1)
    return np.nonzero(bad)[0].tolist()


def compare_texts(tf, tf_prep, prep, texts, label, *, show=5, call=True) -> list[str]:
    """Tokenizes `texts` both ways and, with `call`, packs them with the root call (one batched TF
    call each); returns the differing texts."""
    texts = list(texts)
    COUNTS[label] += len(texts)
    if not texts:
        return []
    batch = tf.constant([t.encode("utf-8") for t in texts])
    bad = set(_bad_rows_tokenize(tf_prep.tokenize(batch), prep.tokenize(texts)))
    if call:
        bad |= set(_bad_rows_dense(tf_prep(batch), prep(texts)))
    if -1 in bad:
        bad = set(range(len(texts)))
    DIFFERENCES[label] += len(bad)
    failures = [texts[i] for i in sorted(bad)]
    for t in failures[:show]:
        theirs = tf_prep.tokenize(tf.constant([t.encode("utf-8")])).to_list()[0]
        print(f"DIFFERENCE {label}: {t[:80]!r}\n  tf-text: {theirs[:12]}\n  ours:    {prep.tokenize([t])[0][:12]}")
    return failures


def _ragged(tf, segment):
    """A flat [B, (tokens)] list of lists -> an int32 RaggedTensor."""
    lengths = [len(r) for r in segment]
    values = np.array([x for r in segment for x in r], np.int32)
    return tf.RaggedTensor.from_row_lengths(values, np.array(lengths, np.int64))


def compare_pack(tf, tf_prep, prep, segments, seq_length, label) -> list[int]:
    """bert_pack_inputs of flat segments both ways; returns the differing rows."""
    COUNTS[label] += len(segments[0])
    ours = prep.bert_pack_inputs(segments, seq_length=seq_length)
    theirs = tf_prep.bert_pack_inputs([_ragged(tf, s) for s in segments], seq_length=tf.constant(seq_length))
    bad = _bad_rows_dense(theirs, ours)
    DIFFERENCES[label] += len(bad)
    return bad


# -- the Unicode tables ----------------------------------------------------------------------------

def test_tables_match_tf_text():
    """The shipped engine/text/unicode_tables.npz is what TF-Text says about every code point today."""
    from engine.tf import make_unicode_tables
    fresh = make_unicode_tables.compute_tables()
    with np.load(preprocess.TABLES_PATH) as f:
        shipped = dict(f)
    assert make_unicode_tables.tables_equal(fresh, shipped) == []
    COUNTS[TABLES] += len(make_unicode_tables.scalar_values())


def test_every_code_point(tf, tf_prep, prep):
    """Each of the 1,112,064 scalar values as a word of its own (256 per line, space-separated);
    then glued between letters ("x" + c + "y") every one that the tables do anything to (folding,
    a combining class, a regex class other than CJK ideographs) and every 16th of the rest."""
    tables = preprocess._tables()
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    spaced = [" ".join(chr(c) for c in cps[i:i + 256]) for i in range(0, len(cps), 256)]
    assert compare_texts(tf, tf_prep, prep, spaced, "code points, spaced", call=False) == []
    special = set(tables.fold) | set(tables.ccc) | {c for c, s in tables.post.items() if len(s) != 3 or c < 0x2E80}
    picked = [c for i, c in enumerate(cps) if c in special or i % 16 == 0]
    glued = [" ".join(f"x{chr(c)}y" for c in picked[i:i + 128]) for i in range(0, len(picked), 128)]
    assert compare_texts(tf, tf_prep, prep, glued, "code points, between letters", call=False) == []


# -- real text -------------------------------------------------------------------------------------

def test_cldr_corpus(tf, tf_prep, prep):
    lines = text_corpus.cldr_lines()
    assert len(lines) > 5000
    assert compare_texts(tf, tf_prep, prep, lines, "corpus: CLDR (babel)") == []


def test_gettext_corpus(tf, tf_prep, prep):
    lines = text_corpus.gettext_lines()
    if not lines:
        pytest.skip(f"no gettext catalogs under {text_corpus.GETTEXT_ROOT} on this machine")
    assert compare_texts(tf, tf_prep, prep, lines, "corpus: gettext catalogs") == []


def test_corpus_pairs_and_lengths(tf, tf_prep, prep):
    """Pairs of real lines, packed at several lengths (round-robin trimming on real token counts),
    from ragged [B, (words), (pieces)] segments like the Hub's tokenize() gives."""
    lines = text_corpus.cldr_lines()[::7][:1200]
    a, b = lines[0::2], lines[1::2]
    a = a[:len(b)]
    ta, tb = tf_prep.tokenize(tf.constant([t.encode() for t in a])), tf_prep.tokenize(tf.constant([t.encode() for t in b]))
    oa, ob = prep.tokenize(a), prep.tokenize(b)
    for seq_length in (2, 3, 5, 16, 64, 128, 512):
        for segs_tf, segs_ours in (([ta], [oa]), ([ta, tb], [oa, ob]), ([tb, ta], [ob, oa])):
            COUNTS["corpus pairs: packed rows"] += len(a)
            theirs = tf_prep.bert_pack_inputs(segs_tf, seq_length=tf.constant(seq_length))
            ours = prep.bert_pack_inputs(segs_ours, seq_length=seq_length)
            bad = _bad_rows_dense(theirs, ours)
            DIFFERENCES["corpus pairs: packed rows"] += len(bad)
            assert bad == [], (seq_length, len(segs_ours), bad[:5])


# -- targeted cases --------------------------------------------------------------------------------

TARGETED = [
    # casing: full case folding and NFKC, not str.lower()
    "ß", "STRASSE Straße ẞ", "İstanbul", "ı I i İ", "ǅ ǈ ǋ ǲ", "ΟΔΟΣ ὈΔΥΣΣΕΎΣ", "ς σ Σ", "ŉ ǰ ΐ ΰ",
    "K Å Ω", "Ꭰ ꭰ Ᏸ ᏸ", "Ა Ბ ა", "ﬁ ﬂ ﬀ ﬃ ﬄ ﬅ ﬆ", "ﬓ ﬔ", "Ⅻ ⅻ ① ⑴ ⒜", "㎏ ㍱ ㋿", "™ ℃ № ℡",
    "ＡＢＣ１２３！？ ｈｅｌｌｏ", "ｶﾀｶﾅ ｶﾞｷﾞ", "𝐀𝐁𝐂 𝔸𝔹 𝒜", "x² x₂ ½ ⅞", "… ‥ ⁇ ‼",
    # combining marks, accents, ordering
    "e\u0301 é É \u0301", "a\u0308\u0301 a\u0301\u0308", "\u0301\u0301a", "ᾳ ᾼ ᾀ Ἀι", "a\u0345\u0301",
    "α\u0345\U0001D165", "α\U0001D165\u0345", "a\U0001D165\U0001D16D\u0345", "\U0001D15F\U0001D160 \U0001D1BB",
    "가\u302E\u302F a\u302F\u302E", "ᬓ\u1B44\u1B44 ꦏ\uA9C0", "a\u0897\u0301 a\u0301\u0897 \u0897",
    "\U00016FF0\U00016FF1 a\U00016FF1\u0301", "a\u0316\U0001D165\u0301\U0001D16D",
    "Zürich café naïve crème brûlée Ångström Øresund Łódź Dvořák", "Việt Nam Tiếng Việt",
    # control, format, zero-width, whitespace
    "a\u200bb a\u200cb a\u200db \ufeffabc co\u00adoperate", "a\u2060b \u180e \u2061", "\u200b", "\u00ad",
    "a\tb\nc\rd\x0be\x0cf", "a\u00a0b\u3000c\u2002d\u202fe", "a\u2028b\u2029c\u0085d\u1680e", "a\x00b", "\x00",
    "\x7f\x80\x9f", "\ufffd \ufffd\ufffd", "\ue000\uf8ff \U000F0000 \U0010FFFD", "\uffff\ufffe \U0010FFFF \U0001FFFE",
    "\U000E0041\U000E007F tags", "\ufe0f \U000E0100 a\ufe0fb", "\u061c\u200e\u200f\u202a\u202e",
    "", " ", "   ", "\t\n\r ", "\u00a0", "\u3000",
    # emoji
    "😀👍🏽", "👨‍👩‍👧 ❤️ 1️⃣ 🇩🇪 🏳️‍🌈", "I ❤ NY ✓ ✔ ☃", "🤖🤖🤖",
    # scripts
    "中文字符 汉字漢字", "𠀀𪜀𫝀𫠠𬺰 豈 丽", "ひらがな カタカナ 日本語の文章です。", "한국어 문장입니다", "\u1100\u1161\u11a8 ㄱㅏ",
    "ภาษาไทย สวัสดีครับ", "العَرَبِيَّة مرحبا بالعالم", "עִבְרִית שלום", "हिन्दी नमस्ते", "தமிழ் বাংলা", "བོད་སྐད་",
    "မြန်မာ ភាសាខ្មែរ", "ᠮᠣᠩᠭᠣᠯ", "አማርኛ", "Ελληνικά Русский Українська", "abcабвαβγ", "٣٤٥ १२३ ０１２",
    # punctuation and symbols
    "hello,world! don't e-mail $100 50% #tag @user a/b\\c", "¿Qué? ¡Hola! «quote» „Anführung“ ‹›",
    "『』「」、。・ 〜", "—–‐ • · § ¶ © ® ° ± × ÷ ^ ` ~ | < > { } [ ]", "<html><body>x</body></html>",
    "{\"json\": [1, 2.5e-3]}", "[CLS] [SEP] [MASK] [UNK] [PAD] [unused1]", "3.14159 1,000,000 1e10 0x1F",
    # lengths around the 100-byte word limit
    "a" * 99, "a" * 100, "a" * 101, "é" * 50, "é" * 51, "ä" * 60, "ß" * 34, "ß" * 51, "ﬃ" * 33, "ﬃ" * 34,
    "𒀀" * 25, "𒀀" * 26, "Ａ" * 100, "Ａ" * 101, "x" * 1000, "internationalization" * 5,
    "unbelievably antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    # long texts (truncation of the single segment)
    "word " * 300, "a, " * 200, "中" * 500,
]


def test_targeted_cases(tf, tf_prep, prep):
    assert compare_texts(tf, tf_prep, prep, TARGETED, "targeted") == []


def test_targeted_cases_one_by_one(tf, tf_prep, prep):
    """Each targeted case as a batch of its own (ragged shapes with one row)."""
    for t in TARGETED[::3]:
        assert compare_texts(tf, tf_prep, prep, [t], "targeted, one by one") == []


def test_empty_batch(tf, tf_prep, prep):
    out = prep([])
    theirs = tf_prep(tf.constant([], dtype=tf.string))
    for key in out:
        assert out[key].shape == tuple(theirs[key].shape) == (0, 128)
    assert prep.tokenize([]) == []


def test_packing_edges(tf, tf_prep, prep):
    """seq_length at and near the number of special tokens, empty rows, one and two segments."""
    a = [[], [5], [5, 6, 7], list(range(1000, 1200))]
    b = [[9, 9], [], list(range(2000, 2300)), [1]]
    for seq_length in (2, 3, 4, 5, 6, 7, 128, 513):
        assert compare_pack(tf, tf_prep, prep, [a], seq_length, "packing edges") == []
        assert compare_pack(tf, tf_prep, prep, [a, b], seq_length, "packing edges") == []
        assert compare_pack(tf, tf_prep, prep, [b, a], seq_length, "packing edges") == []


def test_round_robin_matches_trimmer():
    """Small exhaustive check of the allocation against TF-Text's RoundRobinTrimmer itself."""
    import tensorflow as tf
    import tensorflow_text as text
    lens = [(i, j) for i in range(8) for j in range(8)]
    for budget in range(0, 17):
        a = tf.ragged.constant([[1] * i for i, _ in lens], dtype=tf.int32, ragged_rank=1, row_splits_dtype=tf.int64)
        b = tf.ragged.constant([[2] * j for _, j in lens], dtype=tf.int32, ragged_rank=1, row_splits_dtype=tf.int64)
        ta, tb = text.RoundRobinTrimmer(budget).trim([a, b])
        theirs = list(zip(ta.row_lengths().numpy().tolist(), tb.row_lengths().numpy().tolist()))
        ours = [tuple(Preprocessor.round_robin_lengths(list(l), budget)) for l in lens]
        assert ours == theirs, budget
        (t1,) = text.RoundRobinTrimmer(budget).trim([a])
        assert [Preprocessor.round_robin_lengths([i], budget)[0] for i, _ in lens] == t1.row_lengths().numpy().tolist()


def test_special_tokens(tf_prep, prep):
    theirs = {k: int(v) for k, v in tf_prep.tokenize.get_special_tokens_dict().items()}
    assert prep.special_tokens == theirs
    assert theirs == {"vocab_size": 30522, "start_of_sequence_id": 101, "end_of_segment_id": 102,
                      "padding_id": 0, "mask_id": 103}
    assert prep.mask_id == 103 and prep.vocab_size == 30522 and prep.unknown_id == 100


def test_flat_and_ragged_segments_agree(prep):
    texts = ["Hello there, general Kenobi!", "", "ünïcödé ✓"]
    ragged = prep.tokenize(texts)
    flat = prep.tokenize_flat(texts)
    assert flat == [[p for w in row for p in w] for row in ragged]
    for seq_length in (4, 16):
        x = prep.bert_pack_inputs([ragged, ragged], seq_length=seq_length)
        y = prep.bert_pack_inputs([flat, flat], seq_length=seq_length)
        z = prep.bert_pack_inputs((np.array(flat, dtype=object), flat), seq_length=seq_length)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
            np.testing.assert_array_equal(x[k], z[k])
    np.testing.assert_array_equal(prep(texts)["input_word_ids"], prep.bert_pack_inputs([ragged])["input_word_ids"])
    assert prep("one text")["input_word_ids"].shape == (1, 128)


# -- fuzzing -----------------------------------------------------------------------------------------

def _interesting_chars() -> list[str]:
    tables = preprocess._tables()
    chars = set("aAzZ09 .,!?'\"-#$%&()*+/:;<=>@[\\]^_`{|}~\t\n\r\x0b\x0c\x00\x7f")
    chars.update("ßİıΣσςǅﬁﬃÅΩKⅫ①ＡＢ１ｶﾞ가각각ㄱㅏ中日本語豈丽𠀀ภาษาعَبْהִनमस्ते")
    chars.update("\u00a0\u3000\u2028\u2029\u0085\u1680\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\ufe0f\U000E0041")
    chars.update("\ufffd\ue000\U0010FFFD\uffff😀🏽\u20e3🇩")
    chars.update(chr(c) for c in range(0x300, 0x370))
    chars.update(chr(c) for c in tables.ccc)            # everything with a combining class
    chars.update(tables.reorder_triggers)               # what can make reordering matter
    chars.update(chr(c) for c in list(tables.fold)[::97])  # a spread of folded characters
    return sorted(chars)


_ANY_CHAR = st.characters(exclude_categories=("Cs",))
_TEXT = st.text(st.one_of(_ANY_CHAR, st.sampled_from(_interesting_chars())), max_size=40)
_FUZZ = settings(max_examples=500, derandomize=True, deadline=None, database=None, print_blob=False,
                 suppress_health_check=list(HealthCheck))


@_FUZZ
@given(batch=st.lists(_TEXT, min_size=1, max_size=6), seq_length=st.sampled_from([2, 3, 4, 7, 16, 128]))
def test_fuzz_text(tf, tf_prep, prep, batch, seq_length):
    """Arbitrary Unicode (biased towards marks, folding and splitting characters): tokenize, the
    root call, and pairs packed at a drawn seq_length."""
    assert compare_texts(tf, tf_prep, prep, batch, "fuzz: texts", show=3) == []
    pair = list(reversed(batch))
    tokens_tf = [tf_prep.tokenize(tf.constant([t.encode() for t in s])) for s in (batch, pair)]
    theirs = tf_prep.bert_pack_inputs(tokens_tf, seq_length=tf.constant(seq_length))
    ours = prep.bert_pack_inputs([prep.tokenize(batch), prep.tokenize(pair)], seq_length=seq_length)
    COUNTS["fuzz: packed pairs"] += len(batch)
    assert _bad_rows_dense(theirs, ours) == []


def test_random_bulk(tf, tf_prep, prep):
    """20,000 seeded random strings in one batch: a wider net than hypothesis' few hundred examples,
    for the price of one TF call (interesting characters, any scalar value, ASCII words)."""
    rng = np.random.default_rng(20240501)
    interesting = _interesting_chars()
    ascii_words = list("abcdefghijklmnopqrstuvwxyz ABCXYZ ")
    texts = []
    for _ in range(20000):
        chars = []
        for kind in rng.choice(3, size=int(rng.integers(0, 31)), p=[0.5, 0.25, 0.25]):
            if kind == 0:
                chars.append(interesting[int(rng.integers(len(interesting)))])
            elif kind == 1:
                cp = int(rng.integers(0x110000 - 0x800))
                chars.append(chr(cp + 0x800 if cp >= 0xD800 else cp))
            else:
                chars.append(ascii_words[int(rng.integers(len(ascii_words)))])
        texts.append("".join(chars))
    assert compare_texts(tf, tf_prep, prep, texts, "random bulk (seeded)") == []


_IDS = st.lists(st.integers(0, 30521), max_size=24)


@settings(max_examples=200, derandomize=True, deadline=None, database=None, print_blob=False,
          suppress_health_check=list(HealthCheck))
@given(data=st.data(), batch=st.integers(1, 5), two=st.booleans(), seq_length=st.integers(2, 40))
def test_fuzz_packing(tf, tf_prep, prep, data, batch, two, seq_length):
    segments = [data.draw(st.lists(_IDS, min_size=batch, max_size=batch)) for _ in range(1 + two)]
    assert compare_pack(tf, tf_prep, prep, segments, seq_length, "fuzz: packing rows") == []


# -- other vocabularies and lower_case=False ------------------------------------------------------------

def _tf_text_tokenizer(tf, tokens, lower_case):
    import tensorflow_text as text
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(tokens), tf.range(len(tokens), dtype=tf.int64)),
        default_value=-1)
    return text.BertTokenizer(table, lower_case=lower_case)


def test_cased_tokenization(tf):
    """lower_case=False: no folding, no accent stripping (TF-Text BertTokenizer(lower_case=False))."""
    tokens = read_vocab(default_vocab_path())
    ours = Preprocessor(tokens, lower_case=False)
    theirs = _tf_text_tokenizer(tf, tokens, lower_case=False)
    texts = TARGETED + text_corpus.cldr_lines()[::5]
    COUNTS["cased (lower_case=False)"] += len(texts)
    rt = theirs.tokenize(tf.constant([t.encode() for t in texts]))
    bad = _bad_rows_tokenize(rt, ours.tokenize(texts))
    DIFFERENCES["cased (lower_case=False)"] += len(bad)
    assert bad == []


def test_small_vocab_without_unk(tf):
    """A vocab with no [UNK]: TF looks "[UNK]" up and gets -1; so do we. Also greedy longest match."""
    tokens = ["[PAD]", "[CLS]", "[SEP]", "hel", "hello", "##lo", "##l", "##o", "w", "##orld", "!", "un", "##aff", "##able"]
    ours = Preprocessor(tokens)
    assert ours.unknown_id == -1 and "mask_id" not in ours.special_tokens and ours.mask_id is None
    theirs = _tf_text_tokenizer(tf, tokens, lower_case=True)
    texts = ["hello world!", "Hellooo", "helo", "unaffable", "xyz", "HELLO, WORLD!!", ""]
    COUNTS["small vocab"] += len(texts)
    rt = theirs.tokenize(tf.constant([t.encode() for t in texts]))
    assert _bad_rows_tokenize(rt, ours.tokenize(texts)) == []


def test_engine_never_imports_tensorflow():
    code = ("import sys, engine.text.preprocess as p; "
            "x = p.Preprocessor(['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'a'])(['a b']); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_text', 'tf_keras')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_lower_would_be_wrong():
    """Sanity of the premise: str.lower() is not ICU's NFKC_Casefold."""
    tables = preprocess._tables()
    assert "ß".lower() == "ß" and tables.fold[ord("ß")] == "ss"
    assert "ﬁ".lower() == "ﬁ" and tables.fold[ord("ﬁ")] == "fi"
    assert "\u00a0".lower() == "\u00a0" and tables.fold[0xA0] == " "
