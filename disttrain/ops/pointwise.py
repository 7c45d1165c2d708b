"""Elementwise functions: exp, log, sqrt, relu, tanh, sigmoid, gelu, softmax/log_softmax, where."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor
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


def gelu(a: Tensor) -> Tensor:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    a = as_tensor(a)
    x = a.data
    c = x.dtype.type(_GELU_C)
    k = x.dtype.type(0.044715)
    inner = np.tanh(c * (x + k * x * x * x))
    data = 0.5 * x * (1 + inner)

    def backward(g):
        d_inner = (1 - inner * inner) * c * (1 + 3 * k * x * x)
        return (g * (0.5 * (1 + inner) + 0.5 * x * d_inner),)
    return _result(data, (a,), backward)


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
