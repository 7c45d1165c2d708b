"""A model whose gradient is NaN while its loss stays finite, for test_nonfinite_gradients.py (which
imports it, and copies it next to a config for the CLI: `model.name = "sqrt_features:build"`)."""

import numpy as np

from disttrain import nn


class SqrtFeatures(nn.Module):
    """head(sqrt(relu(x * scale))): finite for every input; the gradient of `scale` is NaN for a
    sample with a feature exactly 0 (d sqrt/dz = inf there, times relu's slope 0)."""

    def __init__(self, features: int, classes: int):
        self.scale = nn.Parameter(np.ones(features, np.float32))
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        return self.head((x * self.scale).relu().sqrt())


def build(input_shape, classes):
    """The CLI's model factory."""
    return SqrtFeatures(input_shape[0], classes)
