"""2-D convolution (by im2col and one GEMM) and max-pooling over (N, C, H, W) tensors.

Both ops work channels-last inside: they read their input as an (N, H, W, C) array (a free view when
the input came from another of these ops, one transposing copy otherwise) and return (N, C, H, W)
Tensors whose data is a transposed view of an (N, H, W, C) array, so a stack of conv and pool layers
never transposes images between them. Elementwise ops keep that memory order (numpy's order='K'), and
`reshape` copies into (N, C, H, W) order where it must (Flatten). See ops/windows.py for the loops.
"""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor, is_grad_enabled
from . import windows
from .arithmetic import _check_bias
from .buffers import BufferPool
from .node import _leaf_grad, _result, as_tensor

# Arrays that live until a backward pass (patches, outputs, gradient images) come from here while a
# graph is being recorded: a training step then reuses the previous step's memory (see buffers.py).
# Without a graph (evaluation) they are plain allocations that go when the batch goes.
work_arrays = BufferPool()


def _pair_arg(value, name: str) -> tuple:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def channels_last(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> a C-contiguous (N, H, W, C) array: a view when the memory is already in that
    order (the output of conv2d or max_pool2d), else a copy."""
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def _channels_first(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> the (N, C, H, W) view of the same memory."""
    return images.transpose(0, 3, 1, 2)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """2-D convolution (cross-correlation): x (N, C, H, W), weight (O, C, kh, kw) -> (N, O, OH, OW),
    OH = (H + 2 padding - kh) // stride + 1 (likewise OW); zero padding. An array `x` takes the
    weight's dtype. The output's memory is channels-last (see the module docstring)."""
    weight = as_tensor(weight)
    x = as_tensor(x, weight)
    if x.ndim != 4 or weight.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d: input shape {x.shape} does not fit weight shape {weight.shape} "
                         f"(expected input (N, {weight.shape[1] if weight.ndim == 4 else 'C'}, H, W))")
    if x.dtype != weight.dtype:
        raise TypeError(f"conv2d: input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    _check_bias("conv2d", weight, bias)
    stride, padding = _pair_arg(stride, "stride"), _pair_arg(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"conv2d: stride must be >= 1 and padding >= 0, got stride {stride}, padding {padding}")
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = windows.output_size(h, kh, stride[0], padding[0]), windows.output_size(w, kw, stride[1], padding[1])
    if oh <= 0 or ow <= 0:
        raise ValueError(f"conv2d: kernel {kh}x{kw} is larger than the padded input "
                         f"{h + 2 * padding[0]}x{w + 2 * padding[1]}")
    empty = _allocator(x, weight, bias)
    cols = windows.im2col(channels_last(x.data), (kh, kw), stride, padding, empty)
    rows = cols.reshape(n * oh * ow, kh * kw * c)
    # the weight with its taps ordered as the patches are: (O, kh, kw, C)
    w_rows = np.ascontiguousarray(weight.data.transpose(0, 2, 3, 1)).reshape(o, kh * kw * c)
    out = np.matmul(rows, w_rows.T, out=empty((n * oh * ow, o), rows.dtype))
    if bias is not None:  # added image by image: numpy's broadcast over rows of O values is slow
        images = out.reshape(n, oh * ow * o)
        images += np.tile(bias.data, oh * ow)

    def backward(g):
        g_rows = channels_last(g).reshape(n * oh * ow, o)
        gw = _leaf_grad(weight, lambda into: _weight_grad(g_rows, rows, (o, kh, kw, c), into))
        gb = _leaf_grad(bias, lambda into: _bias_grad(g_rows, into)) if bias is not None else None
        gx = None
        if x.requires_grad:
            g_cols = np.matmul(g_rows, w_rows, out=work_arrays.empty(rows.shape, rows.dtype))
            gx = _channels_first(windows.col2im(g_cols.reshape(cols.shape), (n, h, w, c), stride, padding,
                                                work_arrays.empty))
        return gx, gw, gb
    parents = (x, weight) if bias is None else (x, weight, bias)
    return _result(_channels_first(out.reshape(n, oh, ow, o)), parents, backward)


def _allocator(*inputs):
    """work_arrays.empty when this op will be part of a recorded graph, else np.empty."""
    recording = is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return work_arrays.empty if recording else np.empty


def _weight_grad(g_rows, rows, taps_shape, into):
    """g_rows.T @ rows, (O, kh*kw*C) in tap order, as an (O, C, kh, kw) array (written into `into` if given)."""
    o, kh, kw, c = taps_shape
    if c == 1 and into is not None:  # (kh, kw, 1) and (1, kh, kw) are the same order: no reordering
        np.matmul(g_rows.T, rows, out=into.reshape(o, kh * kw))
        return into
    grad = (g_rows.T @ rows).reshape(taps_shape).transpose(0, 3, 1, 2)
    if into is None:
        return np.ascontiguousarray(grad)
    into[...] = grad
    return into


def _bias_grad(g_rows, into):
    """The column sums of g_rows (M, O), as a matrix-vector product: numpy's sum over axis 0 of a tall,
    narrow matrix runs one short row at a time, several times slower."""
    ones = np.ones(g_rows.shape[0], g_rows.dtype)
    return np.matmul(ones, g_rows, out=into)


def max_pool2d(x: Tensor, kernel_size=2, stride=None, relu: bool = False) -> Tensor:
    """Max over kh x kw windows of x (N, C, H, W); stride defaults to the kernel size. The gradient
    goes to the first maximum of each window (row-major), as in PyTorch. The output's memory is
    channels-last (see the module docstring).

    relu=True gives max(0, window max) in the same pass: ReLU then max-pooling (or max-pooling then
    ReLU, the same function with the same gradients) without the two full-size passes of a separate
    ReLU and its backward. The gradient of a window whose max is not > 0 is zero."""
    x = as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"max_pool2d: input must be (N, C, H, W), got shape {x.shape}")
    kernel = _pair_arg(kernel_size, "kernel_size")
    stride = _pair_arg(stride if stride is not None else kernel, "stride")
    n, c, h, w = x.shape
    if min(kernel) < 1 or min(stride) < 1:
        raise ValueError(f"max_pool2d: kernel_size and stride must be >= 1, got {kernel} and {stride}")
    if kernel[0] > h or kernel[1] > w:
        raise ValueError(f"max_pool2d: kernel {kernel[0]}x{kernel[1]} is larger than the input {h}x{w}")
    if kernel[0] * kernel[1] >= windows.NO_WINNER:
        raise ValueError(f"max_pool2d: kernel {kernel[0]}x{kernel[1]} has more than {windows.NO_WINNER - 1} elements")
    best, winner = windows.max_pool(channels_last(x.data), kernel, stride, _allocator(x), bool(relu))

    def backward(g):
        image = windows.max_pool_backward(channels_last(g), winner, (n, h, w, c), kernel, stride,
                                          work_arrays.empty)
        return (_channels_first(image),)
    return _result(_channels_first(best), (x,), backward)
