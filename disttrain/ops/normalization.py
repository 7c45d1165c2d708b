"""Layer normalisation over the last axis, forward and backward each one fused pass over the rows.

y = (x - mean) / sqrt(var + eps) * weight + bias, with the mean and (biased) variance of each row.
Only the per-row mean and 1/std are kept for backward, which recomputes the normalised rows from x.
With numba each pass is one kernel over the rows; without it, a few whole-array numpy passes.
"""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor
from . import jit
from .node import _leaf_grad, _result, as_tensor


def layer_norm(x, weight, bias, eps: float = 1e-5) -> Tensor:
    """LayerNorm of `x` (..., C) over its last axis with `weight` and `bias` of shape (C,); same shape out."""
    weight = as_tensor(weight)
    bias = as_tensor(bias, weight)
    x = as_tensor(x, weight)
    features = weight.shape[0] if weight.ndim == 1 else None
    if features is None or bias.shape != weight.shape:
        raise ValueError(f"layer_norm: weight and bias must both be (C,), got {weight.shape} and {bias.shape}")
    if x.ndim == 0 or x.shape[-1] != features:
        raise ValueError(f"layer_norm: input shape {x.shape} does not end in {features} features")
    if x.dtype != weight.dtype or bias.dtype != weight.dtype:
        raise TypeError(f"layer_norm: dtypes {x.dtype}, {weight.dtype}, {bias.dtype} differ")
    if not eps > 0:
        raise ValueError(f"layer_norm: eps must be > 0, got {eps}")
    rows = np.ascontiguousarray(x.data.reshape(-1, features))
    eps = x.dtype.type(eps)
    kernels = _kernels()
    if kernels is not None and rows.size:
        y, mean, rstd = np.empty_like(rows), np.empty(len(rows), rows.dtype), np.empty(len(rows), rows.dtype)
        kernels.forward(rows, weight.data, bias.data, eps, x.dtype.type(1.0 / features), y, mean, rstd)
    else:
        y, mean, rstd = _forward_numpy(rows, weight.data, bias.data, eps)

    def backward(g):
        g_rows = np.ascontiguousarray(g.reshape(-1, features))
        dx, dw_parts, db_parts = _backward(g_rows, rows, mean, rstd, weight.data)
        gw = _leaf_grad(weight, lambda out: np.sum(dw_parts, axis=0, out=out))
        gb = _leaf_grad(bias, lambda out: np.sum(db_parts, axis=0, out=out))
        return dx.reshape(x.shape) if x.requires_grad else None, gw, gb
    return _result(y.reshape(x.shape), (x, weight, bias), backward)


def _forward_numpy(rows, weight, bias, eps):
    mean = rows.mean(axis=1)
    centred = rows - mean[:, None]
    variance = np.einsum("ij,ij->i", centred, centred) * rows.dtype.type(1.0 / rows.shape[1])
    rstd = 1 / np.sqrt(variance + eps)
    centred *= rstd[:, None]
    centred *= weight
    centred += bias
    return centred, mean, rstd


def _backward(g, rows, mean, rstd, weight):
    """(dx, dweight parts, dbias parts): the parts are sums over blocks of rows, to be summed in order."""
    kernels = _kernels()
    if kernels is not None and rows.size:
        blocks = -(-len(rows) // jit.ROW_BLOCK)
        dx = np.empty_like(rows)
        dw_parts = np.empty((blocks, rows.shape[1]), rows.dtype)
        db_parts = np.empty((blocks, rows.shape[1]), rows.dtype)
        kernels.backward(g, rows, mean, rstd, weight, rows.dtype.type(1.0 / rows.shape[1]), dx, dw_parts, db_parts)
        return dx, dw_parts, db_parts
    normalised = (rows - mean[:, None]) * rstd[:, None]
    dw = np.einsum("ij,ij->j", g, normalised)[None]
    db = g.sum(axis=0)[None]
    d_norm = g * weight
    inv_c = rows.dtype.type(1.0 / rows.shape[1])
    s1 = d_norm.sum(axis=1, keepdims=True) * inv_c
    s2 = np.einsum("ij,ij->i", d_norm, normalised)[:, None] * inv_c
    d_norm -= s1
    normalised *= s2
    d_norm -= normalised
    d_norm *= rstd[:, None]
    return d_norm, dw, db


@jit.kernels
def _kernels(numba):
    """Layer-norm kernels, row by row."""
    from types import SimpleNamespace

    block = jit.ROW_BLOCK

    @jit.jit(numba)
    def forward(x, weight, bias, eps, inv_c, y, mean, rstd):
        n, c = x.shape
        for i in range(n):
            total = np.float32(0.0)
            for j in range(c):
                total += x[i, j]
            m = total * inv_c
            square = np.float32(0.0)
            for j in range(c):
                d = x[i, j] - m
                square += d * d
            r = np.float32(1.0) / np.sqrt(square * inv_c + eps)
            mean[i] = m
            rstd[i] = r
            for j in range(c):
                y[i, j] = (x[i, j] - m) * r * weight[j] + bias[j]

    @jit.jit(numba)
    def backward(g, x, mean, rstd, weight, inv_c, dx, dw_parts, db_parts):
        n, c = x.shape
        for b in range(dw_parts.shape[0]):
            dw_parts[b, :] = 0
            db_parts[b, :] = 0
            for i in range(b * block, min(n, (b + 1) * block)):
                m, r = mean[i], rstd[i]
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                for j in range(c):
                    normalised = (x[i, j] - m) * r
                    dw_parts[b, j] += g[i, j] * normalised
                    db_parts[b, j] += g[i, j]
                    d = g[i, j] * weight[j]
                    s1 += d
                    s2 += d * normalised
                s1 *= inv_c
                s2 *= inv_c
                for j in range(c):
                    dx[i, j] = (g[i, j] * weight[j] - s1 - (x[i, j] - m) * r * s2) * r

    return SimpleNamespace(forward=forward, backward=backward)
