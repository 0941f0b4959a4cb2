"""Fill-mask: the top-k tokens and their probabilities for each [MASK] of a text.

    result = fill_mask(enc, prep, "the [MASK] sat on the mat", top_k=5)
    result.candidates      # one list of (token, probability) per [MASK], most probable first
    result.truncated       # tokens cut from the end of the text to fit seq_length (0: none)

The Hub preprocessor would split the literal "[MASK]" into "[", "mask", "]", so the text is cut at
each [MASK] and the mask id is put between the tokenized pieces. Probabilities are the softmax of
mlm_logits at the [MASK] positions, in float64.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.core import backend as backend_mod
from engine.core import kernels


class FillMaskError(ValueError):
    """The text or the options cannot be used; the message says which."""


@dataclasses.dataclass
class FillMask:
    candidates: list        # per [MASK]: [(token, probability)] * top_k
    seq_length: int         # the packed length
    tokens: int             # tokens the text needs with [CLS] and [SEP]
    truncated: int          # tokens cut to fit seq_length


def mask_ids(prep, text: str) -> list[int]:
    """The token ids of `text` with the mask id at each literal [MASK] (none is fine: the text's
    plain ids). The one place that does this: fill-mask and the explain page both call it."""
    pieces = text.split("[MASK]")
    if len(pieces) > 1 and prep.mask_id is None:
        raise FillMaskError("the text has [MASK] but the model's vocab has no [MASK] token")
    ids = []
    for i, piece in enumerate(pieces):
        ids += [t for word in prep.tokenize([piece])[0] for t in word]
        if i < len(pieces) - 1:
            ids.append(prep.mask_id)
    return ids


def fill_mask(enc, prep, text: str, top_k: int = 5, seq_length: int | None = None) -> FillMask:
    """Top-k (token, probability) for each [MASK] in `text`, in order. seq_length: default what the
    text needs, capped at the model's positions; a longer text is truncated (FillMask.truncated
    says by how much) and a [MASK] cut away is an error."""
    vocab_size = enc.config.vocab_size
    if top_k < 1:
        raise FillMaskError(f"--top-k must be at least 1, got {top_k}")
    if top_k > vocab_size:
        raise FillMaskError(f"--top-k must be at most {vocab_size} (the vocabulary's size), got {top_k}")
    ids = mask_ids(prep, text)
    masks = sum(1 for i in ids if i == prep.mask_id)
    if masks == 0:
        raise FillMaskError(f"no [MASK] in {text!r}")
    if seq_length is None:
        seq_length = min(len(ids) + 2, enc.config.max_position_embeddings)
    packed = prep.bert_pack_inputs([[ids]], seq_length=seq_length)
    positions = np.flatnonzero(packed["input_word_ids"][0] == prep.mask_id)
    if len(positions) < masks:
        raise FillMaskError(f"the text needs {len(ids) + 2} tokens, more than seq_length {seq_length}: "
                            f"a [MASK] was trimmed away")
    inputs = dict(packed, masked_lm_positions=positions[None].astype(np.int32))
    skip = bool(getattr(enc.fast_forward, "skips_padding", False))
    logits = backend_mod.to_numpy(enc.mlm(inputs, skip_padding=skip)["mlm_logits"])[0].astype(np.float64)  # [P,V]
    probs = kernels.softmax(logits)
    candidates = []
    for p in probs:
        top = np.argsort(-p)[:top_k]
        candidates.append([(enc.vocab[i], float(p[i])) for i in top])
    return FillMask(candidates, seq_length, len(ids) + 2, max(len(ids) + 2 - seq_length, 0))
