"""Tensor: a numpy array that remembers how it was made, and reverse-mode autograd over that graph.

A Tensor holds `data` (a numpy array, float32 unless asked otherwise), and, when it takes part in
autograd, the tensors it was computed from (`_parents`) and a `_backward` function that maps the
gradient of the output to the gradients of those parents. `backward()` walks the graph once in
reverse topological order. Only leaves (tensors made by the user, such as parameters) keep `.grad`,
a `Gradient`: a numpy array that also answers the Tensor-style `.data` and `.numpy()`. A leaf may carry
a `GradSlot`: preallocated storage for its gradient and a hook told when that gradient is complete
(data-parallel wrappers use it to gather gradients in one flat buffer and to start combining them
while backward still runs; the engine knows nothing of why).

The operations themselves live in the `ops` package, which also binds them as methods and operators.
"""

from __future__ import annotations

import contextlib

import numpy as np

_grad_enabled = True
_after_backward = []  # callbacks queued by hooks during the backward now running

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


def _made_from(array: np.ndarray, data) -> bool:
    """True when converting `data` made `array` afresh, so no one else holds its memory."""
    if isinstance(data, (list, tuple, int, float, complex, np.generic)):
        return True
    return isinstance(data, np.ndarray) and array is not data and array.flags.owndata


class Gradient(np.ndarray):
    """The array a leaf's `.grad` holds: a plain numpy array (same memory, no copy) that also reads like
    a Tensor, so seed/PyTorch-style code works: `p.grad.data` and `p.grad.numpy()` are the plain
    ndarray view of it (`p.data -= lr * p.grad.data`). Make one with `array.view(Gradient)`.
    """

    @property
    def data(self) -> np.ndarray:
        return self.view(np.ndarray)

    def numpy(self) -> np.ndarray:
        return self.view(np.ndarray)

    def __array_wrap__(self, array, context=None, return_scalar=False):
        # reductions (g.sum(), g.max()) give numpy scalars, as they do for a plain array (numpy >= 2
        # passes return_scalar; numpy 1.x takes only two arguments)
        if return_scalar:
            return array[()]
        return super().__array_wrap__(array, context)


class GradSlot:
    """Where a leaf's gradient goes, and who hears that it is complete.

    `buffer` is an array of the leaf's shape and dtype: the first gradient a backward brings the leaf
    is written into it and `leaf.grad` becomes a Gradient view of it (later ones add into it in place).
    `ready()` is called once per backward, after every contribution to the leaf has arrived, if the
    leaf has a gradient then. Subclasses override `ready`; the base class only stores.
    """

    __slots__ = ("buffer",)

    def __init__(self, buffer: np.ndarray):
        self.buffer = buffer

    def ready(self) -> None:
        """The leaf's gradient for this backward is complete (default: nothing to do)."""


class Tensor:
    """An n-dimensional array with reverse-mode autograd.

    `Tensor(data, requires_grad=False, dtype=None)` COPIES `data` (as torch.tensor does: nothing done to
    the tensor, an optimizer step included, changes the caller's array). Float data is stored as float32
    unless `dtype` is given (float64 is only for numerical gradient checks); integer data keeps its
    integer dtype, except that with requires_grad=True and no dtype it becomes float32.
    `Tensor.wrap(array)` is the no-copy path. `.grad` is None until `backward()` reaches this tensor;
    then it is a `Gradient` of this tensor's shape and dtype.
    """

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "grad_slot", "name", "__weakref__")
    __array_priority__ = 1000  # so `ndarray + Tensor` calls Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        array = as_array(data, dtype)
        if requires_grad and dtype is None and array.dtype.kind in "iub":
            array = array.astype(DEFAULT_FLOAT)  # a fresh array: no copy needed below
        elif not _made_from(array, data):
            array = array.copy()
        self._init(array, requires_grad)

    @classmethod
    def node(cls, data: np.ndarray, parents: tuple, backward) -> "Tensor":
        """The output of an operation: `data` (no copy), and, when grad is enabled and a parent requires
        grad, the graph edge back to `parents` through `backward(out_grad) -> one grad per parent`."""
        out = cls.__new__(cls)
        out._init(data, False)
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._parents = parents
            out._backward = backward
        return out

    @classmethod
    def wrap(cls, array, requires_grad: bool = False) -> "Tensor":
        """A Tensor whose `data` IS `array`: no copy and no dtype conversion (a numpy subclass is viewed
        as a plain ndarray). For internal use and for views that must stay views, such as slices of a
        flat parameter buffer; writes through the tensor (an optimizer step) change `array`."""
        tensor = cls.__new__(cls)
        tensor._init(np.asarray(array), requires_grad)
        return tensor

    def _init(self, array: np.ndarray, requires_grad: bool) -> None:
        if requires_grad and array.dtype.kind != "f":
            raise ValueError(f"requires_grad=True needs a float tensor, got dtype {array.dtype}")
        self.data = array
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._parents = ()
        self._backward = None
        self.grad_slot = None
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
        """A tensor sharing this data (same array, no copy) but cut from the graph."""
        return Tensor.wrap(self.data)

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
        _after_backward.clear()
        try:
            for node in _reverse_topological(self):
                grad = grads.pop(id(node), None)
                if node._backward is None:  # a leaf: every contribution has arrived (reverse topological order)
                    if grad is not None:
                        _accumulate_leaf(node, grad)
                    if node.grad_slot is not None and node.grad is not None:
                        node.grad_slot.ready()
                    continue
                if grad is None:
                    continue
                for parent, parent_grad in zip(node._parents, node._backward(grad)):
                    if parent_grad is None or not parent.requires_grad:
                        continue
                    key = id(parent)
                    earlier = grads.get(key)
                    # never add in place: a backward may have returned a view of another gradient
                    grads[key] = parent_grad if earlier is None else earlier + parent_grad
            while _after_backward:
                _after_backward.pop(0)()
        finally:
            _after_backward.clear()

    # Operators and methods are attached in ops/__init__.py.


def queue_callback(callback) -> None:
    """Run `callback()` once the backward now running has processed every node (for GradSlot hooks that
    must finish something per backward). Callbacks run in the order queued; an exception in backward
    drops them."""
    _after_backward.append(callback)


def _reverse_topological(root: Tensor) -> list:
    """Every tensor that requires grad and leads to `root`, each after every tensor computed from it
    (outputs before their inputs), and as early as that allows: a leaf comes right after its last
    consumer. So a parameter's gradient is complete, and its GradSlot says so, as soon as the ops that
    read it have run backward, while backward goes on through the earlier layers; gradient buckets
    are then combined during backward, not after it. (Kahn's algorithm, depth first.)"""
    consumers, stack, seen = {}, [root], {id(root)}
    while stack:
        for parent in stack.pop()._parents:
            if parent.requires_grad:
                consumers[id(parent)] = consumers.get(id(parent), 0) + 1
                if id(parent) not in seen:
                    seen.add(id(parent))
                    stack.append(parent)
    order, ready = [], [root]
    while ready:
        node = ready.pop()
        order.append(node)
        for parent in node._parents:
            if parent.requires_grad:
                consumers[id(parent)] -= 1
                if consumers[id(parent)] == 0:
                    ready.append(parent)
    return order


def as_gradient(array: np.ndarray) -> Gradient:
    """`array` as a Gradient: the same object if it is one, else a view of the same memory."""
    return array if isinstance(array, Gradient) else array.view(Gradient)


def _accumulate_leaf(leaf: Tensor, grad: np.ndarray) -> None:
    if grad.shape != leaf.data.shape:
        raise ValueError(f"gradient shape {grad.shape} does not match parameter shape {leaf.data.shape}")
    if leaf.grad is None:
        if leaf.grad_slot is not None:
            np.copyto(leaf.grad_slot.buffer, grad, casting="same_kind")
            leaf.grad = as_gradient(leaf.grad_slot.buffer)
        else:
            leaf.grad = np.array(grad, dtype=leaf.data.dtype, copy=True, order="C").view(Gradient)
    else:
        np.add(leaf.grad, grad, out=leaf.grad, casting="same_kind")
