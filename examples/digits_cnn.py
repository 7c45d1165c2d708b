"""A small CNN on the bundled 8x8 handwritten digits, as a Python script.

    python examples/digits_cnn.py
    mpiexec -n 2 python examples/digits_cnn.py
(The same run from a config: disttrain train examples/digits_cnn.toml)
"""
import disttrain as dt
from disttrain.datasets.digits import read_digits
from disttrain.datasets import split_train_test
from disttrain.trainer import Trainer

images, labels = read_digits()  # (1797, 1, 8, 8) float32 in [0, 1], labels 0..9
train, test = split_train_test(images, labels, test_fraction=0.2, seed=0, name="digits")
dt.manual_seed(0)
model = dt.nn.Sequential(
    dt.nn.Conv2d(1, 16, 3, padding=1), dt.nn.ReLU(), dt.nn.MaxPool2d(2),   # 16 x 4 x 4
    dt.nn.Conv2d(16, 32, 3, padding=1), dt.nn.ReLU(), dt.nn.MaxPool2d(2),  # 32 x 2 x 2
    dt.nn.Flatten(), dt.nn.Linear(128, 64), dt.nn.ReLU(), dt.nn.Linear(64, 10))
trainer = Trainer(model, train, dt.nn.SoftmaxLoss(), test, optimizer={"name": "adam", "lr": 0.002},
                  training={"epochs": 10, "batch_size": 64, "run_dir": "runs/digits-cnn-script"})
summary = trainer.fit()
trainer.comm.print(f"test accuracy {summary['test_accuracy']:.4f} after {summary['steps']} steps")
