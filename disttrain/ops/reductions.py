"""sum, mean, max and logsumexp over axes, with keepdims (`axes=` is accepted as another name of `axis=`)."""

from __future__ import annotations

import builtins

import numpy as np

from ..tensor import DEFAULT_FLOAT, Tensor
from .node import _result, as_tensor


def _axes(axis, ndim: int, axes=None) -> tuple:
    if axes is not None:
        if axis is not None:
            raise TypeError("give the reduced axes as axis= or axes=, not both")
        axis = axes
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for ax in axes:
        if not -ndim <= ax < builtins.max(ndim, 1):
            raise ValueError(f"axis {ax} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(ax % builtins.max(ndim, 1) for ax in axes))


def _expand_reduced(g: np.ndarray, axes: tuple, keepdims: bool) -> np.ndarray:
    """A reduction's output gradient with the reduced `axes` put back as size-1 axes (if they were dropped)."""
    if not keepdims:
        g = np.expand_dims(g, axes) if axes else g
    return g


def sum(a: Tensor, axis=None, keepdims: bool = False, *, axes=None) -> Tensor:  # noqa: A001 - mirrors numpy
    a = as_tensor(a)
    axes = _axes(axis, a.ndim, axes)
    data = np.sum(a.data, axis=axes, keepdims=keepdims)

    def backward(g):
        return (np.broadcast_to(_expand_reduced(g, axes, keepdims), a.shape),)
    return _result(np.asarray(data), (a,), backward)


def mean(a: Tensor, axis=None, keepdims: bool = False, *, axes=None) -> Tensor:
    a = as_tensor(a)
    axes = _axes(axis, a.ndim, axes)
    count = 1
    for ax in axes:
        count *= a.shape[ax]
    if count == 0:
        raise ValueError(f"mean over an empty axis of a tensor with shape {a.shape}")
    # integer tensors (never part of the graph) average in float32, not in their own truncating type
    source = a.data if a.dtype.kind == "f" else a.data.astype(DEFAULT_FLOAT)
    scale = source.dtype.type(1.0 / count)
    data = np.asarray(np.sum(source, axis=axes, keepdims=keepdims) * scale)

    def backward(g):
        return (np.broadcast_to(_expand_reduced(g * scale, axes, keepdims), a.shape),)
    return _result(data, (a,), backward)


def max(a: Tensor, axis=None, keepdims: bool = False, *, axes=None) -> Tensor:  # noqa: A001 - mirrors numpy
    """Maximum over `axis`; the gradient is shared equally among tied maxima."""
    a = as_tensor(a)
    axes = _axes(axis, a.ndim, axes)
    if a.size == 0:
        raise ValueError(f"max of an empty tensor with shape {a.shape}")
    kept = np.max(a.data, axis=axes, keepdims=True)
    data = kept if keepdims else np.squeeze(kept, axis=axes)

    def backward(g):
        mask = (a.data == kept)
        ties = mask.sum(axis=axes, keepdims=True).astype(a.dtype)
        return (mask * (_expand_reduced(g, axes, keepdims) / ties),)
    return _result(np.asarray(data), (a,), backward)


def logsumexp(a: Tensor, axis=-1, keepdims: bool = False) -> Tensor:
    a = as_tensor(a)
    axes = _axes(axis, a.ndim)
    peak = np.max(a.data, axis=axes, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    kept = np.log(np.sum(np.exp(a.data - peak), axis=axes, keepdims=True)) + peak
    data = kept if keepdims else np.squeeze(kept, axis=axes)

    def backward(g):
        return (np.exp(a.data - kept) * _expand_reduced(g, axes, keepdims),)
    return _result(np.asarray(data), (a,), backward)
