"""Tensor: a numpy array that remembers how it was made, and reverse-mode autograd over that graph.

A Tensor holds `data` (a numpy array, float32 unless asked otherwise), and, when it takes part in
autograd, the tensors it was computed from (`_parents`) and a `_backward` function that maps the
gradient of the output to the gradients of those parents. `backward()` walks the graph once in
reverse topological order. Only leaves (tensors made by the user, such as parameters) keep `.grad`.

The operations themselves live in `ops.py`; this file only binds them as methods and operators.
"""

from __future__ import annotations

import contextlib

import numpy as np

_grad_enabled = True

DEFAULT_FLOAT = np.float32


def is_grad_enabled() -> bool:
    """True unless inside a `no_grad()` block."""
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Context in which operations record no graph (evaluation, optimizer updates)."""
    global _grad_enabled
    previous = _grad_enabled
    _grad_enabled = False
    try:
        yield
    finally:
        _grad_enabled = previous


def as_array(data, dtype=None) -> np.ndarray:
    """`data` as a numpy array: float data becomes float32 unless `dtype` says otherwise."""
    if dtype is not None:
        return np.asarray(data, dtype=dtype)
    array = np.asarray(data)
    if array.dtype.kind == "f" and array.dtype != DEFAULT_FLOAT:
        if isinstance(data, np.ndarray) and data.dtype == np.float16:
            return array
        return array.astype(DEFAULT_FLOAT)
    if array.dtype.kind in "iub" and not isinstance(data, (np.ndarray, np.generic, list, tuple)):
        # a bare Python number used as data is a float value, not an index
        return array.astype(DEFAULT_FLOAT)
    return array


class Tensor:
    """An n-dimensional array with reverse-mode autograd.

    `Tensor(data, requires_grad=False, dtype=None)`: float data is stored as float32 unless `dtype` is
    given (float64 is only for numerical gradient checks); integer data keeps its integer dtype.
    `.grad` is None until `backward()` reaches this tensor; it always has this tensor's shape and dtype.
    """

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "_grad_view", "_flat", "name",
                 "__weakref__")
    __array_priority__ = 1000  # so `ndarray + Tensor` calls Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        self.data = as_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise ValueError(f"requires_grad=True needs a float tensor, got dtype {self.data.dtype}")
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._parents = ()
        self._backward = None
        self._grad_view = None  # set when the gradient must land in a view of a flat buffer
        self._flat = None  # the FlatParameters whose buffer `data` is a view of, if any
        self.name = None

    # ----------------------------------------------------------------------------------------- basics
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def numpy(self) -> np.ndarray:
        """The underlying array (not a copy)."""
        return self.data

    def __array__(self, dtype=None, copy=None):
        """np.asarray(tensor) is its data (converted only if a dtype is asked for)."""
        return self.data if dtype is None else self.data.astype(dtype, copy=bool(copy))

    def item(self):
        return self.data.item()

    def detach(self) -> "Tensor":
        """A tensor sharing this data (same array, same dtype) but cut from the graph."""
        return Tensor(self.data, dtype=self.data.dtype)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{flag})"

    # --------------------------------------------------------------------------------------- autograd
    def backward(self, out_grad=None) -> None:
        """Accumulate d(self)/d(leaf) * out_grad into `.grad` of every leaf that requires grad.

        `out_grad` defaults to 1 for a scalar; a non-scalar tensor needs it (same shape as self).
        Gradients from several uses of a tensor add up; they keep each leaf's dtype.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (was it made under no_grad?)")
        if out_grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() without out_grad needs a scalar, got shape {self.shape}")
            seed = np.ones(self.shape, dtype=self.dtype)
        else:
            seed = np.asarray(out_grad.data if isinstance(out_grad, Tensor) else out_grad, dtype=self.dtype)
            if seed.shape != self.shape:
                seed = np.broadcast_to(seed, self.shape) if seed.size == 1 else seed
                if seed.shape != self.shape:
                    raise ValueError(f"out_grad shape {seed.shape} does not match tensor shape {self.shape}")
        grads = {id(self): seed}
        for node in _reverse_topological(self):
            grad = grads.pop(id(node), None)
            if grad is None:
                continue
            if node._backward is None:
                _accumulate_leaf(node, grad)
                continue
            for parent, parent_grad in zip(node._parents, node._backward(grad)):
                if parent_grad is None or not parent.requires_grad:
                    continue
                key = id(parent)
                earlier = grads.get(key)
                # never add in place: a backward may have returned a view of another gradient
                grads[key] = parent_grad if earlier is None else earlier + parent_grad

    # Operators and methods are attached at the bottom of ops.py, beside their definitions.


def _reverse_topological(root: Tensor) -> list:
    """Every tensor that requires grad and leads to `root`, outputs before their inputs."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()
    return order


def _accumulate_leaf(leaf: Tensor, grad: np.ndarray) -> None:
    if grad.shape != leaf.data.shape:
        raise ValueError(f"gradient shape {grad.shape} does not match parameter shape {leaf.data.shape}")
    if leaf.grad is None:
        if leaf._grad_view is not None:
            np.copyto(leaf._grad_view, grad, casting="same_kind")
            leaf.grad = leaf._grad_view
        else:
            leaf.grad = np.array(grad, dtype=leaf.data.dtype, copy=True, order="C")
    else:
        np.add(leaf.grad, grad, out=leaf.grad, casting="same_kind")
