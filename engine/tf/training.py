"""TensorFlow's training step, the reference for engine/train: tf.GradientTape over the loaded
SavedModel's trainable variables (plus a Dense classifier head), Model Garden's
create_optimizer(..., optimizer_type="adamw"), dropout off (the SavedModel called with
training=False, as the Hub snippets do).

    trainer = TFTrainer(savedmodel_dir, init_lr=1e-3, num_train_steps=20, num_warmup_steps=2,
                        head=(kernel, bias))             # head: a classifier on pooled_output, or None for MLM
    loss = trainer.step(batch)                           # batch: Hub inputs + labels (or MLM ids and weights)
    trainer.weights()                                    # {TF variable name: NumPy array}
"""

from __future__ import annotations

import numpy as np


class TFTrainer:
    def __init__(self, savedmodel_dir: str, init_lr: float, num_train_steps: int, num_warmup_steps: int,
                 end_lr: float = 0.0, head=None):
        import tensorflow as tf
        import tf_keras
        from official.nlp import optimization

        self.tf = tf
        self.model = tf.saved_model.load(savedmodel_dir)      # a fresh copy: training changes its variables
        self.mlm = head is None
        callee = self.model.mlm if self.mlm else self.model
        self.callee = callee
        self.variables = list(callee.trainable_variables)
        if not self.mlm:
            kernel, bias = head
            self.head = tf_keras.layers.Dense(kernel.shape[1], name="classifier")
            self.head.build((None, kernel.shape[0]))
            self.head.kernel.assign(kernel)
            self.head.bias.assign(bias)
            self.variables += [self.head.kernel, self.head.bias]
        self.optimizer = optimization.create_optimizer(init_lr, num_train_steps, num_warmup_steps, end_lr=end_lr,
                                                       optimizer_type="adamw")

    def step(self, batch: dict) -> float:
        import tf_keras
        tf = self.tf
        inputs = {k: tf.constant(np.asarray(batch[k], np.int32)) for k in
                  ("input_word_ids", "input_mask", "input_type_ids") + (("masked_lm_positions",) if self.mlm else ())}
        with tf.GradientTape() as tape:
            out = self.callee(inputs)
            if self.mlm:
                losses = tf_keras.losses.sparse_categorical_crossentropy(
                    tf.constant(batch["masked_lm_ids"], tf.int32), out["mlm_logits"], from_logits=True)
                weights = tf.constant(batch["masked_lm_weights"], tf.float32)
                loss = tf.math.divide_no_nan(tf.reduce_sum(losses * weights), tf.reduce_sum(weights))
            else:
                logits = self.head(out["pooled_output"])
                loss = tf.reduce_mean(tf_keras.losses.sparse_categorical_crossentropy(
                    tf.constant(batch["labels"], tf.int32), logits, from_logits=True))
        grads = tape.gradient(loss, self.variables)
        self.optimizer.apply_gradients(zip(grads, self.variables))
        return float(loss.numpy())

    def weights(self) -> dict:
        """{variable name: value}; the head's as classifier/kernel:0 and classifier/bias:0."""
        out = {v.name: v.numpy() for v in self.variables[:len(self.variables) - (0 if self.mlm else 2)]}
        if not self.mlm:
            out["classifier/kernel:0"], out["classifier/bias:0"] = self.head.kernel.numpy(), self.head.bias.numpy()
        return out
