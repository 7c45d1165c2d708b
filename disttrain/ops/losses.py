"""Losses: fused softmax cross-entropy on integer labels, and mean squared error."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor
from .arithmetic import mul, sub
from .node import _result, as_tensor
from .reductions import mean, sum


def _check_labels(logits: Tensor, labels: np.ndarray) -> np.ndarray:
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (batch, classes), got shape {logits.shape}")
    labels = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise ValueError(f"cross_entropy: labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy: labels shape {labels.shape} does not match logits shape "
                         f"{logits.shape} (expected ({logits.shape[0]},))")
    classes = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise ValueError(f"cross_entropy: label {int(bad)} is out of range for {classes} classes "
                         f"(allowed 0..{classes - 1})")
    return labels


def cross_entropy(logits: Tensor, labels, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of logits (batch, classes) against integer labels (batch,).

    `reduction` is "mean" (over the batch) or "sum". Forward and backward are fused: the gradient is
    (softmax - onehot) / batch, computed without materialising a one-hot matrix.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = as_tensor(logits)
    labels = _check_labels(logits, labels)
    batch = logits.shape[0]
    if batch == 0:
        raise ValueError("cross_entropy of an empty batch")
    shifted = logits.data - logits.data.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(batch)
    losses = log_norm - shifted[rows, labels]
    scale = logits.dtype.type(1.0 / batch if reduction == "mean" else 1.0)
    data = np.asarray(losses.sum() * scale, dtype=logits.dtype)

    def backward(g):
        probs = np.exp(shifted - log_norm[:, None])
        probs[rows, labels] -= 1
        probs *= g * scale
        return (probs,)
    return _result(data, (logits,), backward)


def mse_loss(prediction: Tensor, target, reduction: str = "mean") -> Tensor:
    """Mean (or sum) of squared differences; `target` must have the prediction's shape."""
    prediction = as_tensor(prediction)
    target = as_tensor(target, prediction)
    if target.shape != prediction.shape:
        raise ValueError(f"mse_loss: prediction shape {prediction.shape} and target shape {target.shape} differ")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"mse_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    diff = sub(prediction, target)
    squared = mul(diff, diff)
    return mean(squared) if reduction == "mean" else sum(squared)
