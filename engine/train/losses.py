"""Losses and their gradients with respect to the logits, as Model Garden computes them.

    loss, dlogits = mlm_loss(logits, label_ids, weights)        # official/nlp/tasks/masked_lm.py
    loss, dlogits = classification_loss(logits, labels)         # the bert_glue tutorial's head
    loss, dpred   = regression_loss(predictions, targets)

Letters: B batch, P masked positions, V vocab, C classes.
"""

from __future__ import annotations

from engine.core.backend import array_module


def log_softmax(logits):
    """log p over the last axis, max-subtracted. [...,C] -> [...,C]"""
    xp = array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def sparse_cross_entropy(logits, labels):
    """-log softmax(logits)[label] per row, and d(loss_row)/d(logits) = softmax - onehot(label).
    [...,C], [...] ints -> ([...], [...,C])"""
    xp = array_module(logits)
    logp = log_softmax(logits)
    labels = xp.asarray(labels)
    losses = -xp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    grad = xp.exp(logp)
    xp.put_along_axis(grad, labels[..., None], xp.take_along_axis(grad, labels[..., None], axis=-1) - 1, axis=-1)
    return losses, grad


def mlm_loss(logits, label_ids, weights):
    """Model Garden's masked_lm loss: sum_p w_p * CE_p / sum_p w_p (0 when every weight is 0, as
    tf.math.divide_no_nan). Zero-padded positions carry weight 0. [B,P,V], [B,P], [B,P] ->
    (scalar, dlogits [B,P,V])"""
    xp = array_module(logits)
    weights = xp.asarray(weights, dtype=logits.dtype)
    losses, grad = sparse_cross_entropy(logits, label_ids)                     # [B,P], [B,P,V]
    denominator = weights.sum()
    if float(denominator) == 0.0:
        return logits.dtype.type(0.0), xp.zeros_like(logits)
    loss = (losses * weights).sum() / denominator
    return loss, grad * (weights / denominator)[..., None]


def classification_loss(logits, labels):
    """Mean sparse categorical cross-entropy from logits over the batch. [B,C], [B] -> (scalar, [B,C])"""
    losses, grad = sparse_cross_entropy(logits, labels)
    B = logits.shape[0]
    return losses.mean(), grad / logits.dtype.type(B)


def regression_loss(predictions, targets):
    """Mean squared error over the batch. [B,1] or [B], [B] -> (scalar, same shape as predictions)"""
    xp = array_module(predictions)
    targets = xp.asarray(targets, dtype=predictions.dtype).reshape(predictions.shape)
    diff = predictions - targets
    n = predictions.dtype.type(diff.size)
    return (diff * diff).sum() / n, diff * (predictions.dtype.type(2.0) / n)
