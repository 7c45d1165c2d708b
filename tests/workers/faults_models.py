"""A user model (`model.name = "faults_models:fixed"`) whose sizes are fixed, whatever the data says."""

from disttrain import nn


def fixed(input_shape, classes, inputs=8, outputs=3):
    return nn.Sequential(nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, outputs))


def no_input_shape(classes, hidden=8):
    """A factory that forgot the input_shape= keyword."""
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, classes))
