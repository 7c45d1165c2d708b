"""Losses: fused softmax cross-entropy on integer labels, and mean squared error."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor
from . import jit
from .arithmetic import mul, sub
from .node import _result, as_tensor
from .reductions import mean, sum


def _check_labels(logits: Tensor, labels: np.ndarray) -> np.ndarray:
    if logits.ndim < 2:
        raise ValueError(f"cross_entropy: logits must be (batch, classes) or (batch, ..., classes), "
                         f"got shape {logits.shape}")
    labels = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise ValueError(f"cross_entropy: labels must be integers, got dtype {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: labels shape {labels.shape} does not match logits shape "
                         f"{logits.shape} (expected {logits.shape[:-1]})")
    classes = logits.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)].flat[0]
        raise ValueError(f"cross_entropy: label {int(bad)} is out of range for {classes} classes "
                         f"(allowed 0..{classes - 1})")
    return labels


def cross_entropy(logits: Tensor, labels, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of logits (..., classes) against integer labels of shape logits.shape[:-1]:
    (batch, classes) with (batch,), or (batch, time, vocab) with (batch, time).

    `reduction` is "mean" (over every labelled position) or "sum". Forward and backward are fused: only
    each row's log-normaliser is kept, and the gradient (softmax - onehot) * scale is made in one pass
    over the logits, without a one-hot matrix (a numba kernel per row when numba is installed).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = as_tensor(logits)
    labels = _check_labels(logits, labels)
    if labels.size == 0:
        raise ValueError("cross_entropy of an empty batch")
    rows = np.ascontiguousarray(logits.data.reshape(-1, logits.shape[-1]))
    targets = labels.reshape(-1).astype(np.intp, copy=False)
    kernels = _kernels()
    if kernels is not None:
        losses, log_norm = np.empty(len(rows), rows.dtype), np.empty(len(rows), rows.dtype)
        kernels.forward(rows, targets, losses, log_norm)
    else:
        peak = rows.max(axis=1, keepdims=True)
        log_norm = (np.log(np.exp(rows - peak).sum(axis=1, keepdims=True)) + peak)[:, 0]
        losses = log_norm - rows[np.arange(len(rows)), targets]
    scale = logits.dtype.type(1.0 / len(rows) if reduction == "mean" else 1.0)
    data = np.asarray(losses.sum() * scale, dtype=logits.dtype)

    def backward(g):
        step = logits.dtype.type(g * scale)
        if kernels is not None:
            grad = np.empty_like(rows)
            kernels.backward(rows, targets, log_norm, step, grad)
        else:
            grad = np.exp(rows - log_norm[:, None])
            grad[np.arange(len(rows)), targets] -= 1
            grad *= step
        return (grad.reshape(logits.shape),)
    return _result(data, (logits,), backward)


@jit.kernels
def _kernels(numba):
    """Softmax cross-entropy row by row: loss and log-normaliser per row; gradient per row."""
    from types import SimpleNamespace

    exp = jit.math_kernels(numba).exp

    @jit.jit(numba)
    def forward(rows, targets, losses, log_norm):
        n, classes = rows.shape
        for i in range(n):
            peak = rows[i, 0]
            for j in range(1, classes):
                peak = max(peak, rows[i, j])
            total = np.float32(0.0)
            for j in range(classes):
                total += exp(rows[i, j] - peak)
            log_norm[i] = peak + np.log(total)
            losses[i] = log_norm[i] - rows[i, targets[i]]

    @jit.jit(numba)
    def backward(rows, targets, log_norm, step, grad):
        n, classes = rows.shape
        for i in range(n):
            for j in range(classes):
                grad[i, j] = exp(rows[i, j] - log_norm[i]) * step
            grad[i, targets[i]] -= step

    return SimpleNamespace(forward=forward, backward=backward)


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
