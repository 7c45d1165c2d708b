"""Bad input gets one clear error and nothing else: table-driven, under real `mpiexec`.

Each case feeds `disttrain train` one mistake a user can make - in the config, the data files, the
model or the resume path - and checks: exit code 1 within seconds (no rank left waiting), exactly one
`disttrain: error:` line holding the case's key words, no traceback at all (so none from deep inside
numpy), and no process left behind. Cases whose bad rows sit late in a file - in the part of the data
only the last rank trains on - also run on 3 ranks; cases about the data files also run as one plain
process. Label files of an odd but usable shape must train. A NaN scan of a large file is split among
the ranks (each reads only its rows) and still ends in one agreed error. The last test covers bad rows
that no load-time check can see (a data set built in memory): all ranks must stop at the same step with
the same message.
"""

import gzip
import os
import sys

import numpy as np
import pytest

import launch

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
        bad[LATE_ROW + 1] = 3  # (classes 0..4 all present: no gap)
        _save(directory, name, bad)
    stray = y.copy()
    stray[LATE_ROW] = 50  # one stray label far above the 0..2 of all the others
    _save(directory, "y_stray.npy", stray)
    _save(directory, "x_empty.npy", np.zeros((0, FEATURES), np.float32))
    _save(directory, "y_empty.npy", np.zeros(0, np.int64))
    _save(directory, "x_flat.npy", x[:, 0])
    for name in ("not_numpy.npy", "not_numpy.npz"):
        with open(os.path.join(directory, name), "w") as handle:
            handle.write("feature_1,feature_2\n0.5,0.25\n")
    _save(directory, "y_column.npy", y[:, None])  # (n, 1) integers: squeezed to (n,)
    _save(directory, "y_pairs.npy", np.stack([y, y], axis=1))  # (n, 2) integers: not class labels
    _save(directory, "t_vector.npy", x[:, 0] * 2 + 1)  # (n,) floats: one regression output
    _save(directory, "t_cube.npy", np.zeros((ROWS, 2, 2), np.float32))
    _save(directory, "x_test.npy", x[:40])
    y_test_beyond = y[:40].copy()
    y_test_beyond[7] = 7  # the training labels only reach 2
    _save(directory, "y_test_beyond.npy", y_test_beyond)
    np.savez(os.path.join(directory, "xy.npz"), x=x, y=y)
    _write_idx_directory(os.path.join(directory, "idx"), rng, train_top=2, test_top=2)
    _write_idx_directory(os.path.join(directory, "idx_test_beyond"), rng, train_top=2, test_top=5)
    _write_idx_directory(os.path.join(directory, "idx_swapped"), rng, train_top=2, test_top=2)
    os.replace(os.path.join(directory, "idx_swapped", "train-labels-idx1-ubyte.gz"),  # labels where images belong
               os.path.join(directory, "idx_swapped", "train-images-idx3-ubyte"))
    with gzip.open(os.path.join(directory, "idx_swapped", "train-images-idx3-ubyte")) as handle:
        labels_bytes = handle.read()
    with open(os.path.join(directory, "idx_swapped", "train-images-idx3-ubyte"), "wb") as handle:
        handle.write(labels_bytes)
    _write_idx(os.path.join(directory, "idx_swapped", "train-labels-idx1-ubyte.gz"), y, gzipped=True)
    _write_idx(os.path.join(directory, "labels.idx"), y)
    return directory


def _write_idx(path, array, gzipped=False):
    """`array` (uint8) as an MNIST-format IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with (gzip.open if gzipped else open)(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _write_idx_directory(directory, rng, train_top, test_top):
    """Tiny 8x8 IDX train/t10k files whose labels go up to train_top / test_top."""
    os.makedirs(directory)
    for split, count, top in (("train", ROWS, train_top), ("t10k", 40, test_top)):
        _write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"), rng.integers(0, 256, (count, 8, 8)))
        labels = rng.integers(0, train_top + 1, count)
        labels[-1] = top
        _write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels, gzipped=True)


# (id, --set overrides, key words of the one error line, options); "{data}" is the data directory.
# options: shard (also 3 ranks: the bad rows are the last rank's), files (also one plain process),
# absent (words the error must not hold), config/config_text/config_extra/drop_section/top (the config
# file), resume (an --resume PATH; resume_dir: which exists, empty)
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
     ["not_numpy.npy", "is not a numpy .npy/.npz file"], {"files": True, "absent": ["allow_pickle", "pickle"]}),
    ("data file named .npz that is not numpy", ['data.path="{data}/not_numpy.npz"'],
     ["not_numpy.npz", "(data.path) is not a numpy .npy/.npz file"], {"files": True, "absent": ["allow_pickle"]}),
    ("npz without the labels array", ['data.path="{data}/xy.npz"', 'data.labels="labels"'],
     ["xy.npz", "has no array 'labels'", "it has ['x', 'y']"], {"files": True, "absent": ["not a numpy"]}),
    ("test features without test labels", ['data.test_path="{data}/x_test.npy"'],
     ["no test labels file given", "set data.test_labels"], {"files": True}),
    ("integer labels with two columns", ['data.labels="{data}/y_pairs.npy"'],
     ["y_pairs.npy", "integer labels have shape (120, 2)", "allowed: (n,) or (n, 1)"], {"files": True}),
    ("regression targets of three dimensions", ['data.labels="{data}/t_cube.npy"'],
     ["t_cube.npy", "regression targets have shape (120, 2, 2)", "allowed: (n,) or (n, outputs)"],
     {"files": True}),
    ("label beyond data.classes in late rows", ['data.labels="{data}/y_five_classes_late.npy"', "data.classes=3"],
     ["y_five_classes_late.npy", "label 4 is out of range (allowed 0..2, data.classes = 3)"],
     {"shard": True, "files": True}),
    ("test label beyond the inferred training labels",
     ['data.test_path="{data}/x_test.npy"', 'data.test_labels="{data}/y_test_beyond.npy"'],
     ["test labels", "y_test_beyond.npy", "label 7 is out of range (allowed 0..2", "training labels",
      "set data.classes"], {"files": True}),
    ("IDX label beyond data.classes", ['data.name="idx"', 'data.path="{data}/idx"', "data.classes=2"],
     ["train-labels-idx1-ubyte.gz", "label 2 is out of range (allowed 0..1, data.classes = 2)"], {"files": True}),
    ("IDX test label beyond the inferred training labels", ['data.name="idx"', 'data.path="{data}/idx_test_beyond"'],
     ["t10k-labels-idx1-ubyte.gz", "label 5 is out of range (allowed 0..2", "training labels"], {"files": True}),
    ("model option the factory does not take", ['model.name="faults_models:fixed"', "model.options={input=8}"],
     ["model.options.input is not a parameter of faults_models:fixed", "(did you mean 'inputs'?)",
      "it accepts inputs, outputs"], {}),
    ("model factory without input_shape and classes", ['model.name="disttrain.nn:Linear"'],
     ["model.name = 'disttrain.nn:Linear'", "must accept the keyword arguments input_shape= and classes=",
      "its parameters are (in_features, out_features"], {}),
    ("key outside any section", [], ["config.toml: key 'epochs' = 3 is outside any section",
                                     "did you mean [training] epochs?"], {"top": "epochs = 3\n"}),
    ("key in the wrong section", ["training.lr=0.1"], ["unknown key 'training.lr'", "did you mean optimizer.lr?"], {}),
    ("wrong type in the file", [], ["config.toml: config key training.batch_size = '32'", "expected an integer"],
     {"config_extra": '\n[training]\nbatch_size = "32"\n', "drop_section": "training"}),
    ("model name that is neither built in nor module:callable", ['model.name="Mlp"'],
     ["model.name = 'Mlp' is not allowed", "one of 'mlp', 'cnn', 'gpt', or 'module:callable'"], {}),
    ("model input size that does not match the data", ['model.name="faults_models:fixed"',
                                                       "model.options={inputs=5}"],
     ["the model does not accept the data", f"samples of shape ({FEATURES},)"], {}),
    ("model module that does not exist", ['model.name="no_such_module:build"'],
     ["model.name = 'no_such_module:build'", "cannot import module 'no_such_module'"], {}),
    ("one stray label far above the others", ['data.labels="{data}/y_stray.npy"'],
     ["y_stray.npy", "classes 3..49 never occur among the labels 0..50 (label 50 occurs 1 time)",
      "set data.classes = 51 if those classes are meant to be absent"], {"files": True, "shard": True}),
    ("model with more outputs than there are classes", ['model.name="faults_models:fixed"', "model.options={outputs=5}"],
     ["the model outputs shape (2, 5) but the labels need 3 classes", "set data.classes = 5"], {}),
    ("model factory without input_shape", ['model.name="faults_models:no_input_shape"'],
     ["model.name = 'faults_models:no_input_shape'", "must accept the keyword arguments input_shape= and classes=",
      "its parameters are (classes, hidden)"], {}),
    ("IDX file given as npy features", ['data.path="{data}/labels.idx"'],
     ["labels.idx", "is an IDX file (MNIST format), not numpy", 'set data.name = "idx"'], {"files": True}),
    ("IDX labels file in place of the images", ['data.name="idx"', 'data.path="{data}/idx_swapped"'],
     ["idx_swapped/train-images-idx3-ubyte: holds one value per sample, as a labels file holds, not images"],
     {"files": True}),
    ("IDX path that is a file", ['data.name="idx"', 'data.path="{data}/labels.idx"'],
     ["labels.idx' is a file; give the directory that holds train-images-idx3-ubyte"], {"files": True}),
    ("fractional labels trained as classes", ['data.labels="{data}/t_vector.npy"', 'data.task="classification"'],
     ["t_vector.npy", 'data.task = "classification" needs whole-number labels, but row 0 holds'], {"files": True}),
    ("regression of the digits", ['data.name="digits"', 'data.task="regression"'],
     ['data.task = "regression" does not fit the digits data set: its labels are classes'], {}),
    ("resume path that does not exist", [], ["resume path", "no-such-run", "does not exist"],
     {"resume": "no-such-run"}),
    ("resume path without a checkpoint", [], ["resume path", "empty-run", "holds no checkpoint"],
     {"resume": "empty-run", "resume_dir": True}),
]


def _ranks(options):
    return ((0,) if options.get("files") else ()) + (2,) + ((3,) if options.get("shard") else ())


PARAMS = [pytest.param(case, ranks, id=f"{case[0]}-{f'{ranks} ranks' if ranks else 'plain'}")
          for case in CASES for ranks in _ranks(case[3])]


def _config_text(data_dir, options):
    if "config_text" in options:
        return options["config_text"]
    text = CONFIG.format(data=data_dir)
    if "drop_section" in options:  # replace a whole section (TOML forbids defining it twice)
        head, rest = text.split(f"[{options['drop_section']}]", 1)
        text = head + rest[rest.index("\n["):]
    return options.get("top", "") + text + options.get("config_extra", "")


@pytest.mark.parametrize("case, ranks", PARAMS)
def test_bad_input_stops_every_rank_with_one_clear_error_and_no_traceback(data, tmp_path, case, ranks):
    name, settings, words, options = case
    config = tmp_path / "config.toml"
    config.write_text(_config_text(data, options))
    args = ["train", options.get("config") and tmp_path / options["config"] or config,
            "--run-dir", tmp_path / "run", *(x for s in settings for x in ("--set", s.replace("{data}", data)))]
    if "resume" in options:
        args += ["--resume", tmp_path / options["resume"]]
        if options.get("resume_dir"):
            (tmp_path / options["resume"]).mkdir()
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
    for word in options.get("absent", []):
        assert word not in errors[0], f"{word!r} in {errors[0]!r}"
    assert "Traceback" not in err and "site-packages/numpy" not in err, err
    assert "step 1/" not in out  # stopped before training


@pytest.mark.parametrize("ranks", [0, 2])
@pytest.mark.parametrize("labels, task", [("y_column.npy", "classification"), ("t_vector.npy", "regression")])
def test_integer_label_column_and_float_target_vector_train_as_their_task(data, tmp_path, ranks, labels, task):
    """(n, 1) integer labels are squeezed to (n,); (n,) float targets become (n, 1) for MSE."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(data=data))
    job = Job(["train", config, "--run-dir", tmp_path / "run", "--set", f'data.labels="{data}/{labels}"'], ranks,
              str(tmp_path / "job"))
    try:
        code, out, err, _ = job.finish(120)
    finally:
        job.stop()
    assert code == 0 and "Traceback" not in err, f"stdout:\n{out}\nstderr:\n{err}"
    assert ("test_acc" in out) == (task == "classification") and "done: 3 steps" in out, out


SCAN = """
import sys
import numpy as np
from disttrain.datasets import DataError, check_finite
from disttrain.distributed import init

class Recording:  # a features array that records the rows read from it
    def __init__(self, array):
        self.array, self.rows, self.dtype, self.shape = array, set(), array.dtype, array.shape
    def __len__(self):
        return len(self.array)
    def __getitem__(self, index):
        self.rows.update(range(len(self.array))[index])
        return self.array[index]

comm = init()
features = np.ones((1000, 4), np.float32)
features[[700, 900], 1] = np.nan  # in the last two ranks' shares when there are three
recording = Recording(features)
try:
    check_finite(recording, "scan.npy", comm, chunk_rows=64)
    outcome = "no error"
except DataError as error:
    outcome = str(error)
with open(f"{sys.argv[1]}/rank-{comm.rank}.txt", "w") as handle:
    handle.write(f"{min(recording.rows)} {max(recording.rows) + 1} {len(recording.rows)}\\n{outcome}")
"""


@pytest.mark.parametrize("ranks", [1, 3])
def test_nan_scan_reads_only_each_ranks_rows_and_every_rank_reports_the_first_bad_row(tmp_path, ranks):
    from disttrain.data import split_evenly

    (tmp_path / "scan.py").write_text(SCAN)
    launch.mpirun(ranks, [tmp_path / "scan.py", tmp_path], timeout=120, MPIEXEC_TIMEOUT=100)
    for rank in range(ranks):
        start, stop = split_evenly(1000, ranks, rank)
        rows, outcome = (tmp_path / f"rank-{rank}.txt").read_text().split("\n")
        first, end, count = map(int, rows.split())
        # its own rows only, from the start of its share; all of them unless it met a bad row (in chunks of 64)
        assert first == start and count == end - first and end <= stop
        assert end == stop or start <= 700 < end
        assert outcome == "scan.npy: row 700 contains NaN or inf"


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
