"""Model Garden's optimizer, step for step: `official.nlp.optimization.create_optimizer(init_lr,
num_train_steps, num_warmup_steps, end_lr, optimizer_type="adamw")`, read from the installed
package (official/nlp/optimization.py, official/modeling/optimization/legacy_adamw.py, and the
Keras legacy Adam and TF's ResourceApplyAdam kernel that it builds on):

- schedule: PolynomialDecay(init_lr, num_train_steps, end_lr, power 1) wrapped in WarmUp: at
  step t (the optimizer's iteration count before the update, so 0 on the first step),
  lr = init_lr * t / warmup while t < warmup (0 at the first step: the first update only fills the
  moments), then (init_lr - end_lr) * (1 - min(t, T) / T) + end_lr. float32 throughout.
- AdamWeightDecay: gradients clipped to global norm 1.0 first (tf.clip_by_global_norm; the norm
  of an embedding's row gradient counts each looked-up row, repeated tokens separately, as TF's
  IndexedSlices do); then per variable, decoupled weight decay var -= lr * var * 0.01 unless its
  TF name contains "LayerNorm", "layer_norm" or "bias" (re.search, on the SavedModel's variable
  names); then Adam with beta_1 0.9, beta_2 0.999, epsilon 1e-6 added to sqrt(v) ("epsilon hat":
  the bias correction is folded into the step size, not into v):
      alpha = lr * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))
      m += (g - m)(1 - beta_1);  v += (g^2 - v)(1 - beta_2);  var -= m alpha / (sqrt(v) + eps)
  A row gradient (the word table without the MLM head: tf.gather's IndexedSlices) takes Keras'
  sparse path, whose arithmetic differs in rounding: duplicate rows summed, m = beta_1 m, then
  m[rows] += (1 - beta_1) g; v likewise; var -= alpha m / (sqrt(v) + eps) on every row (dense
  semantics: untouched rows still move with their decayed moments).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from engine.core.backend import array_module
from engine.core.backward import RowGradient
from engine.fast import adamw
from engine.fast.threads import parallel_rows

EXCLUDE_FROM_WEIGHT_DECAY = ("LayerNorm", "layer_norm", "bias")


@dataclasses.dataclass
class LinearSchedule:
    """WarmUp(PolynomialDecay(init_lr, num_train_steps, end_lr, power)) of create_optimizer."""
    init_lr: float
    num_train_steps: int
    num_warmup_steps: int = 0
    end_lr: float = 0.0
    power: float = 1.0

    def __call__(self, step: int) -> np.float32:
        f = np.float32
        t = f(step)
        if self.num_warmup_steps and t < f(self.num_warmup_steps):
            return f(f(self.init_lr) * np.power(t / f(self.num_warmup_steps), f(self.power)))
        decay_steps = f(self.num_train_steps)
        p = np.minimum(t, decay_steps) / decay_steps
        return f((f(self.init_lr) - f(self.end_lr)) * np.power(f(1) - p, f(self.power)) + f(self.end_lr))


def global_norm(grads: dict):
    """sqrt(sum of squares) over all gradients, in their dtype, as tf.linalg.global_norm (for a
    RowGradient: over its rows as looked up, before duplicates are summed)."""
    total = None
    for g in grads.values():
        values = g.values if isinstance(g, RowGradient) else g
        s = (values * values).sum()
        total = s if total is None else total + s
    xp = array_module(total)
    return xp.sqrt(total)


class AdamWeightDecay:
    """The optimizer of create_optimizer(..., optimizer_type="adamw"); see the module docstring.

        opt = AdamWeightDecay(LinearSchedule(2e-5, steps, steps // 10), names={path: tf_name})
        opt.apply(params, grads)     # params: {path: array}, updated in place; grads: same keys
    """

    def __init__(self, schedule: LinearSchedule, names: dict[str, str], weight_decay_rate: float = 0.01,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-6, clip_norm: float = 1.0,
                 exclude_from_weight_decay=EXCLUDE_FROM_WEIGHT_DECAY, fused: bool = True):
        self.schedule = schedule
        self.fused = fused           # the step of engine/fast/adamw.py where it can run (same bits)
        self.names = dict(names)
        self.weight_decay_rate, self.beta_1, self.beta_2 = weight_decay_rate, beta_1, beta_2
        self.epsilon, self.clip_norm = epsilon, clip_norm
        self.exclude = tuple(exclude_from_weight_decay)
        self.iterations = 0
        self.m: dict = {}
        self.v: dict = {}

    def decays(self, path: str) -> bool:
        """Whether weight decay applies, by the TF variable name as legacy_adamw._do_use_weight_decay."""
        if self.weight_decay_rate == 0:
            return False
        name = self.names.get(path, path)
        return not any(re.search(pattern, name) for pattern in self.exclude)

    @staticmethod
    def _fusable(*arrays) -> bool:
        """float32 C-order NumPy arrays of one shape: the fused kernel (engine/fast/adamw.py) can
        run the step over their memory in order."""
        if not adamw.enabled() or not all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays):
            return False
        first = arrays[0]
        return all(a.flags.c_contiguous and a.shape == first.shape for a in arrays)

    def apply(self, params: dict, grads: dict) -> dict:
        """One step: clip, decay, Adam, in place on `params`. Returns {"learning_rate", "global_norm"}."""
        missing = [p for p in params if p not in grads]
        if missing:
            raise ValueError(f"gradients missing for {missing[:3]}")
        dtype = next(iter(params.values())).dtype.type
        lr_t = dtype(self.schedule(self.iterations))
        local_step = dtype(self.iterations + 1)
        b1, b2, eps = dtype(self.beta_1), dtype(self.beta_2), dtype(self.epsilon)
        b1_power, b2_power = np.power(b1, local_step), np.power(b2, local_step)
        one = dtype(1)
        norm = global_norm(grads)
        clip = dtype(self.clip_norm)
        scale = clip * min(one / dtype(norm), one / clip)          # clip_by_global_norm's scale
        alpha = lr_t * np.sqrt(one - b2_power) / (one - b1_power)   # ResourceApplyAdam's step size
        lr_sparse = lr_t * (np.sqrt(one - b2_power) / (one - b1_power))
        for path, var in params.items():
            g = grads[path]
            if path not in self.m:
                xp = array_module(var)
                self.m[path], self.v[path] = xp.zeros_like(var), xp.zeros_like(var)
            m, v = self.m[path], self.v[path]
            fusable = self.fused and not isinstance(g, RowGradient) and self._fusable(var, g, m, v)
            if self.decays(path) and not fusable:
                var -= lr_t * var * dtype(self.weight_decay_rate)
            if isinstance(g, RowGradient):
                rows, values = g.scaled(scale).summed()          # TF: clip the rows, then sum duplicates
                m *= b1
                m[rows] += values * (one - b1)
                v *= b2
                v[rows] += (values * values) * (one - b2)
                var -= lr_sparse * m / (array_module(v).sqrt(v) + eps)
            elif fusable:
                # the decay and the dense branch below in one pass per tensor, on the fast path's
                # threads, with the same float32 arithmetic in the same order (the same bits)
                flat = [a.reshape(-1) for a in (var, g, m, v)]               # views
                rate = dtype(self.weight_decay_rate if self.decays(path) else 0)
                parallel_rows(lambda s, e, w: adamw.adamw_dense(*flat, dtype(scale), lr_t, rate, dtype(alpha),
                                                                one - b1, one - b2, eps, s, e),
                              flat[0].size, 1 << 16)
            else:
                g = g * scale
                m += (g - m) * (one - b1)
                v += (g * g - v) * (one - b2)
                var -= (m * alpha) / (array_module(v).sqrt(v) + eps)
        self.iterations += 1
        return {"learning_rate": float(lr_t), "global_norm": float(norm)}
