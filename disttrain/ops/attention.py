"""Causal multi-head self-attention as one op: softmax(q k^T / sqrt(d) + causal mask) v per head.

The input is the fused projection `qkv` (B, T, 3C) = [q | k | v], each C = heads * d wide, as a
Linear(C, 3C) makes it; the output is (B, T, C) with the heads side by side, ready for the output
projection. Heads are strided views of qkv and of the output, so no transposed copies are made: every
matrix product is one batched BLAS call reading and writing those views. The attention weights
P (B, H, T, T) are the only activation kept for backward. Softmax and its backward are fused kernels
that touch only the causal half of each row; without numba they are numpy passes over the masked rows.

Backward: dV = P^T dY; dP = dY V^T; dS = P * (dP - rowsum(P * dP)) / sqrt(d); dQ = dS K; dK = dS^T Q.
"""

from __future__ import annotations

import math

import numpy as np

from ..tensor import Tensor
from . import jit
from .node import _result, as_tensor


def causal_self_attention(qkv, heads: int) -> Tensor:
    """Causal self-attention of `qkv` (B, T, 3C) with `heads` heads of C / heads features -> (B, T, C)."""
    qkv = as_tensor(qkv)
    if qkv.ndim != 3 or qkv.shape[2] % 3:
        raise ValueError(f"causal_self_attention: qkv must be (batch, time, 3 * features), got shape {qkv.shape}")
    if qkv.dtype.kind != "f":
        raise TypeError(f"causal_self_attention: qkv must be float, got dtype {qkv.dtype}")
    batch, time, width = qkv.shape
    features = width // 3
    if not isinstance(heads, (int, np.integer)) or heads < 1 or features % heads:
        raise ValueError(f"causal_self_attention: {features} features do not split into heads = {heads!r} "
                         f"(features must be divisible by a positive head count)")
    data = np.ascontiguousarray(qkv.data)
    q, k, v = _heads(data, heads)
    scale = qkv.dtype.type(1.0 / math.sqrt(features // heads))
    bounds = _row_blocks(time)
    weights = np.empty((batch, heads, time, time), qkv.dtype)  # scores, then attention weights
    _lower_matmul(q, k.swapaxes(-1, -2), weights, bounds)
    _softmax_causal(weights, scale)  # also zeroes the never computed part above the diagonal blocks
    out = np.empty((batch, time, features), qkv.dtype)
    _rows_times_lower(weights, v, _head_view(out, heads), bounds)

    def backward(g):
        g_heads = _head_view(np.ascontiguousarray(g), heads)
        grad = np.empty_like(data)
        dq, dk, dv = _heads(grad, heads)
        _lower_transposed_times(weights, g_heads, dv, bounds)
        d_scores = np.empty_like(weights)
        _lower_matmul(g_heads, v.swapaxes(-1, -2), d_scores, bounds)
        _softmax_causal_backward(weights, d_scores, scale)
        _rows_times_lower(d_scores, k, dq, bounds)
        _lower_transposed_times(d_scores, q, dk, bounds)
        return (grad,)
    return _result(out, (qkv,), backward)


# The causal mask makes every product below half empty: in row block [lo, hi) of a (T, T) matrix only
# the columns before hi can be non-zero. With 4 row blocks each product does 10/16 of the full work
# (measured at batch 16 x 128, one thread: 6.5 ms a layer forward and backward with 1 block, 5.9 with 2,
# 5.5 with 4; 8 blocks make the products too small to gain more).
BLOCKS = 4


def _row_blocks(time: int) -> list:
    """[(lo, hi)] splitting range(time) into up to BLOCKS row blocks."""
    edges = sorted({round(time * i / BLOCKS) for i in range(BLOCKS + 1)})
    return list(zip(edges[:-1], edges[1:]))


def _lower_matmul(a, b, out, bounds) -> None:
    """out[..., lo:hi, :hi] = a[..., lo:hi, :] @ b[..., :, :hi] for each row block: the block lower
    triangle of a @ b, where (T, T) `out` is causal. The part above is left unwritten."""
    for lo, hi in bounds:
        np.matmul(a[..., lo:hi, :], b[..., :, :hi], out=out[..., lo:hi, :hi])


def _rows_times_lower(lower, b, out, bounds) -> None:
    """out = lower @ b for a causal (T, T) `lower` (zero above the diagonal; read only below the blocks)."""
    for lo, hi in bounds:
        np.matmul(lower[..., lo:hi, :hi], b[..., :hi, :], out=out[..., lo:hi, :])


def _lower_transposed_times(lower, b, out, bounds) -> None:
    """out = lower^T @ b for a causal (T, T) `lower`: rows lo:hi of the result need rows lo: of `lower`."""
    for lo, hi in bounds:
        np.matmul(lower[..., lo:, lo:hi].swapaxes(-1, -2), b[..., lo:, :], out=out[..., lo:hi, :])


def _heads(qkv: np.ndarray, heads: int) -> tuple:
    """(q, k, v) views (B, H, T, d) of a contiguous (B, T, 3C) array."""
    batch, time, width = qkv.shape
    split = qkv.reshape(batch, time, 3, heads, width // (3 * heads))
    return tuple(split[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def _head_view(array: np.ndarray, heads: int) -> np.ndarray:
    """A view (B, H, T, d) of a contiguous (B, T, C) array."""
    batch, time, features = array.shape
    return array.reshape(batch, time, heads, features // heads).transpose(0, 2, 1, 3)


def _softmax_causal(scores: np.ndarray, scale) -> None:
    """In place over (..., T, T) scores: row i becomes softmax(scale * scores[i, :i+1]), then zeros."""
    rows = scores.reshape(-1, scores.shape[-2], scores.shape[-1])
    kernels = _kernels()
    if kernels is not None:
        kernels.softmax(rows, scale)
        return
    upper = np.triu(np.ones(rows.shape[1:], dtype=bool), 1)
    rows[:, upper] = -np.inf  # first: the part above the diagonal blocks was never written
    rows *= scale
    rows -= rows.max(axis=-1, keepdims=True)
    np.exp(rows, out=rows)
    rows /= rows.sum(axis=-1, keepdims=True)


def _softmax_causal_backward(weights: np.ndarray, d_weights: np.ndarray, scale) -> None:
    """In place: d_weights (the gradient of the attention weights) becomes that of the raw scores."""
    p = weights.reshape(-1, weights.shape[-2], weights.shape[-1])
    dp = d_weights.reshape(p.shape)
    kernels = _kernels()
    if kernels is not None:
        kernels.softmax_backward(p, dp, scale)
        return
    dp[:, np.triu(np.ones(p.shape[1:], dtype=bool), 1)] = 0  # never written above the diagonal blocks
    dp -= np.einsum("gij,gij->gi", p, dp)[..., None]
    dp *= p
    dp *= scale


@jit.kernels
def _kernels(numba):
    """Causal softmax forward and backward, one pass per row over its first i + 1 entries."""
    from types import SimpleNamespace

    exp = jit.math_kernels(numba).exp

    @jit.jit(numba)
    def softmax(s, scale):
        groups, t, _ = s.shape
        for g in range(groups):
            for i in range(t):
                row = s[g, i]
                peak = row[0]
                for j in range(1, i + 1):
                    peak = max(peak, row[j])
                total = scale - scale  # zero of the array's dtype
                for j in range(i + 1):
                    e = exp((row[j] - peak) * scale)
                    row[j] = e
                    total += e
                inverse = np.float32(1.0) / total
                for j in range(i + 1):
                    row[j] *= inverse
                row[i + 1:] = 0

    @jit.jit(numba)
    def softmax_backward(p, dp, scale):
        groups, t, _ = p.shape
        for g in range(groups):
            for i in range(t):
                dot = scale - scale
                for j in range(i + 1):
                    dot += p[g, i, j] * dp[g, i, j]
                for j in range(i + 1):
                    dp[g, i, j] = p[g, i, j] * (dp[g, i, j] - dot) * scale
                dp[g, i, i + 1:] = 0

    return SimpleNamespace(softmax=softmax, softmax_backward=softmax_backward)
