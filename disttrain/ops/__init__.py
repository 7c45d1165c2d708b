"""Differentiable operations: each op's forward and its backward side by side, in numpy.

Every op takes Tensors (or numbers, which become constants of the other operand's dtype), computes
the output array, and — when grad is enabled and an input requires grad — records a `backward(g)`
that returns one gradient per input (None for inputs that need none). Backward functions never write
into `g`: it may be a read-only broadcast view. Dtypes never change silently: mixing float32 and
float64 tensors is a TypeError, and numbers take the tensor's dtype.

The operations live in one module per kind: node (how an op joins the graph), arithmetic, reductions,
shaping, pointwise, images (with its loops in windows and its reusable work arrays in buffers), losses,
normalization, attention, embedding. A few fuse their passes into numba kernels when numba is installed
(jit holds the machinery). This package re-exports them all and binds them to Tensor as methods and
operators.
"""

from __future__ import annotations

from .. import allocator
from ..tensor import Tensor
from .arithmetic import add, div, linear, matmul, mul, neg, power, sub
from .attention import causal_self_attention
from .embedding import embedding
from .images import conv2d, max_pool2d
from .losses import cross_entropy, mse_loss
from .node import as_tensor, unbroadcast
from .normalization import layer_norm
from .pointwise import dropout, exp, gelu, log, log_softmax, relu, sigmoid, softmax, sqrt, tanh, where
from .reductions import logsumexp, max, mean, sum  # noqa: A004 - mirror numpy's names
from .shaping import broadcast_to, concatenate, getitem, permute, reshape, stack, transpose

__all__ = ["add", "sub", "mul", "div", "neg", "power", "matmul", "linear", "sum", "mean", "max", "logsumexp",
           "reshape", "permute", "transpose", "broadcast_to", "getitem", "concatenate", "stack", "exp", "log",
           "sqrt", "relu", "tanh", "sigmoid", "gelu", "softmax", "log_softmax", "where", "conv2d", "max_pool2d",
           "cross_entropy", "mse_loss", "as_tensor", "unbroadcast", "layer_norm", "causal_self_attention",
           "embedding", "dropout"]

allocator.keep_freed_memory()  # a step's large activations come back from malloc without page faults


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
Tensor.matmul = matmul
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
