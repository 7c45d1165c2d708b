"""The default example as a Python script: an MLP on the bundled 8x8 handwritten digits.

    python examples/digits_mlp.py                  # one process
    mpiexec -n 2 python examples/digits_mlp.py     # two ranks, same global batch, same result
(The same run from a config: disttrain train examples/digits_mlp.toml)
"""
import disttrain as dt
from disttrain.datasets.digits import read_digits
from disttrain.datasets import split_train_test
from disttrain.trainer import Trainer

images, labels = read_digits()  # (1797, 1, 8, 8) float32 in [0, 1], labels 0..9
train, test = split_train_test(images, labels, test_fraction=0.2, seed=0, name="digits")
dt.manual_seed(0)
model = dt.nn.Sequential(dt.nn.Flatten(), dt.nn.Linear(64, 128), dt.nn.ReLU(), dt.nn.Linear(128, 10))
trainer = Trainer(model, train, dt.nn.SoftmaxLoss(), test, optimizer={"name": "adam", "lr": 0.002},
                  training={"epochs": 20, "batch_size": 64, "run_dir": "runs/digits-mlp-script"})
summary = trainer.fit()
trainer.comm.print(f"test accuracy {summary['test_accuracy']:.4f} after {summary['steps']} steps")
