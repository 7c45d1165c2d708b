"""Settings changed on resume are applied and said so, or refused with the reason.

A resumed run compares its config with the checkpoint's. A user raising training.epochs gets more
training; a new optimizer.lr (or other hyperparameter) is the one used, with the schedule rebuilt from
it at the resumed step; a change the saved state cannot take (the model, the data, the update rule,
the batch, the shuffle order) stops the run before any step with the key and the reason. Never one
value printed and another used: the learning rates in metrics.jsonl and the hyperparameters in the
next checkpoint's manifest are checked.
"""

import json
import os
import shutil

import numpy as np
import pytest

import launch
from disttrain import checkpoint as ckpt
from disttrain.config import ConfigError
from disttrain.data import ArrayDataset
from disttrain.optim import SGD, CosineLR
from disttrain.tensor import Tensor

CONFIG = """
[model]
name = "mlp"
hidden = [8]

[data]
name = "synthetic"
samples = 200       # 160 train: 5 steps per epoch of 32
features = 6
classes = 3

[optimizer]
lr = 0.01

[training]
epochs = 1
batch_size = 32
log_every = 1
progress = "lines"

[checkpoint]
every_epochs = 1
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run dir holding the checkpoint of step 5 (the end of epoch 1), trained on 2 ranks."""
    root = tmp_path_factory.mktemp("saved")
    (root / "run.toml").write_text(CONFIG)
    launch.disttrain("train", root / "run.toml", "--run-dir", root / "run", ranks=2, timeout=120)
    return root


def _resume(saved, tmp_path, *sets, ranks=2, check=True):
    shutil.copytree(saved / "run", tmp_path / "run")
    words = [x for s in sets for x in ("--set", s)]
    return launch.disttrain("train", saved / "run.toml", "--run-dir", tmp_path / "run", "--resume", *words,
                            ranks=ranks, timeout=120, check=check)


def _train_lrs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return {r["step"]: r["lr"] for r in map(json.loads, handle) if r["kind"] == "train"}


def test_raising_epochs_on_resume_trains_the_new_epochs_and_says_so(saved, tmp_path):
    proc = _resume(saved, tmp_path, "training.epochs=3")
    assert "resumed from " in proc.stdout and "at step 5 (epoch 2)" in proc.stdout
    assert "resumed with changed settings, applied: training.epochs 1 -> 3" in proc.stdout
    assert "done: 15 steps" in proc.stdout and "already complete" not in proc.stdout


def test_a_new_learning_rate_on_resume_is_the_one_trained_with(saved, tmp_path):
    proc = _resume(saved, tmp_path, "optimizer.lr=0.1", "training.epochs=2")
    assert "resumed with changed settings, applied: optimizer.lr 0.01 -> 0.1, training.epochs 1 -> 2" in proc.stdout
    assert ("the learning rate follows the constant schedule rebuilt from lr 0.1 over 10 steps, continuing at "
            "step 5 (lr 0.1)") in proc.stdout
    assert "optimizer adam lr 0.1," in proc.stdout  # the banner says what is used
    lrs = _train_lrs(tmp_path / "run")
    assert [lrs[step] for step in range(1, 11)] == [0.01] * 5 + [0.1] * 5


def test_a_schedule_changed_on_resume_is_rebuilt_and_continues_at_the_resumed_step(saved, tmp_path):
    proc = _resume(saved, tmp_path, "optimizer.lr=0.1", "training.epochs=3", 'training.schedule="cosine"',
                   "training.min_lr=0.001")
    assert "the learning rate follows the cosine schedule rebuilt from lr 0.1 over 15 steps, continuing at step 5" \
        in proc.stdout
    cosine = CosineLR(SGD([Tensor(np.zeros(1, np.float32), requires_grad=True)], lr=0.1), 15, 0, 0.001)
    lrs = _train_lrs(tmp_path / "run")
    assert [lrs[step] for step in range(6, 16)] == pytest.approx([cosine.lr_at(step - 1) for step in range(6, 16)])


def test_a_new_hyperparameter_on_resume_is_used_and_saved(saved, tmp_path):
    _resume(saved, tmp_path, "optimizer.beta1=0.5", "optimizer.weight_decay=0.01", "training.epochs=2")
    manifest = ckpt.read_manifest(str(tmp_path / "run" / "checkpoints" / "step-00000010"))
    hyper = manifest["optimizer"]["hyperparameters"]
    assert hyper["beta1"] == 0.5 and hyper["weight_decay"] == 0.01 and hyper["beta2"] == 0.999


def test_an_unchanged_resume_says_nothing_about_settings(saved, tmp_path):
    proc = _resume(saved, tmp_path, ranks=0)
    assert "changed settings" not in proc.stdout and "already complete" in proc.stdout


@pytest.mark.parametrize("override, shown", [
    ("model.hidden=[16]", "model.hidden = [16] (the checkpoint was trained with [8]: the saved parameters belong "
                          "to the saved model)"),
    ('model.activation="tanh"', 'model.activation = "tanh" (the checkpoint was trained with "relu"'),
    ("data.samples=300", "data.samples = 300 (the checkpoint was trained with 200: the saved position in the "
                         "epoch counts the saved data set's samples)"),
    ('optimizer.name="sgd"', 'optimizer.name = "sgd" (the checkpoint was trained with "adam": the saved optimizer '
                             'state belongs to the saved update rule)'),
    ("training.batch_size=16", "training.batch_size = 16 (the checkpoint was trained with 32: the step count and "
                               "the position in the epoch are counted in batches of the saved size)"),
    ("training.accumulate=2", "training.accumulate = 2 (the checkpoint was trained with 1"),
    ("training.seed=9", "training.seed = 9 (the checkpoint was trained with 0: the order of the samples of the "
                        "epoch under way follows from it)"),
    ("training.shuffle=false", "training.shuffle = false (the checkpoint was trained with true"),
])
def test_a_change_the_checkpoint_cannot_take_is_refused_naming_key_values_and_reason(saved, tmp_path, override,
                                                                                     shown):
    ranks = 2 if override.startswith("model.hidden") else 0  # agreed like any config error: one case on 2 ranks
    proc = _resume(saved, tmp_path, override, "training.epochs=2", ranks=ranks, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"disttrain: error: cannot resume {tmp_path}/run/checkpoints/step-00000005 with a "
                                f"changed {shown}"), errors[0]
    assert errors[0].endswith("Resume with the saved value, or start a new run in another run dir")
    assert "step 6/" not in proc.stdout


def test_the_python_api_applies_a_new_lr_and_refuses_a_new_batch_size(tmp_path):
    import disttrain as dt
    from disttrain.trainer import Trainer

    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.standard_normal((64, 4)).astype(np.float32), rng.integers(0, 2, 64))

    def trainer(lr, batch_size, epochs):
        dt.manual_seed(0)
        return Trainer(dt.nn.Sequential(dt.nn.Linear(4, 2)), data, dt.nn.SoftmaxLoss(), optimizer={"lr": lr},
                       training={"epochs": epochs, "batch_size": batch_size, "progress": "none",
                                 "run_dir": str(tmp_path / "run")})
    trainer(0.01, 16, 1).fit()
    resumed = trainer(0.05, 16, 2)
    resumed.fit(resume=True)
    assert resumed.optimizer.lr == 0.05 and resumed.step == 8
    with pytest.raises(ConfigError, match=r"changed training.batch_size = 32 \(the checkpoint was trained with 16"):
        trainer(0.05, 32, 3).fit(resume=True)
