"""Text to encoder inputs without TensorFlow: the ids of TF Hub's `bert_en_uncased_preprocess/3`.

    from engine.text.preprocess import Preprocessor
    prep = Preprocessor.from_vocab_file("vocab.txt")                 # or Preprocessor(tokens), .from_weights(w)
    inputs = prep(["Hello world!", "Zürich"], seq_length=128)       # input_word_ids, input_mask, input_type_ids
    a, b = prep.tokenize(["How old?"]), prep.tokenize(["Ten."])     # [B, (words), (pieces)] nested lists
    pair = prep.bert_pack_inputs([a, b], seq_length=64)             # [CLS] a [SEP] b [SEP]
    prep.special_tokens, prep.mask_id

It reproduces, id for id, what Model Garden's `export_tfhub_lib.export_preprocessing` exports:
`official.nlp.modeling.layers.BertTokenizer` (TF-Text's `BertTokenizer(lower_case=True)` over a
vocab lookup table) followed by `BertPackInputs` (round-robin trimming, `combine_segments`,
`pad_model_inputs`):

1. ICU NFKC_Casefold, then ICU NFD, then RE2 `\\p{Mn}` removed (accents);
2. RE2 `\\p{Cc}|\\p{Cf}` become spaces; split on RE2 `\\s` (ASCII whitespace only: U+00A0 and
   U+3000 are turned into spaces by NFKC, while U+2028 or U+1680 stay inside a word);
3. ASCII and `\\p{P}` punctuation and the CJK ideograph blocks become words of their own;
4. WordPiece, greedy longest-match-first with `##` continuations; a word of more than 100 UTF-8
   bytes, or one that cannot be covered completely, is one `[UNK]`.

The Unicode data (ICU and RE2 are at other Unicode versions than Python's `unicodedata`) comes from
`unicode_tables.npz` beside this file, generated from TF-Text itself by
`python -m engine.tf.make_unicode_tables`. ICU folds each character to its full mapping and
canonically reorders the result; the table holds each character's mapping, and the rare strings in
which reordering could change the outcome (two surviving marks with a combining class, such as
U+1D165 or a Mc virama) take a slower exact path.

Inputs: `str`, or `bytes` holding valid UTF-8 (decoded as TF would read them). Invalid UTF-8, a
`str` with lone surrogates (which cannot be UTF-8) or any other item type is refused with a
ValueError or TypeError naming the item: TF-Text would silently tokenize replacement characters.

NumPy only; never TensorFlow.
"""

from __future__ import annotations

import itertools
import numbers
import os
from typing import Any, Iterable, Sequence

import numpy as np

from weights.vocab import read_vocab

TABLES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unicode_tables.npz")
TABLES_FORMAT_VERSION = 1
DEFAULT_SEQ_LENGTH = 128           # export_preprocessing(default_seq_length=128) of the Hub model
MAX_BYTES_PER_WORD = 100           # text.BertTokenizer's default max_bytes_per_word
SUFFIX_INDICATOR = "##"
UNKNOWN_TOKEN = "[UNK]"
SPECIAL_TOKENS = {"start_of_sequence_id": "[CLS]", "end_of_segment_id": "[SEP]",
                  "padding_id": "[PAD]", "mask_id": "[MASK]"}
_MEMO_LIMIT = 1 << 20              # words whose wordpieces are remembered, per Preprocessor


class _UnicodeTables:
    """The per-character data of `unicode_tables.npz`, turned into `str.translate` tables."""

    def __init__(self, path: str = TABLES_PATH):
        try:
            with np.load(path) as f:
                data = {k: f[k] for k in f.files}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: regenerate it with `python -m engine.tf.make_unicode_tables`")
        if int(data["format_version"]) != TABLES_FORMAT_VERSION:
            raise ValueError(f"{path}: format version {int(data['format_version'])}, expected {TABLES_FORMAT_VERSION}")
        self.versions = [str(v) for v in data["versions"]]
        keys, offsets, values = (data[k].tolist() for k in ("fold_keys", "fold_offsets", "fold_values"))
        # NFKC_Casefold then NFD of each character, where it is not the character itself.
        self.fold = {k: "".join(map(chr, values[offsets[i]:offsets[i + 1]])) for i, k in enumerate(keys)}
        self.ccc = dict(zip(data["ccc_keys"].tolist(), data["ccc_values"].tolist()))
        mn, cc_cf, space, keep = (self._members(data[f"{n}_ranges"]) for n in ("mn", "cc_cf", "space", "keep"))
        # What the regexes after normalization do to one character: Mn goes, Cc/Cf/whitespace become
        # the separator " ", kept delimiters are padded with it so that they stand alone.
        post: dict[int, str] = {}
        for cp in keep:
            post[cp] = f" {chr(cp)} "
        for cp in itertools.chain(cc_cf, space):
            post[cp] = " "
        for cp in mn:
            post[cp] = ""
        self.post = post
        # Cased tokenization (lower_case=False) has no NFD and keeps the marks.
        self.cased = {cp: s for cp, s in post.items() if s != ""}
        # Uncased tokenization is post(fold(c)), character by character.
        folded_post = dict(post)
        for cp, out in self.fold.items():
            folded_post[cp] = "".join(post.get(ord(c), c) for c in out)
        self.folded_post = {cp: s for cp, s in folded_post.items() if s != chr(cp)}
        # Characters that survive the regexes and have a combining class: only where two of them meet
        # can ICU's canonical reordering change the tokens. Inputs that fold to one take the exact path.
        survivors = {cp for cp in self.ccc if post.get(cp, chr(cp)) != ""}
        self.reorder_triggers = frozenset(
            chr(cp) for cp in itertools.chain(survivors, self.fold)
            if cp in survivors or any(ord(c) in survivors for c in self.fold.get(cp, "")))

    @staticmethod
    def _members(ranges: np.ndarray) -> Iterable[int]:
        return itertools.chain.from_iterable(range(int(a), int(b) + 1) for a, b in ranges)


_TABLES: _UnicodeTables | None = None


def _tables() -> _UnicodeTables:
    global _TABLES
    if _TABLES is None:
        _TABLES = _UnicodeTables()
    return _TABLES


def _check_seq_length(seq_length: Any, max_seq_length: int | None, name: str = "seq_length") -> int:
    if isinstance(seq_length, (bool, np.bool_)) or not isinstance(seq_length, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(seq_length).__name__} {seq_length!r}")
    seq_length = int(seq_length)
    if seq_length < 2:
        raise ValueError(f"{name} must be at least 2 (room for [CLS] and [SEP]), got {seq_length}")
    if max_seq_length is not None and seq_length > max_seq_length:
        raise ValueError(f"{name} {seq_length} exceeds the model's {max_seq_length} positions (max_seq_length)")
    return seq_length


class Preprocessor:
    """BERT WordPiece preprocessing identical to `bert_en_uncased_preprocess/3` (see the module doc).

    Args:
      vocab_tokens: the WordPiece vocab, token i has id i (the lines of vocab.txt). Duplicates are
        refused, as TF's lookup table refuses them.
      lower_case: True for uncased models (NFKC_Casefold, NFD, accents stripped); False keeps the
        text as it is (TF-Text's BertTokenizer(lower_case=False) with no normalization_form).
      max_seq_length: optional, the model's number of positions: a larger seq_length is refused.
      default_seq_length: the seq_length of `__call__` and `bert_pack_inputs` when none is given.
    """

    def __init__(self, vocab_tokens: Sequence[str], lower_case: bool = True, *,
                 max_seq_length: int | None = None, default_seq_length: int = DEFAULT_SEQ_LENGTH):
        if isinstance(vocab_tokens, (str, bytes)) or not isinstance(vocab_tokens, Iterable):
            raise TypeError(f"vocab_tokens must be a list of strings, got {type(vocab_tokens).__name__}")
        tokens = list(vocab_tokens)
        if not tokens:
            raise ValueError("vocab_tokens is empty")
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str):
                raise TypeError(f"vocab_tokens[{i}] must be a str, got {type(tok).__name__}")
            if tok in vocab:
                raise ValueError(f"vocab_tokens[{i}] {tok!r} duplicates vocab_tokens[{vocab[tok]}] "
                                 "(TF's vocab lookup table refuses duplicate keys)")
            vocab[tok] = i
        if not isinstance(lower_case, (bool, np.bool_)):
            raise TypeError(f"lower_case must be a bool, got {type(lower_case).__name__}")
        if max_seq_length is not None:
            if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, numbers.Integral):
                raise TypeError(f"max_seq_length must be an integer or None, got {max_seq_length!r}")
            if max_seq_length < 2:
                raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
            max_seq_length = int(max_seq_length)
        self.vocab_tokens = tokens
        self.vocab = vocab
        self.lower_case = bool(lower_case)
        self.max_seq_length = max_seq_length
        self.default_seq_length = _check_seq_length(default_seq_length, max_seq_length, "default_seq_length")
        # Like TF: the [UNK] id is looked up in the table, -1 when the vocab has no such token.
        self.unknown_id = vocab.get(UNKNOWN_TOKEN, -1)
        # What makes WordPiece cheaper without changing its result: a word with a character that no
        # token contains is [UNK]; a piece can only be as long as the run of characters that is
        # still the beginning of some token (all prefixes of the tokens, and of the ## tokens' rest).
        self._vocab_chars = frozenset(itertools.chain.from_iterable(tokens))
        first, rest = set(), set()
        for tok in tokens:
            first.update(tok[:k] for k in range(1, len(tok) + 1))
            if tok.startswith(SUFFIX_INDICATOR):
                body = tok[len(SUFFIX_INDICATOR):]
                rest.update(body[:k] for k in range(1, len(body) + 1))
        self._first_prefixes, self._rest_prefixes = frozenset(first), frozenset(rest)
        special = {"vocab_size": len(tokens)}
        special.update({k: vocab[t] for k, t in SPECIAL_TOKENS.items() if t in vocab})
        self._special_tokens = special
        tables = _tables()
        self._tables = tables
        self._translate = tables.folded_post if self.lower_case else tables.cased
        self._memo: dict[str, tuple[int, ...]] = {}

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_vocab_file(cls, path: str, lower_case: bool = True, **kwargs) -> "Preprocessor":
        """Reads vocab.txt (one token per line, UTF-8; a trailing '\\r' is dropped like TF does)."""
        return cls(read_vocab(path), lower_case=lower_case, **kwargs)

    @classmethod
    def from_weights(cls, loaded, **kwargs) -> "Preprocessor":
        """From a loaded weights file: `.vocab` (list of str) and `.config.do_lower_case`; the
        config's `max_position_embeddings`, when present, becomes `max_seq_length`."""
        vocab = getattr(loaded, "vocab", None)
        if vocab is None:
            raise ValueError("the weights file holds no vocab: build the Preprocessor from a vocab.txt instead")
        config = getattr(loaded, "config", None)
        lower_case = getattr(config, "do_lower_case", True)
        kwargs.setdefault("max_seq_length", getattr(config, "max_position_embeddings", None))
        return cls(vocab, lower_case=bool(lower_case), **kwargs)

    # -- special tokens -----------------------------------------------------------------------------

    @property
    def special_tokens(self) -> dict[str, int]:
        """Like Model Garden's `get_special_tokens_dict()`: vocab_size and the ids of [CLS], [SEP],
        [PAD], [MASK] under the keys start_of_sequence_id, end_of_segment_id, padding_id, mask_id
        (a key is omitted when its token is not in the vocab)."""
        return dict(self._special_tokens)

    @property
    def mask_id(self) -> int | None:
        """The id of [MASK], or None when the vocab has none."""
        return self._special_tokens.get("mask_id")

    @property
    def vocab_size(self) -> int:
        return self._special_tokens["vocab_size"]

    # -- text to words ------------------------------------------------------------------------------

    @staticmethod
    def _as_texts(texts: Any, name: str = "texts") -> list[str]:
        if isinstance(texts, (str, bytes, bytearray)):
            texts = [texts]
        elif isinstance(texts, np.ndarray):
            if texts.ndim > 1:
                raise ValueError(f"{name} must be one-dimensional (a batch of strings), got shape {texts.shape}")
            texts = texts.reshape(-1).tolist()
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"{name} must be a str or a list of str, got {type(texts).__name__}")
        out = []
        for i, t in enumerate(texts):
            if isinstance(t, str):
                if not t.isascii():
                    try:
                        t.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise ValueError(f"{name}[{i}] is not valid Unicode text (it cannot be encoded "
                                         f"as UTF-8: {e.reason} at position {e.start})") from None
            elif isinstance(t, (bytes, bytearray)):
                try:
                    t = bytes(t).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{name}[{i}] is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            else:
                raise TypeError(f"{name}[{i}] must be a str (or UTF-8 bytes), got {type(t).__name__}")
            out.append(t)
        return out

    def _normalize(self, text: str) -> str:
        """The text after normalization and the regexes: words separated by spaces."""
        if not self.lower_case or text.isascii() or self._tables.reorder_triggers.isdisjoint(text):
            return text.translate(self._translate)
        return self._normalize_exact(text)

    def _normalize_exact(self, text: str) -> str:
        """Folds character by character and canonically reorders like ICU, then applies the regexes."""
        fold, ccc = self._tables.fold, self._tables.ccc
        chars = list("".join(fold.get(ord(c), c) for c in text))
        i, n = 0, len(chars)
        while i < n:
            if ccc.get(ord(chars[i]), 0) == 0:
                i += 1
                continue
            j = i
            while j < n and ccc.get(ord(chars[j]), 0):
                j += 1
            if j - i > 1:
                chars[i:j] = sorted(chars[i:j], key=lambda c: ccc[ord(c)])  # stable, like ICU's
            i = j
        return "".join(chars).translate(self._tables.post)

    def basic_tokenize(self, text: str) -> list[str]:
        """One text's words (TF-Text's BasicTokenizer): normalized, split, punctuation alone."""
        return [w for w in self._normalize(text).split(" ") if w]

    # -- words to wordpieces ------------------------------------------------------------------------

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        # A UTF-8 character has at most 4 bytes: only words of more than 25 characters can be too long.
        if len(word) > MAX_BYTES_PER_WORD // 4 and len(word.encode("utf-8")) > MAX_BYTES_PER_WORD:
            return (self.unknown_id,)
        vocab = self.vocab
        whole = vocab.get(word)
        if whole is not None:
            return (whole,)
        if not self._vocab_chars.issuperset(word):
            return (self.unknown_id,)
        pieces = []
        start, n, prefixes = 0, len(word), self._first_prefixes
        while start < n:
            end = start
            while end < n and word[start:end + 1] in prefixes:
                end += 1
            while end > start:
                pid = vocab.get(word[start:end] if start == 0 else SUFFIX_INDICATOR + word[start:end])
                if pid is not None:
                    pieces.append(pid)
                    break
                end -= 1
            else:
                return (self.unknown_id,)
            start, prefixes = end, self._rest_prefixes
        return tuple(pieces)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        memo = self._memo
        ids = memo.get(word)
        if ids is None:
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            ids = memo[word] = self._wordpiece(word)
        return ids

    # -- the Hub preprocessor's entry points ---------------------------------------------------------

    def _text_ids(self, text: str) -> list[list[int]]:
        memo, word_ids = self._memo, self._word_ids
        out = []
        for word in self._normalize(text).split(" "):
            if word:
                ids = memo.get(word)
                out.append(ids if ids is not None else word_ids(word))
        return out

    def tokenize(self, texts) -> list[list[list[int]]]:
        """Like the Hub preprocessor's `.tokenize`: per text, per word, its wordpiece ids
        (the ragged [B, (words), (pieces)] structure as nested lists). A single str is a batch of 1."""
        return [[list(w) for w in self._text_ids(t)] for t in self._as_texts(texts)]

    def tokenize_flat(self, texts) -> list[list[int]]:
        """Per text, all its wordpiece ids in order ([B, (tokens)]); what packing consumes."""
        chain = itertools.chain.from_iterable
        return [list(chain(self._text_ids(t))) for t in self._as_texts(texts)]

    def __call__(self, texts, seq_length: int | None = None) -> dict[str, np.ndarray]:
        """Like calling the Hub preprocessor: one segment per text, packed to `seq_length`
        (default 128). For sentence pairs use `bert_pack_inputs([tokenize(a), tokenize(b)])`."""
        seq_length = self.default_seq_length if seq_length is None else seq_length
        seq_length = _check_seq_length(seq_length, self.max_seq_length)
        return self._pack([self.tokenize_flat(texts)], seq_length)

    def bert_pack_inputs(self, segments, seq_length: int | None = None) -> dict[str, np.ndarray]:
        """Like the Hub preprocessor's `.bert_pack_inputs`: packs a list of one or two segments into
        `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, trimmed round-robin to `seq_length` exactly as
        TF-Text's RoundRobinTrimmer does (the first segment gets the odd token).

        `segments` is a list (or tuple) of 1 or 2 segments, each a batch of B rows: either a
        `tokenize()` result ([B, (words), (pieces)]) or flat id lists ([B, (tokens)]). As with the
        Hub call, pass a single segment inside a list: `bert_pack_inputs([prep.tokenize(texts)])`.
        Returns int32 arrays input_word_ids, input_mask, input_type_ids, each [B, seq_length].
        """
        seq_length = self.default_seq_length if seq_length is None else seq_length
        seq_length = _check_seq_length(seq_length, self.max_seq_length)
        return self._pack(self._as_segments(segments), seq_length)

    # -- packing ---------------------------------------------------------------------------------------

    @staticmethod
    def _as_segments(segments) -> list[list[list[int]]]:
        if isinstance(segments, np.ndarray) and segments.dtype != object:
            raise TypeError("segments must be a list of one or two segments (each a batch of id lists), "
                            f"got a {segments.dtype} array; wrap a [B, T] array in a list: [array]")
        if not isinstance(segments, (list, tuple)):
            raise TypeError(f"segments must be a list of one or two segments, got {type(segments).__name__}")
        if not 1 <= len(segments) <= 2:
            raise ValueError(f"segments: bert_pack_inputs packs one or two segments, got {len(segments)}")
        flat_segments, ranks, batch = [], [], None
        for s, seg in enumerate(segments):
            if isinstance(seg, np.ndarray):
                if seg.dtype != object and seg.ndim != 2:
                    raise ValueError(f"segments[{s}] must be [B, (tokens)] or [B, (words), (pieces)], got shape {seg.shape}")
                seg = list(seg)
            elif not isinstance(seg, (list, tuple)):
                raise TypeError(f"segments[{s}] must be a list of rows (one per text), got {type(seg).__name__}")
            if batch is None:
                batch = len(seg)
            elif len(seg) != batch:
                raise ValueError(f"segments: the segments have different batch sizes ({batch} and {len(seg)})")
            rows, rank = [], None
            for b, row in enumerate(seg):
                if isinstance(row, np.ndarray):
                    row = row.tolist()
                elif not isinstance(row, (list, tuple)):
                    raise TypeError(f"segments[{s}][{b}] must be a list of ids or of wordpiece lists, "
                                    f"got {type(row).__name__}")
                if row:
                    row_rank = 3 if isinstance(row[0], (list, tuple, np.ndarray)) else 2
                    if rank is None:
                        rank = row_rank
                    elif rank != row_rank:
                        raise ValueError(f"segments[{s}] mixes ragged [B, (words), (pieces)] rows and flat rows")
                    if row_rank == 3:
                        try:
                            row = list(itertools.chain.from_iterable(row))
                        except TypeError:
                            raise TypeError(f"segments[{s}][{b}] must be a list of wordpiece id lists") from None
                    arr = np.asarray(row)
                    if arr.ndim != 1 or arr.dtype.kind not in "iu":
                        raise TypeError(f"segments[{s}][{b}] must hold integer token ids "
                                        f"(a flat [B, (tokens)] or [B, (words), (pieces)] batch)")
                    if arr.size and (arr.min() < -2**31 or arr.max() >= 2**31):
                        raise ValueError(f"segments[{s}][{b}] has ids outside int32")
                    row = arr.tolist()
                rows.append(row)
            if rank is not None:
                ranks.append(rank)
            flat_segments.append(rows)
        if len(set(ranks)) > 1:
            raise ValueError("segments: all segments must have the same rank "
                             "(all [B, (words), (pieces)] or all [B, (tokens)])")
        return flat_segments

    @staticmethod
    def round_robin_lengths(lengths: Sequence[int], budget: int) -> list[int]:
        """How many items of each segment TF-Text's RoundRobinTrimmer keeps for one row."""
        budget = max(int(budget), 0)
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        used = [0] * len(lengths)
        left, filled = budget, 0
        # Fill whole segments, smallest first, while the rest could still get as much each.
        for i in order:
            if lengths[i] * (len(lengths) - filled) > left:
                break
            used[i] = lengths[i]
            left -= lengths[i]
            filled += 1
        if filled < len(lengths):
            share = left // (len(lengths) - filled)
            for i in order[filled:]:
                used[i] = share
                left -= share
        for i in range(len(lengths)):  # the remainder, in segment order
            if left <= 0:
                break
            if used[i] < lengths[i]:
                used[i] += 1
                left -= 1
        return used

    def _pack(self, segments: list[list[list[int]]], seq_length: int) -> dict[str, np.ndarray]:
        special = self._special_tokens
        missing = [k for k in ("start_of_sequence_id", "end_of_segment_id", "padding_id") if k not in special]
        if missing:
            raise ValueError(f"cannot pack: the vocab lacks {', '.join(SPECIAL_TOKENS[k] for k in missing)}")
        cls_id, sep_id, pad_id = (special[k] for k in ("start_of_sequence_id", "end_of_segment_id", "padding_id"))
        batch = len(segments[0])
        budget = seq_length - (len(segments) + 1)
        word_ids = np.full((batch, seq_length), pad_id, dtype=np.int32)
        type_ids = np.zeros((batch, seq_length), dtype=np.int32)
        mask = np.zeros((batch, seq_length), dtype=np.int32)
        for b in range(batch):
            rows = [seg[b] for seg in segments]
            used = self.round_robin_lengths([len(r) for r in rows], budget)
            ids, types = [cls_id], [0]
            for s, (row, n) in enumerate(zip(rows, used)):
                ids.extend(row[:n])
                ids.append(sep_id)
                types.extend([s] * (n + 1))
            n = min(len(ids), seq_length)
            word_ids[b, :n] = ids[:n]
            type_ids[b, :n] = types[:n]
            mask[b, :n] = 1
        return {"input_word_ids": word_ids, "input_mask": mask, "input_type_ids": type_ids}

    def __repr__(self) -> str:
        return (f"Preprocessor(vocab_size={self.vocab_size}, lower_case={self.lower_case}, "
                f"max_seq_length={self.max_seq_length}, default_seq_length={self.default_seq_length})")
