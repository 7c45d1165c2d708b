"""reshape, permute/transpose, broadcast_to, indexing, concatenate and stack."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor
from .node import _result, as_tensor, unbroadcast


def reshape(a: Tensor, *shape) -> Tensor:
    a = as_tensor(a)
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    try:
        data = a.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape shape {a.shape} ({a.size} elements) to {shape}") from None
    return _result(data, (a,), lambda g: (g.reshape(a.shape),))


def permute(a: Tensor, *axes) -> Tensor:
    a = as_tensor(a)
    axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    if sorted(ax % max(a.ndim, 1) for ax in axes) != list(range(a.ndim)):
        raise ValueError(f"permute: axes {axes} are not a permutation of the {a.ndim} axes of shape {a.shape}")
    inverse = np.argsort([ax % a.ndim for ax in axes])
    return _result(a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),))


def transpose(a: Tensor, axis0=-2, axis1: int = -1) -> Tensor:
    """Swap two axes (the last two by default): `transpose(0, 2)` or `transpose((0, 2))`. A tuple naming
    every axis, as in numpy's `transpose((2, 0, 1))`, is a permutation instead."""
    a = as_tensor(a)
    if isinstance(axis0, (tuple, list)):
        if len(axis0) != 2 or a.ndim == 2:
            return permute(a, axis0)
        axis0, axis1 = axis0
    if a.ndim < 2:
        return permute(a, tuple(range(a.ndim)))
    axes = list(range(a.ndim))
    axes[axis0], axes[axis1] = axes[axis1], axes[axis0]
    return permute(a, axes)


def broadcast_to(a: Tensor, shape: tuple) -> Tensor:
    a = as_tensor(a)
    shape = tuple(shape)
    try:
        data = np.broadcast_to(a.data, shape)
    except ValueError:
        raise ValueError(f"broadcast_to: shape {a.shape} cannot be broadcast to {shape}") from None
    return _result(data, (a,), lambda g: (unbroadcast(g, a.shape),))


def getitem(a: Tensor, key) -> Tensor:
    """a[key]: integer, slice, integer array or tuple of these (gradients of repeated indices add up)."""
    a = as_tensor(a)
    if isinstance(key, Tensor):
        key = key.data
    elif isinstance(key, tuple):
        key = tuple(k.data if isinstance(k, Tensor) else k for k in key)
    try:
        data = a.data[key]
    except IndexError as error:
        raise IndexError(f"index {key!r} is out of range for shape {a.shape}: {error}") from None

    def backward(g):
        grad = np.zeros(a.shape, dtype=a.dtype)
        np.add.at(grad, key, g)
        return (grad,)
    return _result(np.asarray(data), (a,), backward)


def _same_dtype(tensors, op: str) -> list:
    """The items as Tensors of one dtype: numbers, arrays and integer items adopt the float dtype."""
    like = next((t for t in tensors if isinstance(t, Tensor) and t.dtype.kind == "f"), None)
    tensors = [as_tensor(t, like) for t in tensors]
    floats = sorted({str(t.dtype) for t in tensors if t.dtype.kind == "f"})
    if len(floats) > 1:
        raise TypeError(f"{op}: dtypes {floats} differ; convert one explicitly "
                        f"(disttrain never upcasts to float64 silently)")
    if floats:  # integer items adopt the float dtype, as in binary ops
        tensors = [t if str(t.dtype) == floats[0] else Tensor.wrap(t.data.astype(floats[0])) for t in tensors]
    return tensors


def concatenate(tensors, axis: int = 0) -> Tensor:
    tensors = _same_dtype(list(tensors), "concatenate")
    if not tensors:
        raise ValueError("concatenate needs at least one tensor")
    try:
        data = np.concatenate([t.data for t in tensors], axis=axis)
    except ValueError:
        raise ValueError(f"concatenate along axis {axis}: shapes {[t.shape for t in tensors]} do not fit") from None
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]

    def backward(g):
        return tuple(np.split(g, bounds, axis=axis))
    return _result(data, tuple(tensors), backward)


def stack(tensors, axis: int = 0) -> Tensor:
    tensors = _same_dtype(list(tensors), "stack")
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    try:
        data = np.stack([t.data for t in tensors], axis=axis)
    except ValueError:
        raise ValueError(f"stack: shapes {[t.shape for t in tensors]} must all be equal") from None

    def backward(g):
        return tuple(np.take(g, i, axis=axis) for i in range(len(tensors)))
    return _result(data, tuple(tensors), backward)
