"""How an operation becomes a node of the autograd graph: the output Tensor, its parents and its
backward; operands made Tensors of one dtype; gradients summed back over broadcast axes."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor, as_array, as_gradient


def _result(data: np.ndarray, parents: tuple, backward) -> Tensor:
    """The op's output Tensor over `data`, joined to the graph through `backward` (see Tensor.node)."""
    return Tensor.node(data, parents, backward)


def as_tensor(value, like: Tensor | None = None) -> Tensor:
    """`value` itself if it is a Tensor, else a constant Tensor of it: numbers and arrays take the float
    dtype of `like` if given, else the Tensor rules (float data -> float32). An array already of that
    dtype is used as it is, not copied: ops never write into their inputs."""
    if isinstance(value, Tensor):
        return value
    dtype = like.dtype if like is not None and like.dtype.kind == "f" else None
    return Tensor.wrap(as_array(value, dtype))


def _pair(a, b, op: str) -> tuple:
    """Both operands as Tensors of one float dtype (numbers and integer arrays adopt the float one)."""
    a_is, b_is = isinstance(a, Tensor), isinstance(b, Tensor)
    a = a if a_is else as_tensor(a, b if b_is else None)
    b = b if b_is else as_tensor(b, a)
    if a.dtype != b.dtype:
        a_float, b_float = a.dtype.kind == "f", b.dtype.kind == "f"
        if a_float and b_float:
            raise TypeError(f"{op}: dtypes {a.dtype} and {b.dtype} differ; convert one explicitly "
                            f"(disttrain never upcasts to float64 silently)")
        if a_float:
            b = Tensor.wrap(b.data.astype(a.dtype))
        elif b_float:
            a = Tensor.wrap(a.data.astype(b.dtype))
    return a, b


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum `grad` over the axes that broadcasting added or stretched, giving an array of `shape`."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1)
    summed = grad.sum(axis=axes, keepdims=True) if axes else grad
    return summed.reshape(shape)


def _broadcast_error(op: str, a: Tensor, b: Tensor) -> ValueError:
    return ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together")


def _leaf_grad(leaf: Tensor, compute):
    """The gradient `compute(out)` makes for `leaf`, or None if it needs none.

    When `leaf` is a leaf with a GradSlot and no gradient yet, the result is written straight into the
    slot's buffer (no temporary, no copy) and becomes `leaf.grad`; None is returned so the engine adds
    nothing more (it still calls the slot's ready() when it reaches the leaf). Otherwise the gradient
    is returned for the engine to accumulate. `compute(out)` writes into `out` if given, else returns
    a new array.
    """
    if not leaf.requires_grad:
        return None
    slot = leaf.grad_slot
    if slot is not None and leaf.grad is None and leaf._backward is None:
        compute(slot.buffer)
        leaf.grad = as_gradient(slot.buffer)
        return None
    return compute(None)
