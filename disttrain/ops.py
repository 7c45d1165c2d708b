"""Differentiable operations: each op's forward and its backward side by side, in plain numpy.

Every op takes Tensors (or numbers, which become constants of the other operand's dtype), computes
the output array, and — when grad is enabled and an input requires grad — records a `backward(g)`
that returns one gradient per input (None for inputs that need none). Backward functions never write
into `g`: it may be a read-only broadcast view. Dtypes never change silently: mixing float32 and
float64 tensors is a TypeError, and numbers take the tensor's dtype.
"""

from __future__ import annotations

import builtins

import numpy as np

from . import tensor as _tensor
from .tensor import Tensor


# ------------------------------------------------------------------------------------------ plumbing
def _result(data: np.ndarray, parents: tuple, backward) -> Tensor:
    out = Tensor.__new__(Tensor)
    out.data = data
    out.grad = None
    out._grad_view = None
    out._flat = None
    out.name = None
    if _tensor._grad_enabled and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out._parents = parents
        out._backward = backward
    else:
        out.requires_grad = False
        out._parents = ()
        out._backward = None
    return out


def _tensor_of(value, like: Tensor | None = None) -> Tensor:
    if isinstance(value, Tensor):
        return value
    dtype = like.dtype if like is not None and like.dtype.kind == "f" else None
    return Tensor(value, dtype=dtype)


def _pair(a, b, op: str) -> tuple:
    """Both operands as Tensors of one float dtype (numbers and integer arrays adopt the float one)."""
    a_is, b_is = isinstance(a, Tensor), isinstance(b, Tensor)
    a = a if a_is else _tensor_of(a, b if b_is else None)
    b = b if b_is else _tensor_of(b, a)
    if a.dtype != b.dtype:
        a_float, b_float = a.dtype.kind == "f", b.dtype.kind == "f"
        if a_float and b_float:
            raise TypeError(f"{op}: dtypes {a.dtype} and {b.dtype} differ; convert one explicitly "
                            f"(disttrain never upcasts to float64 silently)")
        if a_float:
            b = Tensor(b.data.astype(a.dtype))
        elif b_float:
            a = Tensor(a.data.astype(b.dtype))
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


# ---------------------------------------------------------------------------------------- arithmetic
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
    return _result(-a.data, (a,), lambda g: (-g,))


def power(a: Tensor, exponent: float) -> Tensor:
    """a ** exponent for a number `exponent`."""
    if isinstance(exponent, Tensor):
        raise TypeError("power: the exponent must be a number, not a Tensor")
    exponent = float(exponent)
    data = a.data ** a.data.dtype.type(exponent)

    def backward(g):
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
    """x @ weight.T + bias for x (batch, in), weight (out, in), bias (out,): one node, no temporaries."""
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: input shape {x.shape} does not fit weight shape {weight.shape} "
                         f"(expected (batch, {weight.shape[1] if weight.ndim == 2 else '?'}))")
    if x.dtype != weight.dtype:
        raise TypeError(f"linear: input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    _check_bias("linear", weight, bias)
    data = x.data @ weight.data.T
    if bias is not None:
        data += bias.data

    def backward(g):
        gx = g @ weight.data if x.requires_grad else None
        gw = _leaf_grad(weight, lambda out: np.matmul(g.T, x.data, out=out))
        gb = _leaf_grad(bias, lambda out: np.sum(g, axis=0, out=out)) if bias is not None else None
        return gx, gw, gb
    parents = (x, weight) if bias is None else (x, weight, bias)
    return _result(data, parents, backward)


def _leaf_grad(leaf: Tensor, compute):
    """The gradient `compute(out)` makes for `leaf`, or None if it needs none.

    When `leaf` is a parameter with a flat-buffer gradient view and no gradient yet, the result is
    written straight into that view (no temporary, no copy) and becomes `leaf.grad`; None is returned
    so the engine adds nothing more. Otherwise the gradient is returned for the engine to accumulate.
    """
    if not leaf.requires_grad:
        return None
    view = leaf._grad_view
    if view is not None and leaf.grad is None and leaf._backward is None:
        compute(view)
        leaf.grad = view
        return None
    return compute(None)


def _check_bias(op: str, weight: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        return
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias shape {bias.shape} does not fit weight shape {weight.shape} "
                         f"(expected ({weight.shape[0]},))")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{op}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")


# ---------------------------------------------------------------------------------------- reductions
def _axes(axis, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for ax in axes:
        if not -ndim <= ax < builtins.max(ndim, 1):
            raise ValueError(f"axis {ax} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(ax % builtins.max(ndim, 1) for ax in axes))


def _expand_reduced(g: np.ndarray, shape: tuple, axes: tuple, keepdims: bool) -> np.ndarray:
    if not keepdims:
        g = np.expand_dims(g, axes) if axes else g
    return g


def sum(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - mirrors numpy
    axes = _axes(axis, a.ndim)
    data = np.sum(a.data, axis=axes, keepdims=keepdims)

    def backward(g):
        return (np.broadcast_to(_expand_reduced(g, a.shape, axes, keepdims), a.shape),)
    return _result(np.asarray(data), (a,), backward)


def mean(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    axes = _axes(axis, a.ndim)
    count = 1
    for ax in axes:
        count *= a.shape[ax]
    if count == 0:
        raise ValueError(f"mean over an empty axis of a tensor with shape {a.shape}")
    # integer tensors (never part of the graph) average in float32, not in their own truncating type
    source = a.data if a.dtype.kind == "f" else a.data.astype(_tensor.DEFAULT_FLOAT)
    scale = source.dtype.type(1.0 / count)
    data = np.asarray(np.sum(source, axis=axes, keepdims=keepdims) * scale)

    def backward(g):
        return (np.broadcast_to(_expand_reduced(g * scale, a.shape, axes, keepdims), a.shape),)
    return _result(data, (a,), backward)


def max(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - mirrors numpy
    """Maximum over `axis`; the gradient is shared equally among tied maxima."""
    axes = _axes(axis, a.ndim)
    if a.size == 0:
        raise ValueError(f"max of an empty tensor with shape {a.shape}")
    kept = np.max(a.data, axis=axes, keepdims=True)
    data = kept if keepdims else np.squeeze(kept, axis=axes)

    def backward(g):
        mask = (a.data == kept)
        ties = mask.sum(axis=axes, keepdims=True).astype(a.dtype)
        return (mask * (_expand_reduced(g, a.shape, axes, keepdims) / ties),)
    return _result(np.asarray(data), (a,), backward)


def logsumexp(a: Tensor, axis=-1, keepdims: bool = False) -> Tensor:
    axes = _axes(axis, a.ndim)
    peak = np.max(a.data, axis=axes, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    kept = np.log(np.sum(np.exp(a.data - peak), axis=axes, keepdims=True)) + peak
    data = kept if keepdims else np.squeeze(kept, axis=axes)

    def backward(g):
        return (np.exp(a.data - kept) * _expand_reduced(g, a.shape, axes, keepdims),)
    return _result(np.asarray(data), (a,), backward)


# ------------------------------------------------------------------------------------------- shaping
def reshape(a: Tensor, *shape) -> Tensor:
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    try:
        data = a.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape shape {a.shape} ({a.size} elements) to {shape}") from None
    return _result(data, (a,), lambda g: (g.reshape(a.shape),))


def permute(a: Tensor, *axes) -> Tensor:
    axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    if sorted(ax % builtins.max(a.ndim, 1) for ax in axes) != list(range(a.ndim)):
        raise ValueError(f"permute: axes {axes} are not a permutation of the {a.ndim} axes of shape {a.shape}")
    inverse = np.argsort([ax % a.ndim for ax in axes])
    return _result(a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),))


def transpose(a: Tensor, axis0: int = -2, axis1: int = -1) -> Tensor:
    """Swap two axes (the last two by default)."""
    if a.ndim < 2:
        return permute(a, tuple(range(a.ndim)))
    axes = list(range(a.ndim))
    axes[axis0], axes[axis1] = axes[axis1], axes[axis0]
    return permute(a, axes)


def broadcast_to(a: Tensor, shape: tuple) -> Tensor:
    shape = tuple(shape)
    try:
        data = np.broadcast_to(a.data, shape)
    except ValueError:
        raise ValueError(f"broadcast_to: shape {a.shape} cannot be broadcast to {shape}") from None
    return _result(data, (a,), lambda g: (unbroadcast(g, a.shape),))


def getitem(a: Tensor, key) -> Tensor:
    """a[key]: integer, slice, integer array or tuple of these (gradients of repeated indices add up)."""
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
    tensors = [_tensor_of(t, like) for t in tensors]
    floats = sorted({str(t.dtype) for t in tensors if t.dtype.kind == "f"})
    if len(floats) > 1:
        raise TypeError(f"{op}: dtypes {floats} differ; convert one explicitly "
                        f"(disttrain never upcasts to float64 silently)")
    if floats:  # integer items adopt the float dtype, as in binary ops
        tensors = [t if str(t.dtype) == floats[0] else Tensor(t.data, dtype=floats[0]) for t in tensors]
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


# ----------------------------------------------------------------------------------------- pointwise
def exp(a: Tensor) -> Tensor:
    data = np.exp(a.data)
    return _result(data, (a,), lambda g: (g * data,))


def log(a: Tensor) -> Tensor:
    return _result(np.log(a.data), (a,), lambda g: (g / a.data,))


def sqrt(a: Tensor) -> Tensor:
    data = np.sqrt(a.data)
    return _result(data, (a,), lambda g: (g / (data + data),))


def relu(a: Tensor) -> Tensor:
    data = np.maximum(a.data, 0)
    return _result(data, (a,), lambda g: (g * (data > 0),))


def tanh(a: Tensor) -> Tensor:
    data = np.tanh(a.data)
    return _result(data, (a,), lambda g: (g * (1 - data * data),))


def sigmoid(a: Tensor) -> Tensor:
    # split by sign so exp never overflows
    x = a.data
    z = np.exp(-np.abs(x))
    data = np.where(x >= 0, 1 / (1 + z), z / (1 + z)).astype(x.dtype, copy=False)
    return _result(data, (a,), lambda g: (g * data * (1 - data),))


_GELU_C = 0.7978845608028654  # sqrt(2 / pi)


def gelu(a: Tensor) -> Tensor:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
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
    shifted = a.data - np.max(a.data, axis=axis, keepdims=True)
    e = np.exp(shifted)
    data = e / np.sum(e, axis=axis, keepdims=True)

    def backward(g):
        return (data * (g - np.sum(g * data, axis=axis, keepdims=True)),)
    return _result(data, (a,), backward)


def log_softmax(a: Tensor, axis: int = -1) -> Tensor:
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


# ---------------------------------------------------------------------------------------- images
def _pair_arg(value, name: str) -> tuple:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """2-D convolution (cross-correlation) by im2col: x (N, C, H, W), weight (O, C, kh, kw) -> (N, O, OH, OW)."""
    if x.ndim != 4 or weight.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d: input shape {x.shape} does not fit weight shape {weight.shape} "
                         f"(expected input (N, {weight.shape[1] if weight.ndim == 4 else 'C'}, H, W))")
    if x.dtype != weight.dtype:
        raise TypeError(f"conv2d: input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    _check_bias("conv2d", weight, bias)
    sh, sw = _pair_arg(stride, "stride")
    ph, pw = _pair_arg(padding, "padding")
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"conv2d: kernel {kh}x{kw} is larger than the padded input {h + 2 * ph}x{w + 2 * pw}")
    padded = np.pad(x.data, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x.data
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    # (N, C, OH, OW, kh, kw) -> rows (N*OH*OW) of patches (C*kh*kw)
    cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
    w_mat = weight.data.reshape(o, c * kh * kw)
    out = cols @ w_mat.T
    if bias is not None:
        out += bias.data
    data = out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)

    def backward(g):
        g_rows = g.transpose(0, 2, 3, 1).reshape(n * oh * ow, o)
        gw = _leaf_grad(weight, lambda out: np.matmul(
            g_rows.T, cols, out=None if out is None else out.reshape(o, c * kh * kw)).reshape(weight.shape))
        gb = _leaf_grad(bias, lambda out: np.sum(g_rows, axis=0, out=out)) if bias is not None else None
        gx = None
        if x.requires_grad:
            g_cols = (g_rows @ w_mat).reshape(n, oh, ow, c, kh, kw)
            g_padded = np.zeros(padded.shape, dtype=x.dtype)
            for i in range(kh):
                for j in range(kw):
                    g_padded[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += g_cols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
            gx = g_padded[:, :, ph:ph + h, pw:pw + w]
        return gx, gw, gb
    parents = (x, weight) if bias is None else (x, weight, bias)
    return _result(np.ascontiguousarray(data), parents, backward)


def max_pool2d(x: Tensor, kernel_size=2, stride=None) -> Tensor:
    """Max over kh x kw windows of x (N, C, H, W); stride defaults to the kernel size."""
    if x.ndim != 4:
        raise ValueError(f"max_pool2d: input must be (N, C, H, W), got shape {x.shape}")
    kh, kw = _pair_arg(kernel_size, "kernel_size")
    sh, sw = _pair_arg(stride if stride is not None else (kh, kw), "stride")
    n, c, h, w = x.shape
    if kh > h or kw > w:
        raise ValueError(f"max_pool2d: kernel {kh}x{kw} is larger than the input {h}x{w}")
    windows = np.lib.stride_tricks.sliding_window_view(x.data, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    oh, ow = windows.shape[2], windows.shape[3]
    flat = windows.reshape(n, c, oh, ow, kh * kw)
    winner = flat.argmax(axis=-1)
    data = np.take_along_axis(flat, winner[..., None], axis=-1)[..., 0]

    def backward(g):
        gx = np.zeros(x.shape, dtype=x.dtype)
        for k in range(kh * kw):
            i, j = divmod(k, kw)
            gx[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += g * (winner == k)
        return (gx,)
    return _result(np.ascontiguousarray(data), (x,), backward)


# -------------------------------------------------------------------------------------------- losses
def _check_labels(logits: Tensor, labels: np.ndarray) -> np.ndarray:
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (batch, classes), got shape {logits.shape}")
    labels = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise ValueError(f"cross_entropy: labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy: labels shape {labels.shape} does not match logits shape "
                         f"{logits.shape} (expected ({logits.shape[0]},))")
    classes = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise ValueError(f"cross_entropy: label {int(bad)} is out of range for {classes} classes "
                         f"(allowed 0..{classes - 1})")
    return labels


def cross_entropy(logits: Tensor, labels, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of logits (batch, classes) against integer labels (batch,).

    `reduction` is "mean" (over the batch) or "sum". Forward and backward are fused: the gradient is
    (softmax - onehot) / batch, computed without materialising a one-hot matrix.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    labels = _check_labels(logits, labels)
    batch = logits.shape[0]
    if batch == 0:
        raise ValueError("cross_entropy of an empty batch")
    shifted = logits.data - logits.data.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(batch)
    losses = log_norm - shifted[rows, labels]
    scale = logits.dtype.type(1.0 / batch if reduction == "mean" else 1.0)
    data = np.asarray(losses.sum() * scale, dtype=logits.dtype)

    def backward(g):
        probs = np.exp(shifted - log_norm[:, None])
        probs[rows, labels] -= 1
        probs *= g * scale
        return (probs,)
    return _result(data, (logits,), backward)


def mse_loss(prediction: Tensor, target, reduction: str = "mean") -> Tensor:
    """Mean (or sum) of squared differences; `target` must have the prediction's shape."""
    target = _tensor_of(target, prediction)
    if target.shape != prediction.shape:
        raise ValueError(f"mse_loss: prediction shape {prediction.shape} and target shape {target.shape} differ")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"mse_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    diff = sub(prediction, target)
    squared = mul(diff, diff)
    return mean(squared) if reduction == "mean" else sum(squared)


# ------------------------------------------------------------------------------- Tensor's interface
def _reflected(op):
    return lambda self, other: op(other, self)


Tensor.__add__ = add
Tensor.__radd__ = _reflected(add)
Tensor.__sub__ = sub
Tensor.__rsub__ = _reflected(sub)
Tensor.__mul__ = mul
Tensor.__rmul__ = _reflected(mul)
Tensor.__truediv__ = div
Tensor.__rtruediv__ = _reflected(div)
Tensor.__neg__ = neg
Tensor.__pow__ = power
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = _reflected(matmul)
Tensor.__getitem__ = getitem
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.logsumexp = logsumexp
Tensor.reshape = reshape
Tensor.permute = permute
Tensor.transpose = transpose
Tensor.T = property(lambda self: transpose(self))
Tensor.broadcast_to = broadcast_to
Tensor.exp = exp
Tensor.log = log
Tensor.sqrt = sqrt
Tensor.relu = relu
Tensor.tanh = tanh
Tensor.sigmoid = sigmoid
Tensor.gelu = gelu
Tensor.softmax = softmax
Tensor.log_softmax = log_softmax
Tensor.flatten = lambda self, start_dim=1: reshape(self, self.shape[:start_dim] + (-1,))
