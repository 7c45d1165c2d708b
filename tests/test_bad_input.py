"""Bad input gets one clear error and nothing else: table-driven, under real `mpiexec`.

Each case feeds `disttrain train` one mistake a user can make - in the config, the data files, the
model or the resume path - and checks: exit code 1 within seconds (no rank left waiting), exactly one
`disttrain: error:` line holding the case's key words, no traceback at all (so none from deep inside
numpy), and no process left behind. Cases whose bad rows sit late in a file - in the part of the data
only the last rank trains on - also run on 3 ranks. The last test covers bad rows that no load-time
check can see (a data set built in memory): all ranks must stop at the same step with the same message.
"""

import os
import sys

import numpy as np
import pytest

WORKERS = os.path.join(os.path.dirname(__file__), "workers")
sys.path.insert(0, WORKERS)
from faults_processes import Job, assert_no_leftovers  # noqa: E402

QUICK = 30  # seconds: "within seconds" on a loaded 2-core machine; a hang would run into the timeout
ROWS, FEATURES, LATE_ROW = 120, 8, 100  # row 100 of 120 lies in the last rank's part of the data

CONFIG = """
[model]
name = "mlp"
hidden = [16]

[data]
name = "npy"
path = "{data}/x.npy"
labels = "{data}/y.npy"

[optimizer]
name = "adam"
lr = 0.01

[training]
epochs = 1
batch_size = 32
progress = "lines"

[checkpoint]
every_epochs = 0
"""


def _save(directory, name, array):
    np.save(os.path.join(directory, name), array)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A directory of good and bad .npy files (good: x.npy, y.npy)."""
    directory = str(tmp_path_factory.mktemp("data"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, FEATURES), dtype=np.float32)
    y = rng.integers(0, 3, ROWS)
    _save(directory, "x.npy", x)
    _save(directory, "y.npy", y)
    _save(directory, "y_short.npy", y[:90])
    for name, value in (("x_nan_late.npy", np.nan), ("x_inf_late.npy", np.inf)):
        bad = x.copy()
        bad[LATE_ROW, 3] = value
        _save(directory, name, bad)
    for name, value in (("y_negative_late.npy", -1), ("y_five_classes_late.npy", 4)):
        bad = y.copy()
        bad[LATE_ROW] = value
        _save(directory, name, bad)
    _save(directory, "x_empty.npy", np.zeros((0, FEATURES), np.float32))
    _save(directory, "y_empty.npy", np.zeros(0, np.int64))
    _save(directory, "x_flat.npy", x[:, 0])
    with open(os.path.join(directory, "not_numpy.npy"), "w") as handle:
        handle.write("feature_1,feature_2\n0.5,0.25\n")
    return directory


# (id, --set overrides, key words of the one error line, options); "{data}" is the data directory
CASES = [
    ("unknown key", ["training.epoch=3"], ["unknown key 'training.epoch'", "did you mean 'epochs'"], {}),
    ("unknown section", ["trainig.epochs=3"], ["unknown section [trainig]", "allowed sections"], {}),
    ("misspelled key in the file", [], ["unknown key 'optimizer.learning_rate'", "allowed keys in [optimizer]"],
     {"config_extra": "\n[optimizer]\nlearning_rate = 0.1\n", "drop_section": "optimizer"}),
    ("string for an integer", ['training.epochs="ten"'], ["training.epochs = 'ten'", "expected an integer"], {}),
    ("number for a list", ["model.hidden=32"], ["model.hidden = 32", "expected a list of positive integers"], {}),
    ("string for a boolean", ['optimizer.sharded="yes"'], ["optimizer.sharded = 'yes'", "expected true or false"],
     {}),
    ("zero learning rate", ["optimizer.lr=0"], ["optimizer.lr = 0.0 ", "expected a number > 0"], {}),
    ("negative learning rate", ["optimizer.lr=-0.1"], ["optimizer.lr = -0.1", "expected a number > 0"], {}),
    ("zero batch size", ["training.batch_size=0"], ["training.batch_size = 0", "expected an integer >= 1"], {}),
    ("negative batch size", ["training.batch_size=-4"], ["training.batch_size = -4", "expected an integer >= 1"],
     {}),
    ("zero epochs", ["training.epochs=0"], ["training.epochs = 0", "expected an integer >= 1"], {}),
    ("negative epochs", ["training.epochs=-2"], ["training.epochs = -2", "expected an integer >= 1"], {}),
    ("global batch smaller than the world", ["training.batch_size=1"],
     ["training.batch_size = 1 is smaller than the world size", "at least one sample per global batch"], {}),
    ("override without a section", ["epochs=3"], ["--set 'epochs=3'", "expected section.key=value"], {}),
    ("config file that does not exist", [], ["config file", "no-such-config.toml", "does not exist"],
     {"config": "no-such-config.toml"}),
    ("config file that is not TOML", [], ["is not valid TOML"], {"config_text": "[model\nname = mlp"}),
    ("features and labels of different lengths", ['data.labels="{data}/y_short.npy"'],
     ["features have 120 rows but labels have 90"], {}),
    ("NaN in late rows of the features", ['data.path="{data}/x_nan_late.npy"'],
     ["x_nan_late.npy", f"row {LATE_ROW} contains NaN or inf"], {"shard": True}),
    ("inf in late rows of the features", ['data.path="{data}/x_inf_late.npy"'],
     ["x_inf_late.npy", f"row {LATE_ROW} contains NaN or inf"], {"shard": True}),
    ("negative label in late rows", ['data.labels="{data}/y_negative_late.npy"'],
     ["y_negative_late.npy", "label -1 is out of range"], {"shard": True}),
    ("label beyond the model's classes in late rows",
     ['data.labels="{data}/y_five_classes_late.npy"', 'model.name="faults_models:fixed"'],
     ["the model outputs shape (2, 3)", "labels need 5 classes"], {"shard": True}),
    ("empty data set", ['data.path="{data}/x_empty.npy"', 'data.labels="{data}/y_empty.npy"'], ["empty"], {}),
    ("features without a sample axis", ['data.path="{data}/x_flat.npy"'],
     ["features must have shape (samples, ...)", "(120,)"], {}),
    ("data file that does not exist", ['data.path="{data}/missing.npy"'], ["missing.npy", "does not exist"], {}),
    ("data file that is not numpy", ['data.path="{data}/not_numpy.npy"'],
     ["not_numpy.npy", "is not a numpy .npy/.npz file"], {}),
    ("model input size that does not match the data", ['model.name="faults_models:fixed"',
                                                       "model.options={inputs=5}"],
     ["the model does not accept the data", f"samples of shape ({FEATURES},)"], {}),
    ("model module that does not exist", ['model.name="no_such_module:build"'],
     ["model.name = 'no_such_module:build'", "cannot import module 'no_such_module'"], {}),
    ("resume path that does not exist", [], ["resume path", "no-such-run", "does not exist"],
     {"resume": "no-such-run"}),
]
PARAMS = [pytest.param(case, ranks, id=f"{case[0]}-{ranks} ranks")
          for case in CASES for ranks in ((2, 3) if case[3].get("shard") else (2,))]


def _config_text(data_dir, options):
    if "config_text" in options:
        return options["config_text"]
    text = CONFIG.format(data=data_dir)
    if "drop_section" in options:  # replace a whole section (TOML forbids defining it twice)
        head, rest = text.split(f"[{options['drop_section']}]", 1)
        text = head + rest[rest.index("\n["):]
    return text + options.get("config_extra", "")


@pytest.mark.parametrize("case, ranks", PARAMS)
def test_bad_input_stops_every_rank_with_one_clear_error_and_no_traceback(data, tmp_path, case, ranks):
    name, settings, words, options = case
    config = tmp_path / "config.toml"
    config.write_text(_config_text(data, options))
    args = ["train", options.get("config") and tmp_path / options["config"] or config,
            "--run-dir", tmp_path / "run", *(x for s in settings for x in ("--set", s.replace("{data}", data)))]
    if "resume" in options:
        args += ["--resume", tmp_path / options["resume"]]
    job = Job(args, ranks, str(tmp_path / "job"), cwd=WORKERS)  # cwd: where `faults_models` is imported from
    try:
        code, out, err, seconds = job.finish(120)
    finally:
        job.stop()
    assert_no_leftovers(job.tag)
    assert code == 1, f"exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert seconds < QUICK
    errors = [line for line in err.splitlines() if "disttrain: error:" in line]
    assert len(errors) == 1, f"expected one error line (exit code {code}):\nstdout:\n{out}\nstderr:\n{err!r}"
    assert errors[0].startswith("disttrain: error: "), errors[0]  # printed by rank 0 alone, unprefixed
    assert "Abort(" not in err, err  # every rank ended normally: no launcher noise after the one line
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    assert "Traceback" not in err and "site-packages/numpy" not in err, err
    assert "step 1/" not in out  # stopped before training


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("kind, expected", [
    ("nan", "NonFiniteError: non-finite loss or gradient at step 2 (global loss nan); first parameter with a "
            "non-finite gradient: '1.weight' (non-finite loss on rank {last}). Lower the learning rate, clip "
            "gradients (training.clip_norm), or set training.on_nonfinite = \"skip\""),
    ("label", "TrainingError: step 2 failed on rank {last}: ValueError: cross_entropy: label 7 is out of range "
              "for 3 classes (allowed 0..2)"),
])
def test_bad_row_in_one_ranks_part_of_a_batch_stops_all_ranks_at_that_step_with_the_same_message(
        tmp_path, ranks, kind, expected):
    job = Job([tmp_path, kind], ranks, str(tmp_path / "job"), script=os.path.join(WORKERS, "faults_shard_rows.py"))
    try:
        code, out, err, _ = job.finish(120)
    finally:
        job.stop()
    assert_no_leftovers(job.tag)
    assert code == 0, err
    results = {(tmp_path / f"rank-{rank}.txt").read_text() for rank in range(ranks)}
    assert results == {expected.format(last=ranks - 1) + "\nstopped after step 1"}
