"""engine.text.preprocess's own contract, no TensorFlow: what it accepts (str, bytes, arrays), and
one clear error naming the argument for everything else (texts, seq_length, segments, vocab)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from engine.text.preprocess import Preprocessor
from weights.vocab import default_vocab_path, read_vocab


@pytest.fixture(scope="module")
def prep():
    return Preprocessor.from_vocab_file(default_vocab_path())


def test_bytes_input(prep):
    text = "Zürich ✓"
    assert prep.tokenize([text.encode("utf-8")]) == prep.tokenize([text])
    np.testing.assert_array_equal(prep(text.encode("utf-8"))["input_word_ids"], prep([text])["input_word_ids"])
    assert prep.tokenize(np.array([text, "x"])) == prep.tokenize([text, "x"])


@pytest.mark.parametrize("texts, error, match", [
    ([b"caf\xe9"], ValueError, r"texts\[0\] is not valid UTF-8"),
    (["ok", b"\xff\xfe"], ValueError, r"texts\[1\] is not valid UTF-8"),
    (["ok", "lone \ud800 surrogate"], ValueError, r"texts\[1\] is not valid Unicode"),
    ([None], TypeError, r"texts\[0\] must be a str"),
    (["a", 3], TypeError, r"texts\[1\] must be a str"),
    ([["nested"]], TypeError, r"texts\[0\] must be a str"),
    (42, TypeError, r"texts must be a str or a list of str"),
    ({"a": 1}, TypeError, r"texts must be a str or a list of str"),
    (np.array([["a"]]), ValueError, r"texts must be one-dimensional"),
])
def test_bad_texts(prep, texts, error, match):
    with pytest.raises(error, match=match):
        prep.tokenize(texts)
    with pytest.raises(error, match=match):
        prep(texts)


@pytest.mark.parametrize("seq_length, error, match", [
    (1, ValueError, "seq_length must be at least 2"),
    (0, ValueError, "seq_length must be at least 2"),
    (-5, ValueError, "seq_length must be at least 2"),
    (2.5, TypeError, "seq_length must be an integer"),
    ("128", TypeError, "seq_length must be an integer"),
    (True, TypeError, "seq_length must be an integer"),
])
def test_bad_seq_length(prep, seq_length, error, match):
    with pytest.raises(error, match=match):
        prep(["x"], seq_length=seq_length)
    with pytest.raises(error, match=match):
        prep.bert_pack_inputs([[[1]]], seq_length=seq_length)


def test_max_seq_length():
    tokens = read_vocab(default_vocab_path())
    prep = Preprocessor(tokens, max_seq_length=512)
    assert prep(["x"], seq_length=512)["input_word_ids"].shape == (1, 512)
    with pytest.raises(ValueError, match="seq_length 513 exceeds the model's 512 positions"):
        prep(["x"], seq_length=513)
    with pytest.raises(ValueError, match="exceeds"):
        prep.bert_pack_inputs([[[1]]], seq_length=1000)
    with pytest.raises(ValueError, match="default_seq_length 128 exceeds"):
        Preprocessor(tokens, max_seq_length=64)
    assert Preprocessor(tokens, max_seq_length=64, default_seq_length=64)(["x"])["input_word_ids"].shape == (1, 64)


@pytest.mark.parametrize("segments, error, match", [
    ([], ValueError, "packs one or two segments, got 0"),
    ([[[1]], [[2]], [[3]]], ValueError, "packs one or two segments, got 3"),
    ("text", TypeError, "segments must be a list"),
    ([[[1]], [[2], [3]]], ValueError, "different batch sizes"),
    ([[[[1]]], [[2]]], ValueError, "same rank"),
    ([[[1], [[2]]]], ValueError, "mixes ragged"),
    ([[["a"]]], TypeError, "integer token ids"),
    ([[[1.5]]], TypeError, "integer token ids"),
    ([[5]], TypeError, r"segments\[0\]\[0\] must be a list"),
    ([[[2**40]]], ValueError, "outside int32"),
    (np.zeros((2, 3), np.int32), TypeError, "wrap a"),
])
def test_bad_segments(prep, segments, error, match):
    with pytest.raises(error, match=match):
        prep.bert_pack_inputs(segments)


def test_bad_vocab():
    with pytest.raises(ValueError, match="duplicates"):
        Preprocessor(["[PAD]", "a", "a"])
    with pytest.raises(ValueError, match="empty"):
        Preprocessor([])
    with pytest.raises(TypeError, match=r"vocab_tokens\[1\] must be a str"):
        Preprocessor(["a", 1])
    with pytest.raises(TypeError, match="list of strings"):
        Preprocessor("vocab.txt")
    with pytest.raises(ValueError, match="lacks"):
        Preprocessor(["a", "b"])(["a"])


def test_from_weights():
    tokens = read_vocab(default_vocab_path())
    loaded = types.SimpleNamespace(vocab=tokens, config=types.SimpleNamespace(do_lower_case=True, max_position_embeddings=512))
    prep = Preprocessor.from_weights(loaded)
    assert prep.lower_case and prep.max_seq_length == 512 and prep.special_tokens["vocab_size"] == 30522
    cased = Preprocessor.from_weights(types.SimpleNamespace(vocab=tokens, config=types.SimpleNamespace(do_lower_case=False)))
    assert not cased.lower_case and cased.max_seq_length is None
    assert cased.tokenize(["Hello"]) != prep.tokenize(["Hello"])
    with pytest.raises(ValueError, match="no vocab"):
        Preprocessor.from_weights(types.SimpleNamespace(vocab=None, config=loaded.config))


