"""Modules, parameters, layers, losses and initialisation.

A `Module` finds its parameters and submodules by looking at its attributes, and inside lists, tuples
and dicts held there (in the order they were assigned or inserted, so `parameters()` is the same on
every rank). Layers take Tensors or numpy arrays (float data becomes float32). They draw their
initial values from a `numpy.random.Generator`: the `rng=` argument, or the library-wide one that
`manual_seed(s)` resets.
"""

from __future__ import annotations

import math

import numpy as np

from . import ops
from .ops.images import _pair_arg
from .tensor import DEFAULT_FLOAT, Tensor, no_grad

_default_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> np.random.Generator:
    """Reset the library-wide generator that layers draw from when given no `rng=`; returns it."""
    global _default_rng
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _default_rng = np.random.default_rng(int(seed))
    return _default_rng


def default_rng() -> np.random.Generator:
    """The library-wide generator (see `manual_seed`)."""
    return _default_rng


def set_default_rng(rng: np.random.Generator) -> None:
    """Make `rng` the library-wide generator (the Trainer gives each rank its own dropout stream)."""
    global _default_rng
    _default_rng = rng


class Parameter(Tensor):
    """A leaf Tensor that a Module trains: float32 by default, requires_grad=True; `data` is copied."""

    __slots__ = ()

    def __init__(self, data, dtype=None):
        super().__init__(data, requires_grad=True, dtype=dtype or DEFAULT_FLOAT)


# --------------------------------------------------------------------------------------------- Module
class Module:
    """Base class of layers and models: subclasses set attributes in `__init__` and define `forward`.

    Parameters and submodules held as attributes, or inside lists, tuples and dicts held as attributes
    (at any depth), are discovered in assignment order, then list order or dict insertion order; they
    are named by the path to them ("heads.a.weight", "scales.0"). Buffers (non-trained state such as
    BatchNorm statistics) are the attributes named in `buffer_names`.
    """

    training = True
    buffer_names: tuple = ()
    _pre_forward_hooks: tuple = ()

    def __call__(self, *args, **kwargs):
        for hook in self._pre_forward_hooks:
            hook(self)
        return self.forward(*args, **kwargs)

    def register_pre_forward_hook(self, hook) -> None:
        """Call `hook(module)` before every forward of this module (e.g. to wait until its parameters
        have arrived from other ranks)."""
        self._pre_forward_hooks = (*self._pre_forward_hooks, hook)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    # --- discovery
    def named_children(self):
        """(name, module) for every direct submodule, in attribute order."""
        for name, value in _members(self):
            if isinstance(value, Module):
                yield name, value

    def modules(self):
        """This module and every module below it, depth first."""
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter) for every parameter, each once, in a deterministic order."""
        seen = set()
        for name, param in self._named_parameters(prefix):
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param

    def _named_parameters(self, prefix):
        for name, value in _members(self):
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child._named_parameters(f"{prefix}{name}.")

    def parameters(self) -> list:
        """Every Parameter, in the order of `named_parameters()`."""
        return [param for _, param in self.named_parameters()]

    def named_buffers(self, prefix: str = ""):
        for name in self.buffer_names:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}{name}.")

    # --- modes
    def train(self, mode: bool = True) -> "Module":
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None

    # --- state
    def state_dict(self) -> dict:
        """{name: array copy} of every parameter and buffer."""
        state = {name: param.data.copy() for name, param in self.named_parameters()}
        state.update({name: np.array(buffer, copy=True) for name, buffer in self.named_buffers()})
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy `state` into the parameters and buffers in place (flat-buffer views stay valid).

        With strict=True, missing, unexpected or mis-shaped keys raise one ValueError listing them all.
        """
        targets = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        expected = {name: t.data for name, t in targets.items()}
        expected.update(buffers)
        missing = [name for name in expected if name not in state]
        unexpected = [name for name in state if name not in expected]
        misshaped = [f"{name}: checkpoint {tuple(np.shape(state[name]))} vs model {expected[name].shape}"
                     for name in expected if name in state and tuple(np.shape(state[name])) != expected[name].shape]
        if misshaped or (strict and (missing or unexpected)):
            problems = []
            if missing:
                problems.append(f"missing keys {missing}")
            if unexpected:
                problems.append(f"unexpected keys {unexpected}")
            if misshaped:
                problems.append(f"mis-shaped keys [{'; '.join(misshaped)}]")
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + ", ".join(problems))
        for name, array in expected.items():
            if name in state:
                np.copyto(array, np.asarray(state[name]), casting="same_kind")


def _members(module: Module):
    """(dotted name, value) for each attribute of `module` and, inside lists, tuples and dicts held
    there, each item (named "attr.0", "attr.key"), in attribute, list and dict insertion order."""
    pending = list(reversed(vars(module).items()))
    while pending:
        name, value = pending.pop()
        if isinstance(value, (list, tuple)):
            pending.extend(reversed([(f"{name}.{i}", item) for i, item in enumerate(value)]))
        elif isinstance(value, dict):
            pending.extend(reversed([(f"{name}.{key}", item) for key, item in value.items()]))
        else:
            yield name, value


# ---------------------------------------------------------------------------------------------- init
def kaiming_uniform(shape: tuple, fan_in: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """U(-b, b) with b = sqrt(6 / fan_in): He initialisation for ReLU networks, float32."""
    bound = math.sqrt(6.0 / fan_in)
    return (rng or _default_rng).uniform(-bound, bound, size=shape).astype(DEFAULT_FLOAT)


# -------------------------------------------------------------------------------------------- layers
class Linear(Module):
    """y = x @ weight.T + bias; x (..., in_features) -> (..., out_features). weight is (out, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None):
        _check_positive(in_features=in_features, out_features=out_features)
        self.weight = Parameter(kaiming_uniform((out_features, in_features), in_features, rng))
        self.bias = Parameter(np.zeros(out_features, DEFAULT_FLOAT)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


class ReLU(Module):
    """max(x, 0) elementwise."""

    def forward(self, x):
        return ops.relu(x)


class Tanh(Module):
    """tanh elementwise."""

    def forward(self, x):
        return ops.tanh(x)


class Sigmoid(Module):
    """1 / (1 + exp(-x)) elementwise."""

    def forward(self, x):
        return ops.sigmoid(x)


class GELU(Module):
    """GELU (tanh approximation) elementwise."""

    def forward(self, x):
        return ops.gelu(x)


class Sequential(Module):
    """Applies its modules in order; their parameters are named by position ("0.weight", ...)."""

    def __init__(self, *layers: Module):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not a Module")
        self.layers = list(layers)

    def named_children(self):
        for i, layer in enumerate(self.layers):
            yield str(i), layer

    def __getitem__(self, index):
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Residual(Module):
    """x + module(x); the module must keep the shape."""

    def __init__(self, module: Module):
        self.module = module

    def forward(self, x):
        x = ops.as_tensor(x)
        return x + self.module(x)


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...)."""

    def forward(self, x):
        return ops.reshape(x, (x.shape[0], -1))


class Dropout(Module):
    """Zeroes each element with probability p in training (scaling the rest by 1/(1-p)); identity in eval."""

    def __init__(self, p: float = 0.5, rng=None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = rng

    def forward(self, x):
        x = ops.as_tensor(x)
        if not self.training or self.p == 0.0:
            return x
        return ops.dropout(x, self.p, self.rng or _default_rng)


class LayerNorm(Module):
    """Normalises the last axis of (..., dim) to zero mean and unit variance, then scales and shifts
    by the learned `weight` (ones) and `bias` (zeros); forward and backward are fused (ops.layer_norm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        _check_positive(dim=dim)
        self.eps = float(eps)
        self.weight = Parameter(np.ones(dim, DEFAULT_FLOAT))
        self.bias = Parameter(np.zeros(dim, DEFAULT_FLOAT))

    def forward(self, x):
        x = ops.as_tensor(x, self.weight)
        if x.ndim == 0 or x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"{type(self).__name__}: input shape {x.shape} does not end in {self.weight.shape[0]}")
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class LayerNorm1d(LayerNorm):
    """LayerNorm under its earlier name: normalises the last axis (any number of leading axes)."""


class BatchNorm1d(Module):
    """Normalises each feature over the batch (training) or by running statistics (eval).

    Input (batch, dim). In data-parallel training the batch statistics are those of this rank's part of
    the batch, as in PyTorch's BatchNorm without SyncBatchNorm.
    """

    buffer_names = ("running_mean", "running_var")

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1):
        _check_positive(dim=dim)
        self.eps, self.momentum = float(eps), float(momentum)
        self.weight = Parameter(np.ones(dim, DEFAULT_FLOAT))
        self.bias = Parameter(np.zeros(dim, DEFAULT_FLOAT))
        self.running_mean = np.zeros(dim, DEFAULT_FLOAT)
        self.running_var = np.ones(dim, DEFAULT_FLOAT)

    def forward(self, x):
        x = ops.as_tensor(x, self.weight)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"BatchNorm1d: input shape {x.shape}, expected (batch, {self.weight.shape[0]})")
        if self.training:
            batch_mean = ops.mean(x, axis=0, keepdims=True)
            centred = x - batch_mean
            variance = ops.mean(centred * centred, axis=0, keepdims=True)
            n = x.shape[0]
            with no_grad():
                m = np.float32(self.momentum)
                self.running_mean *= 1 - m
                self.running_mean += m * batch_mean.data[0]
                self.running_var *= 1 - m
                self.running_var += m * variance.data[0] * np.float32(n / max(n - 1, 1))
        else:
            centred = x - Tensor.wrap(self.running_mean)
            variance = Tensor.wrap(self.running_var)
        return centred / ops.sqrt(variance + self.eps) * self.weight + self.bias


class Conv2d(Module):
    """2-D convolution: (N, in_channels, H, W) -> (N, out_channels, OH, OW)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, rng=None):
        _check_positive(in_channels=in_channels, out_channels=out_channels)
        kh, kw = _pair_arg(kernel_size, "kernel_size")
        fan_in = in_channels * kh * kw
        self.weight = Parameter(kaiming_uniform((out_channels, in_channels, kh, kw), fan_in, rng))
        self.bias = Parameter(np.zeros(out_channels, DEFAULT_FLOAT)) if bias else None
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class MaxPool2d(Module):
    """Max over kernel_size windows, stride defaulting to the kernel size. relu=True rectifies in the
    same pass: MaxPool2d(2, relu=True) is ReLU() followed by MaxPool2d(2), at the cost of the pool alone."""

    def __init__(self, kernel_size=2, stride=None, relu: bool = False):
        self.kernel_size, self.stride, self.relu = kernel_size, stride, bool(relu)

    def forward(self, x):
        return ops.max_pool2d(x, self.kernel_size, self.stride, relu=self.relu)


class Embedding(Module):
    """Rows of a (num_embeddings, dim) table picked by integer indices of any shape -> indices.shape + (dim,).

    The table starts as N(0, std^2) (std=1 by default, as PyTorch's); its gradient is a scatter-add of
    the output gradient rows (ops.embedding)."""

    def __init__(self, num_embeddings: int, dim: int, rng=None, std: float = 1.0):
        _check_positive(num_embeddings=num_embeddings, dim=dim)
        table = (rng or _default_rng).standard_normal((num_embeddings, dim), dtype=np.float32)
        if std != 1.0:
            table *= np.float32(std)
        self.weight = Parameter(table)

    def forward(self, indices):
        return ops.embedding(self.weight, indices)


# -------------------------------------------------------------------------------------------- losses
class SoftmaxLoss(Module):
    """Softmax cross-entropy of logits (batch, classes) against integer labels, mean over the batch."""

    def __init__(self, reduction: str = "mean"):
        self.reduction = reduction

    def forward(self, logits, labels):
        return ops.cross_entropy(logits, labels, self.reduction)


CrossEntropyLoss = SoftmaxLoss


class MSELoss(Module):
    """Mean squared error between a prediction and a target of the same shape."""

    def __init__(self, reduction: str = "mean"):
        self.reduction = reduction

    def forward(self, prediction, target):
        return ops.mse_loss(prediction, target, self.reduction)


def _check_positive(**sizes) -> None:
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
