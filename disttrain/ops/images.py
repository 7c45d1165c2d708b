"""2-D convolution (by im2col) and max-pooling over (N, C, H, W) tensors."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor
from .arithmetic import _check_bias
from .node import _leaf_grad, _result, as_tensor


def _pair_arg(value, name: str) -> tuple:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """2-D convolution (cross-correlation) by im2col: x (N, C, H, W), weight (O, C, kh, kw) -> (N, O, OH, OW).

    An array `x` takes the weight's dtype."""
    weight = as_tensor(weight)
    x = as_tensor(x, weight)
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
    x = as_tensor(x)
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
