"""The optimizer's fused AdamW step (engine/train/optimizer.py): one pass per tensor over flat
float32 memory, compiled by Numba (optional: without it the optimizer runs its NumPy step).

    adamw.enabled()                                  # True when Numba imports
    adamw.adamw_dense(var, grad, m, v, ..., start, stop)   # in place on [start, stop)

No fast-math flags: NumPy's rounding, operation for operation, so the step gives the NumPy step's
bits (tests/test_training.py).
"""

from __future__ import annotations

import numpy as np

from engine.fast.fused import numba


def enabled() -> bool:
    """Numba imports: the fused step can run."""
    return numba is not None


if numba is not None:
    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def adamw_dense(var, grad, m, v, scale, lr_t, decay_rate, alpha, one_minus_b1, one_minus_b2, eps, start, stop):
        """One AdamW step on flat float32 arrays over [start, stop), in place, in one pass: the
        arithmetic of engine/train/optimizer.py's dense path in its order (so the same bits). The
        decoupled decay var - (lr_t * var) * decay_rate comes first unless decay_rate is 0. [n] -> [n]"""
        for i in range(start, stop):
            x = var[i]
            if decay_rate != 0:
                x = x - lr_t * x * decay_rate
            g = grad[i] * scale
            mi = m[i] + (g - m[i]) * one_minus_b1
            vi = v[i] + (g * g - v[i]) * one_minus_b2
            m[i] = mi
            v[i] = vi
            var[i] = x - (mi * alpha) / (np.sqrt(vi) + eps)
