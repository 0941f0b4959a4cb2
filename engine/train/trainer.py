"""One training step of the engine: the tape's forward and backward, a loss, Model Garden's AdamW.

    trainer = Trainer(enc, names, LinearSchedule(2e-5, steps, steps // 10), head=ClassifierHead.init(H, C, seed=0))
    loss = trainer.step(batch)        # batch: Hub inputs + "labels"            (fine-tuning)
    trainer = Trainer(enc, names, schedule)                       # no head: continued MLM training
    loss = trainer.step(batch)        # batch: Hub inputs + masked_lm_positions, masked_lm_ids, masked_lm_weights

`names` maps each HDF5 path to the SavedModel's variable name (the datasets' `source`
attributes: weights.load(...).sources), which decides weight decay exactly as Model Garden does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.api import Encoder
from engine.core import backward as KB
from engine.core import kernels as K
from engine.fast import tape_kernels
from engine.fast import threads as threads_mod
from engine.train import losses
from engine.train.optimizer import AdamWeightDecay, LinearSchedule
from weights.format import block_weight_count

HEAD_NAMES = {"classifier/kernel": "classifier/kernel:0", "classifier/bias": "classifier/bias:0"}
ENCODER_KEYS = ("input_word_ids", "input_mask", "input_type_ids")


@dataclasses.dataclass
class ClassifierHead:
    """Dropout + Dense(C) on pooled_output, as the bert_glue tutorial's classifier. [B,H] -> [B,C]"""
    kernel: object    # [H,C]
    bias: object      # [C]

    @classmethod
    def init(cls, hidden: int, num_classes: int, seed: int = 0, dtype=np.float32) -> "ClassifierHead":
        """BERT's initializer: truncated normal, stddev 0.02 (cut at 2 stddev); bias zero."""
        rng = np.random.default_rng(seed)
        w = rng.standard_normal((hidden, num_classes))
        while np.any(np.abs(w) > 2):
            bad = np.abs(w) > 2
            w[bad] = rng.standard_normal(int(bad.sum()))
        return cls((w * 0.02).astype(dtype), np.zeros(num_classes, dtype))

    def parameters(self) -> dict:
        return {"classifier/kernel": self.kernel, "classifier/bias": self.bias}


class Trainer:
    """Fine-tuning (with a head) or continued MLM training (without), one batch per step().

    It trains the model's own arrays (enc.parameters()), by design: the tape runs on them, and an
    engine.Encoder's faster twin, whose arrays derive from them, is rebuilt from them after each
    step (Encoder.weights_changed), so the fast forward never runs stale weights."""

    def __init__(self, enc, names: dict, schedule: LinearSchedule, head: ClassifierHead | None = None,
                 dropout: float | None = None, head_dropout: float = 0.0, seed: int = 0, readable: bool = False):
        self.enc, self.head = enc, head
        # the tape's element-wise stages and attention: the fused set (engine/fast/tape_kernels.py) unless readable
        self.kernels = tape_kernels.READABLE_KERNELS if readable else tape_kernels.for_encoder(enc)
        self.dropout, self.head_dropout = dropout, head_dropout
        self.rng = np.random.default_rng(seed)
        self.params = enc.parameters()
        all_names = dict(names)
        if head is not None:
            # fine-tuning trains the encoder and the head; the MLM head is not part of that model
            self.params = {p: a for p, a in self.params.items() if not p.startswith("mlm/")}
            self.params.update(head.parameters())
            all_names.update(HEAD_NAMES)
        settings = getattr(enc, "settings", None)
        self.optimizer = AdamWeightDecay(schedule, all_names, fused=settings is None or settings.fused)

    def loss_and_grads(self, batch: dict):
        """(loss, {path: gradient}) for one batch, nothing updated; (loss, None) when the loss is not finite."""
        enc, xp = self.enc, self.enc.xp
        seed = int(self.rng.integers(2 ** 63)) if self.dropout else 0
        if self.head is None:
            inputs = {k: batch[k] for k in ENCODER_KEYS + ("masked_lm_positions",)}
            with enc.tape(inputs, dropout=self.dropout, seed=seed, kernels=self.kernels) as tape:
                loss, dlogits = losses.mlm_loss(tape.outputs["mlm_logits"], xp.asarray(batch["masked_lm_ids"]),
                                                batch["masked_lm_weights"])
                if not np.isfinite(float(loss)):
                    return loss, None
                return loss, tape.gradient({"mlm_logits": dlogits})
        inputs = {k: batch[k] for k in ENCODER_KEYS}
        with enc.tape(inputs, dropout=self.dropout, seed=seed, kernels=self.kernels) as tape:
            pooled = tape.outputs["pooled_output"]                                     # [B,H]
            keep = None
            if self.head_dropout:
                keep = xp.asarray(self.rng.random(pooled.shape, dtype=np.float32) >= self.head_dropout, dtype=pooled.dtype)
            dropped = K.dropout(pooled, keep, self.head_dropout)
            logits = K.dense(dropped, self.head.kernel, self.head.bias)                 # [B,C]
            loss, dlogits = losses.classification_loss(logits, xp.asarray(batch["labels"]))
            if not np.isfinite(float(loss)):
                return loss, None
            ddropped, dkernel, dbias = KB.dense_backward(dropped, self.head.kernel, self.head.bias, dlogits)
            dpooled = KB.dropout_backward(pooled, keep, self.head_dropout, ddropped)
            grads = tape.gradient({"pooled_output": dpooled}, word_rows=True)
        grads.update({"classifier/kernel": dkernel, "classifier/bias": dbias})
        return loss, grads

    def step_threads(self, batch: dict) -> int:
        """The threads of one step: the Settings' threads, or with adapt_threads one per
        engine.fast.threads.MIN_FLOPS_PER_THREAD of the step's products (forward and backward: 6 x
        tokens x the blocks' weights), so that a small model's step runs on one."""
        settings = getattr(self.enc, "settings", None)
        threads = settings.threads if settings is not None else threads_mod.default_threads()
        if settings is None or not settings.adapt_threads:
            return threads
        tokens = int(np.size(batch["input_word_ids"]))
        return threads_mod.threads_for_work(threads, 6.0 * tokens * block_weight_count(self.enc.config))

    def step(self, batch: dict) -> dict:
        """One optimizer step; {"loss", "learning_rate", "global_norm"}. A non-finite loss updates
        nothing and comes back as {"loss": nan or inf} (the caller stops)."""
        with threads_mod.threads_capped(self.step_threads(batch)):
            return self._step(batch)

    def _step(self, batch: dict) -> dict:
        loss, grads = self.loss_and_grads(batch)
        if grads is None:
            return {"loss": float(loss), "learning_rate": float("nan"), "global_norm": float("nan")}
        info = self.optimizer.apply(self.params, grads)
        if isinstance(self.enc, Encoder):
            self.enc.weights_changed()     # its faster twin (if any) follows the trained weights
        return {"loss": float(loss), **info}
