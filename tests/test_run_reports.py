"""What a run says about its data and model, and how it ends when nothing could be trained.

The data line names what the model must output (`10 classes from labels 0..9`, `1 regression output`);
float labels that look like classes train as regression with a note saying how to train them as classes
(data.task); a run whose every step was skipped ends with exit 1 and one line; a global batch larger
than the data is said to be so; `disttrain export` to a directory is one clear error and leaves no
temporary file; an ArrayDataset takes Python lists.
"""

import os
import sys

import numpy as np
import pytest

import launch
from disttrain.data import ArrayDataset

WORKERS = os.path.join(os.path.dirname(__file__), "workers")
sys.path.insert(0, WORKERS)
from faults_processes import Job, assert_no_leftovers  # noqa: E402

CONFIG = """
[model]
name = "mlp"
hidden = [8]

[data]
name = "npy"
path = "{data}/x.npy"
labels = "{data}/y.npy"

[training]
epochs = 1
batch_size = 32
progress = "lines"

[checkpoint]
every_epochs = 0
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    np.save(directory / "x.npy", rng.standard_normal((120, 5)).astype(np.float32))
    labels = rng.integers(0, 2, 120)
    np.save(directory / "y.npy", labels)
    np.save(directory / "y_float.npy", labels.astype(np.float32))  # class labels saved as floats
    (directory / "run.toml").write_text(CONFIG.format(data=directory))
    return directory


def _train(data, tmp_path, *sets, ranks=0, check=True, **env):
    words = [x for s in sets for x in ("--set", s)]
    return launch.disttrain("train", data / "run.toml", "--run-dir", tmp_path / "run", *words, ranks=ranks,
                            timeout=120, check=check, **env)


def test_the_data_line_names_the_classes_and_the_labels_they_come_from(data, tmp_path):
    out = _train(data, tmp_path).stdout
    assert out.splitlines()[0] == f"disttrain: mlp on arrays {data}/x.npy: 96 train / 24 test, 2 classes from labels 0..1"
    out = _train(data, tmp_path, "data.classes=4").stdout
    assert out.splitlines()[0].endswith("4 classes (data.classes; labels 0..1 seen)")


def test_float_labels_holding_class_numbers_train_as_regression_with_a_note_or_as_classes_when_asked(data, tmp_path):
    out = _train(data, tmp_path, f'data.labels="{data}/y_float.npy"').stdout
    assert out.splitlines()[0].endswith("1 regression output")
    assert out.splitlines()[1] == (f"note: labels ({data}/y_float.npy) are floats holding only the values 0, 1: "
                                   f"trained as regression targets (MSE); to train them as classes, set data.task = "
                                   f"\"classification\" or save them as integers")
    out = _train(data, tmp_path, f'data.labels="{data}/y_float.npy"', 'data.task="classification"').stdout
    assert out.splitlines()[0].endswith("2 classes from labels 0..1") and "note:" not in out and "test_acc" in out


def test_integer_labels_train_as_regression_targets_when_data_task_says_so(data, tmp_path):
    out = _train(data, tmp_path, 'data.task="regression"').stdout
    assert out.splitlines()[0].endswith("1 regression output") and "test_acc" not in out and "done: 3 steps" in out


def test_a_run_whose_every_step_was_skipped_exits_1_with_one_line(data, tmp_path):
    job = Job(["train", data / "run.toml", "--run-dir", tmp_path / "run", "--set", 'training.on_nonfinite="skip"',
               "--set", "training.epochs=2"], 2, str(tmp_path / "job"), DISTTRAIN_FAULT="nan:1:*")
    try:
        code, out, err, _ = job.finish(120)
    finally:
        job.stop()
    assert_no_leftovers(job.tag)
    assert code == 1, err
    assert err.strip() == ('disttrain: error: every one of the 6 steps of this run was skipped (non-finite loss or '
                           'gradient, training.on_nonfinite = "skip"): nothing was trained. Lower the learning rate, '
                           'clip gradients (training.clip_norm), or look for NaN/inf in the data')
    assert "epoch 1/2  train_loss nan" in out and "done:" not in out


def test_a_run_with_some_steps_skipped_still_ends_normally(data, tmp_path):
    out = _train(data, tmp_path, 'training.on_nonfinite="skip"', ranks=2, DISTTRAIN_FAULT="nan:1:2").stdout
    assert "step 2: non-finite loss or gradient, step skipped on all ranks (1 so far)" in out and "done: 3 steps" in out


def test_a_global_batch_larger_than_the_data_is_said_so(data, tmp_path):
    out = _train(data, tmp_path, "training.batch_size=100000").stdout
    assert ("note: the global batch 100000 is larger than the 96 training samples: every step trains on all 96 of "
            "them (a global batch of 96)") in out
    assert "1 steps/epoch" in out and "done: 1 steps" in out


def test_export_to_a_directory_is_one_clear_error_and_leaves_no_temporary_file(data, tmp_path):
    _train(data, tmp_path, "checkpoint.every_epochs=1")
    (tmp_path / "out").mkdir()
    proc = launch.disttrain("export", tmp_path / "run", tmp_path / "out", timeout=60, check=False, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"disttrain: error: export: the output '{tmp_path / 'out'}' is a directory; give a "
                                   f"file name, e.g. {tmp_path / 'out' / 'model.npz'}")
    assert sorted(os.listdir(tmp_path)) == ["out", "run"] and os.listdir(tmp_path / "out") == []


def test_an_array_dataset_takes_python_lists_and_trains(tmp_path):
    import disttrain as dt
    from disttrain.trainer import fit

    features = [[float(i % 3), float(i % 5)] for i in range(40)]
    labels = [i % 2 for i in range(40)]
    dataset = ArrayDataset(features, labels)
    x, y = dataset[np.array([1, 3])]
    assert x.dtype == np.float32 and x.tolist() == [[1.0, 1.0], [0.0, 3.0]] and y.tolist() == [1, 1]
    dt.manual_seed(0)
    summary = fit(dt.nn.Sequential(dt.nn.Linear(2, 2)), dataset, dt.nn.SoftmaxLoss(),
                  training={"epochs": 2, "batch_size": 8, "progress": "none", "run_dir": str(tmp_path)},
                  checkpoint={"every_epochs": 0})
    assert summary["steps"] == 10 and not summary["stopped"]


@pytest.mark.parametrize("features, message", [
    ([[1.0, 2.0], [3.0]], "ArrayDataset features: expected an array or a (nested) list of numbers of one shape, got "
                          "list making a object array of shape (2,)"),
    (["a", "b"], "got list making a <U1 array"),
])
def test_an_array_dataset_of_lists_that_are_not_numbers_of_one_shape_is_a_clear_error(features, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ArrayDataset(features, [0, 1])
