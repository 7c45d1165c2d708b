"""+ - * /, negation, power by a number, matrix products and the fused linear layer."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor
from .node import _broadcast_error, _leaf_grad, _pair, _result, as_tensor, unbroadcast


def add(a, b) -> Tensor:
    a, b = _pair(a, b, "add")
    try:
        data = a.data + b.data
    except ValueError:
        raise _broadcast_error("add", a, b) from None

    def backward(g):
        return unbroadcast(g, a.shape), unbroadcast(g, b.shape)
    return _result(data, (a, b), backward)


def sub(a, b) -> Tensor:
    a, b = _pair(a, b, "sub")
    try:
        data = a.data - b.data
    except ValueError:
        raise _broadcast_error("sub", a, b) from None

    def backward(g):
        return unbroadcast(g, a.shape), (unbroadcast(-g, b.shape) if b.requires_grad else None)
    return _result(data, (a, b), backward)


def mul(a, b) -> Tensor:
    a, b = _pair(a, b, "mul")
    try:
        data = a.data * b.data
    except ValueError:
        raise _broadcast_error("mul", a, b) from None

    def backward(g):
        ga = unbroadcast(g * b.data, a.shape) if a.requires_grad else None
        gb = unbroadcast(g * a.data, b.shape) if b.requires_grad else None
        return ga, gb
    return _result(data, (a, b), backward)


def div(a, b) -> Tensor:
    a, b = _pair(a, b, "div")
    try:
        data = a.data / b.data
    except ValueError:
        raise _broadcast_error("div", a, b) from None

    def backward(g):
        ga = unbroadcast(g / b.data, a.shape) if a.requires_grad else None
        gb = unbroadcast(-g * data / b.data, b.shape) if b.requires_grad else None
        return ga, gb
    return _result(data, (a, b), backward)


def neg(a: Tensor) -> Tensor:
    a = as_tensor(a)
    return _result(-a.data, (a,), lambda g: (-g,))


def power(a: Tensor, exponent: float) -> Tensor:
    """a ** exponent for a number `exponent` (the gradient of a ** 0 is 0 everywhere, 0 included)."""
    if isinstance(exponent, Tensor):
        raise TypeError("power: the exponent must be a number, not a Tensor")
    a = as_tensor(a)
    exponent = float(exponent)
    data = a.data ** a.data.dtype.type(exponent)

    def backward(g):
        if exponent == 0.0:  # 0 * a ** -1 would be 0 * inf = NaN at a = 0
            return (np.zeros(a.shape, dtype=a.dtype),)
        return (g * (exponent * a.data ** a.data.dtype.type(exponent - 1.0)),)
    return _result(data, (a,), backward)


def matmul(a, b) -> Tensor:
    """Matrix product with numpy's rules: 1-D vectors, 2-D matrices, and batched (broadcast) stacks."""
    a, b = _pair(a, b, "matmul")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape}: scalars cannot be matrix-multiplied")
    inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != inner_b:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match "
                         f"(inner dimensions {a.shape[-1]} and {inner_b})")
    try:
        data = a.data @ b.data
    except ValueError:
        raise _broadcast_error("matmul", a, b) from None

    def backward(g):
        a2 = a.data if a.ndim > 1 else a.data[None, :]
        b2 = b.data if b.ndim > 1 else b.data[:, None]
        # put back the unit axes numpy dropped for 1-D operands (g may be 0-d for vector @ vector)
        g2 = g.reshape(np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]) + (a2.shape[-2], b2.shape[-1]))
        ga = unbroadcast(g2 @ np.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape) if a.requires_grad else None
        gb = unbroadcast(np.swapaxes(a2, -1, -2) @ g2, b2.shape).reshape(b.shape) if b.requires_grad else None
        return ga, gb
    return _result(data, (a, b), backward)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias for weight (out, in), bias (out,): one node, no temporaries.

    x is (..., in): (in,), (batch, in) or (batch, T, in); the output is (..., out). Leading axes are
    folded into one batch axis, a view for the usual 2-D (and any contiguous) input. An array `x`
    takes the weight's dtype.
    """
    weight = as_tensor(weight)
    x = as_tensor(x, weight)
    bias = None if bias is None else as_tensor(bias, weight)
    if x.ndim == 0 or weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input shape {x.shape} does not fit weight shape {weight.shape} "
                         f"(expected (..., {weight.shape[1] if weight.ndim == 2 else '?'}))")
    if x.dtype != weight.dtype:
        raise TypeError(f"linear: input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    _check_bias("linear", weight, bias)
    out_features = weight.shape[0]
    rows = x.data.reshape(-1, weight.shape[1])
    data = rows @ weight.data.T
    if bias is not None:
        data += bias.data

    def backward(g):
        g_rows = g.reshape(-1, out_features)
        gx = (g_rows @ weight.data).reshape(x.shape) if x.requires_grad else None
        gw = _leaf_grad(weight, lambda out: np.matmul(g_rows.T, rows, out=out))
        gb = _leaf_grad(bias, lambda out: np.sum(g_rows, axis=0, out=out)) if bias is not None else None
        return gx, gw, gb
    parents = (x, weight) if bias is None else (x, weight, bias)
    return _result(data.reshape(x.shape[:-1] + (out_features,)), parents, backward)


def _check_bias(op: str, weight: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        return
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias shape {bias.shape} does not fit weight shape {weight.shape} "
                         f"(expected ({weight.shape[0]},))")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{op}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
