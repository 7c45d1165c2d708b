"""Elementwise functions: exp, log, sqrt, relu, tanh, sigmoid, gelu, dropout, softmax/log_softmax, where."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor
from . import jit
from .node import _pair, _result, as_tensor, unbroadcast


def exp(a: Tensor) -> Tensor:
    a = as_tensor(a)
    data = np.exp(a.data)
    return _result(data, (a,), lambda g: (g * data,))


def log(a: Tensor) -> Tensor:
    a = as_tensor(a)
    return _result(np.log(a.data), (a,), lambda g: (g / a.data,))


def sqrt(a: Tensor) -> Tensor:
    a = as_tensor(a)
    data = np.sqrt(a.data)
    return _result(data, (a,), lambda g: (g / (data + data),))


def relu(a: Tensor) -> Tensor:
    a = as_tensor(a)
    data = np.maximum(a.data, 0)
    return _result(data, (a,), lambda g: (g * (data > 0),))


def tanh(a: Tensor) -> Tensor:
    a = as_tensor(a)
    data = np.tanh(a.data)
    return _result(data, (a,), lambda g: (g * (1 - data * data),))


def sigmoid(a: Tensor) -> Tensor:
    a = as_tensor(a)
    # split by sign so exp never overflows
    x = a.data
    z = np.exp(-np.abs(x))
    data = np.where(x >= 0, 1 / (1 + z), z / (1 + z)).astype(x.dtype, copy=False)
    return _result(data, (a,), lambda g: (g * data * (1 - data),))


_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_K = 0.044715


def gelu(a: Tensor) -> Tensor:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    With numba, forward and backward are one pass each through the equal form x * sigmoid(2u),
    u = sqrt(2/pi) (x + 0.044715 x^3), keeping the sigmoid for backward; else numpy passes keeping tanh(u).
    """
    a = as_tensor(a)
    x = a.data
    kernels = _kernels() if x.dtype.kind == "f" and x.size else None
    if kernels is not None:
        flat = np.ascontiguousarray(x).reshape(-1)
        gate, data = np.empty_like(flat), np.empty_like(flat)
        c, k = x.dtype.type(_GELU_C), x.dtype.type(_GELU_K)
        kernels.gelu(flat, c, k, gate, data)

        def fused_backward(g):
            grad = np.empty_like(flat)
            kernels.gelu_backward(np.ascontiguousarray(g).reshape(-1), flat, gate, c, k, grad)
            return (grad.reshape(x.shape),)
        return _result(data.reshape(x.shape), (a,), fused_backward)
    c = x.dtype.type(_GELU_C)
    k = x.dtype.type(_GELU_K)
    inner = np.tanh(c * (x + k * x * x * x))
    data = 0.5 * x * (1 + inner)

    def backward(g):
        d_inner = (1 - inner * inner) * c * (1 + 3 * k * x * x)
        return (g * (0.5 * (1 + inner) + 0.5 * x * d_inner),)
    return _result(data, (a,), backward)


def dropout(a: Tensor, p: float, rng: np.random.Generator) -> Tensor:
    """Zero each element with probability `p` (drawn from `rng`) and scale the rest by 1 / (1 - p), so
    the expectation is unchanged; the same mask scales the gradient. 0 <= p < 1."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    a = as_tensor(a)
    if p == 0.0:
        return a
    keep = rng.random(a.shape, dtype=np.float32) >= np.float32(p)
    scale = a.dtype.type(1.0 / (1.0 - p))
    data = a.data * keep
    data *= scale

    def backward(g):
        grad = g * keep
        grad *= scale
        return (grad,)
    return _result(data, (a,), backward)


@jit.kernels
def _kernels(numba):
    """GELU forward and backward, each one vectorised pass."""
    from types import SimpleNamespace

    exp = jit.math_kernels(numba).exp

    @jit.jit(numba)
    def gelu(x, c, k, gate, y):
        for i in range(x.size):
            xi = x[i]
            u = c * (xi + k * xi * xi * xi)
            s = np.float32(1.0) / (np.float32(1.0) + exp(np.float32(-2.0) * u))
            gate[i] = s
            y[i] = xi * s

    @jit.jit(numba)
    def gelu_backward(g, x, gate, c, k, grad):
        for i in range(x.size):
            xi, s = x[i], gate[i]
            du = np.float32(2.0) * c * (np.float32(1.0) + np.float32(3.0) * k * xi * xi)
            grad[i] = g[i] * (s + xi * s * (np.float32(1.0) - s) * du)

    return SimpleNamespace(gelu=gelu, gelu_backward=gelu_backward)


def softmax(a: Tensor, axis: int = -1) -> Tensor:
    a = as_tensor(a)
    shifted = a.data - np.max(a.data, axis=axis, keepdims=True)
    e = np.exp(shifted)
    data = e / np.sum(e, axis=axis, keepdims=True)

    def backward(g):
        return (data * (g - np.sum(g * data, axis=axis, keepdims=True)),)
    return _result(data, (a,), backward)


def log_softmax(a: Tensor, axis: int = -1) -> Tensor:
    a = as_tensor(a)
    shifted = a.data - np.max(a.data, axis=axis, keepdims=True)
    data = shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))

    def backward(g):
        return (g - np.exp(data) * np.sum(g, axis=axis, keepdims=True),)
    return _result(data, (a,), backward)


def where(condition, a, b) -> Tensor:
    """Elementwise choice: a where `condition` (a boolean array) is true, else b."""
    a, b = _pair(a, b, "where")
    cond = np.asarray(condition.data if isinstance(condition, Tensor) else condition, dtype=bool)
    try:
        data = np.where(cond, a.data, b.data)
    except ValueError:
        raise ValueError(f"where: condition shape {cond.shape} and shapes {a.shape} and {b.shape} "
                         f"cannot be broadcast together") from None

    def backward(g):
        ga = unbroadcast(np.where(cond, g, 0), a.shape) if a.requires_grad else None
        gb = unbroadcast(np.where(cond, 0, g), b.shape) if b.requires_grad else None
        return ga, gb
    return _result(data, (a, b), backward)
