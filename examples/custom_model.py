"""Train your own model with disttrain: write the model, the data and the loss; the Trainer does the rest.

    python examples/custom_model.py                  # one process
    mpiexec -n 2 python examples/custom_model.py     # two ranks, same result
"""
import numpy as np

import disttrain as dt
from disttrain.data import ArrayDataset
from disttrain.trainer import Trainer


class TwoMoonsNet(dt.nn.Module):
    def __init__(self, hidden=32):
        self.body = dt.nn.Sequential(dt.nn.Linear(2, hidden), dt.nn.Tanh(), dt.nn.Linear(hidden, hidden), dt.nn.Tanh())
        self.head = dt.nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.body(x))


def two_moons(count, rng):
    angle = rng.uniform(0, np.pi, count)
    label = rng.integers(0, 2, count)
    x = np.stack([np.cos(angle) + label, np.sin(angle) * (1 - 2 * label) + 0.5 * label], axis=1)
    return (x + rng.normal(0, 0.1, x.shape)).astype(np.float32), label


rng = np.random.default_rng(0)
train, test = ArrayDataset(*two_moons(2000, rng), "moons"), ArrayDataset(*two_moons(500, rng), "moons test")
dt.manual_seed(0)
trainer = Trainer(TwoMoonsNet(), train, dt.nn.SoftmaxLoss(), test, optimizer={"name": "adam", "lr": 0.01},
                  training={"epochs": 10, "batch_size": 100, "run_dir": "runs/custom", "log_every": 20})
summary = trainer.fit()
trainer.comm.print(f"test accuracy {summary['test_accuracy']:.3f}")  # rank 0 only
