"""Dropout as Model Garden applies it in training: the rates, and the keep masks of one forward pass,
drawn in forward order from a seed (NumPy's generator, so the CPU and the GPU draw the same ones) or
given, kept for the backward pass (engine/core/tape.py)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Dropout rates: `hidden` (embeddings, attention output, feed-forward output) and `attention`
    (the mixed attention probabilities); Model Garden's BERT configs use 0.1 for both."""
    hidden: float = 0.0
    attention: float = 0.0

    @classmethod
    def of(cls, value) -> "Dropout":
        """None or 0 (off), a rate for both, a dict {"hidden":, "attention":}, or a Dropout."""
        if value is None:
            return cls()
        if isinstance(value, Dropout):
            out = value
        elif isinstance(value, dict):
            unknown = set(value) - {"hidden", "attention"}
            if unknown:
                raise ValueError(f"dropout: unknown keys {sorted(unknown)}; use 'hidden' and 'attention'")
            out = cls(**{k: float(v) for k, v in value.items()})
        else:
            out = cls(float(value), float(value))
        for name in ("hidden", "attention"):
            rate = getattr(out, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"dropout: the {name} rate must be in [0, 1), got {rate}")
        return out


class DropoutMasks:
    """The dropout masks of one forward pass, drawn in forward order from a seed, or given."""

    def __init__(self, xp, dtype, rates: Dropout, seed=0, given=None):
        self.xp, self.dtype, self.rates = xp, dtype, rates
        self.rng = np.random.default_rng(seed)
        self.given = given or {}
        self.drawn = {}

    def keep(self, name: str, shape, rate: float):
        """The 0/1 keep mask `name` of `shape`, or None when the rate is 0."""
        if rate == 0.0:
            return None
        if name in self.given:
            mask = self.xp.asarray(np.asarray(self.given[name]), dtype=self.dtype)
            if tuple(mask.shape) != tuple(shape):
                raise ValueError(f"dropout mask {name}: shape {tuple(mask.shape)}, expected {tuple(shape)}")
        else:
            mask = self.xp.asarray(self.rng.random(shape, dtype=np.float32) >= rate, dtype=self.dtype)
        self.drawn[name] = mask
        return mask


NO_DROPOUT = DropoutMasks(np, None, Dropout())   # every keep() None: nothing drawn, nothing kept
