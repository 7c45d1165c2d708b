"""Built-in models named by the [model] config section, and loading a user's `module:callable`."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys

import numpy as np

from . import nn, ops

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


class Reshape(nn.Module):
    """(N, ...) -> (N, *shape)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        return ops.reshape(x, (x.shape[0], *self.shape))


def mlp(input_shape, classes: int, hidden=(128,), activation: str = "relu", dropout: float = 0.0, rng=None):
    """Flatten -> [Linear -> activation -> (Dropout)] per hidden width -> Linear(classes)."""
    width = int(np.prod(input_shape))
    layers = [nn.Flatten()]
    for size in hidden:
        layers += [nn.Linear(width, size, rng=rng), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, classes, rng=rng))
    return nn.Sequential(*layers)


def cnn(input_shape, classes: int, channels=(16, 32), hidden=(64,), rng=None):
    """Two blocks of 3x3 conv (padding 1) -> ReLU -> 2x2 max-pool, then [Linear -> ReLU] per width in
    `hidden` (an int is one width; empty for none) -> Linear(classes).

    `input_shape` is (C, H, W) or (H, W) for one channel; H and W must be divisible by 4. The ReLU and
    the pooling of each block are one layer, MaxPool2d(2, relu=True): the same function and gradients
    as ReLU() then MaxPool2d(2), without two full-size passes (measured 9% of a Fashion-MNIST step).
    The layers are Reshape, Conv2d, MaxPool2d, Conv2d, MaxPool2d, Flatten, then the Linear layers.
    """
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
        raise ValueError(f"cnn: input shape {tuple(input_shape)} must be (C, H, W) with H and W divisible by 4")
    if len(channels) != 2:
        raise ValueError(f"cnn: model.channels must list 2 widths, got {list(channels)}")
    hidden = [hidden] if isinstance(hidden, (int, np.integer)) else list(hidden)
    c1, c2 = channels
    layers = [Reshape(shape),
              nn.Conv2d(shape[0], c1, 3, padding=1, rng=rng), nn.MaxPool2d(2, relu=True),
              nn.Conv2d(c1, c2, 3, padding=1, rng=rng), nn.MaxPool2d(2, relu=True), nn.Flatten()]
    width = c2 * (shape[1] // 4) * (shape[2] // 4)
    for size in hidden:
        layers += [nn.Linear(width, size, rng=rng), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, classes, rng=rng))
    return nn.Sequential(*layers)


def gpt(section: dict, rng=None) -> nn.Module:
    """The GPT (disttrain/transformer.py) that the [model] keys vocab, n_layer, n_head, n_embd,
    block_size, dropout and tie_embeddings describe."""
    from .transformer import GPT

    return GPT(vocab=section["vocab"], n_layer=section["n_layer"], n_head=section["n_head"],
               n_embd=section["n_embd"], block_size=section["block_size"], dropout=section["dropout"],
               tie_embeddings=section["tie_embeddings"], rng=rng)


def user_callable(spec: str):
    """The object named by 'module:attribute', importable from the working directory."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"model.name = {spec!r}: expected 'module:callable'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"model.name = {spec!r}: cannot import module {module_name!r} from "
                         f"{os.getcwd()}: {error}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"model.name = {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None


def build_model(section: dict, input_shape, classes: int, rng=None) -> nn.Module:
    """The model the validated [model] section describes, for samples of `input_shape` (a gpt takes
    its sizes from the section alone)."""
    name = section["name"]
    if name == "mlp":
        return mlp(input_shape, classes, section["hidden"], section["activation"], section["dropout"], rng)
    if name == "cnn":
        return cnn(input_shape, classes, section["channels"], section["hidden"], rng)
    if name == "gpt":
        return gpt(section, rng)
    factory = user_callable(name)
    check_factory_accepts(factory, name, section["options"])
    model = factory(input_shape=tuple(input_shape), classes=classes, **section["options"])
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.name = {name!r} returned a {type(model).__name__}, not a disttrain.nn.Module")
    return model


def check_factory_accepts(factory, spec: str, options: dict) -> None:
    """Raise ConfigError unless `factory` can be called with input_shape=, classes= and every key of
    model.options as keyword arguments (a factory with **kwargs accepts any). A callable whose
    signature Python cannot read (some built-ins) is not checked."""
    from .config import ConfigError

    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    missing = [name for name in ("input_shape", "classes") if name not in accepted]
    if missing:
        raise ConfigError(f"model.name = {spec!r}: the callable must accept the keyword arguments input_shape= and "
                          f"classes= (or **kwargs); its parameters are ({', '.join(accepted)})")
    for key in options:
        if key not in accepted:
            others = [name for name in accepted if name not in ("input_shape", "classes")]
            close = difflib.get_close_matches(key, others, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"model.options.{key} is not a parameter of {spec}{hint}; it accepts "
                              f"{', '.join(others) if others else 'no options'} (besides input_shape and classes)")
