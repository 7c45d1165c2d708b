"""Ranks that disagree about the run stop before the first step with one error naming the difference.

Each rank of a job must train the same thing: a wrapper that passes a different `--set` to one rank
used to train silently (lr, seed), hang at the end (epochs) or die inside MPI (batch size). At start-up
one allreduce of a digest compares every rank's resolved config, data set sizes, library version and
command line; only when they differ are the details gathered and named. Under real mpiexec, each rank
given its own command line (mpiexec's `:` syntax).
"""

import os
import sys

import pytest

import launch
from disttrain.training.agreement import describe_differences, rank_list, run_facts

WORKERS = os.path.join(os.path.dirname(__file__), "workers")
QUICK = 30  # seconds; the check runs before any data is loaded

CONFIG = """
[model]
name = "mlp"
hidden = [8]

[data]
name = "synthetic"
samples = 200
features = 6
classes = 3

[optimizer]
lr = 0.01

[training]
epochs = 2
batch_size = 32
seed = 1
progress = "lines"

[checkpoint]
every_epochs = 0
"""


def _mpmd(tmp_path, per_rank_sets, timeout=90):
    """One `disttrain train` per rank (rank r adds the --set words per_rank_sets[r]); (code, out, err)."""
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    argv = [launch.MPIEXEC]
    for rank, sets in enumerate(per_rank_sets):
        words = [x for s in sets for x in ("--set", s)]
        argv += ([":"] if rank else []) + ["-n", "1", sys.executable, "-m", "disttrain", "train", str(config),
                                            "--run-dir", str(tmp_path / "run"), *words]
    proc = launch.run(argv, timeout=timeout, check=False, MPIEXEC_TIMEOUT=timeout - 20)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("override, shown", [
    ("optimizer.lr=0.02", "optimizer.lr is 0.01 on rank 0 and 0.02 on rank 1"),
    ("training.seed=7", "training.seed is 1 on rank 0 and 7 on rank 1"),
    ("training.epochs=3", "training.epochs is 2 on rank 0 and 3 on rank 1"),  # was a hang
    ("training.batch_size=16", "training.batch_size is 32 on rank 0 and 16 on rank 1"),  # was "Message truncated"
])
def test_a_rank_started_with_another_setting_stops_the_job_before_step_1_naming_key_and_ranks(tmp_path, override,
                                                                                               shown):
    import time

    started = time.monotonic()
    code, out, err = _mpmd(tmp_path, [[], [override]])
    assert code == 1, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert time.monotonic() - started < QUICK
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("disttrain: error: config differs across ranks: " + shown), err
    command = f"train {tmp_path / 'run.toml'} --run-dir {tmp_path / 'run'}"
    assert (f"launch arguments differ across ranks: '{command}' on rank 0 and '{command} --set {override}' "
            f"on rank 1") in errors[0]
    assert "Traceback" not in err and "Abort" not in err and "step 1/" not in out and "truncated" not in err


def test_with_three_ranks_the_error_lists_the_ranks_on_each_side(tmp_path):
    code, out, err = _mpmd(tmp_path, [["optimizer.lr=0.001"], ["optimizer.lr=0.01"], ["optimizer.lr=0.001"]])
    assert code == 1, err
    assert ("disttrain: error: config differs across ranks: optimizer.lr is 0.001 on ranks 0, 2 and 0.01 on rank 1"
            in err)


def test_ranks_that_agree_train_as_before(tmp_path):
    code, out, err = _mpmd(tmp_path, [["optimizer.lr=0.02"], ["optimizer.lr=0.02"]])
    assert code == 0 and "done: 10 steps" in out, err  # 2 epochs of 5 batches of 32 of 160


@pytest.mark.parametrize("case, expected", [
    ("lr", "config differs across ranks: optimizer.lr is 0.01 on rank 0 and 0.02 on rank 1. Every rank must be "
           "started with the same config, data and arguments"),
    ("data", "data differs across ranks: training samples is 64 on rank 0 and 63 on rank 1. Every rank must be "
             "started with the same config, data and arguments"),
    ("test", "data differs across ranks: test samples is 32 on rank 0 and 31 on rank 1. Every rank must be "
             "started with the same config, data and arguments"),
])
def test_the_python_api_trainer_checks_the_same_on_every_rank(tmp_path, case, expected):
    launch.mpirun(2, [os.path.join(WORKERS, "agreement_api.py"), tmp_path, case], timeout=90, MPIEXEC_TIMEOUT=70)
    assert [(tmp_path / f"rank-{r}.txt").read_text() for r in range(2)] == [expected, expected]


def test_the_check_is_one_allreduce_and_no_object_collective_when_ranks_agree(tmp_path):
    launch.mpirun(2, [os.path.join(WORKERS, "agreement_api.py"), tmp_path, "equal"], timeout=90, MPIEXEC_TIMEOUT=70)
    assert [(tmp_path / f"rank-{r}.txt").read_text() for r in range(2)] == ["allreduce 1, objects 0"] * 2


def test_differences_name_every_kind_absent_keys_and_cut_a_long_list_short():
    base = run_facts({"optimizer": {"lr": 0.01, "name": "adam"}}, argv=["train", "a.toml"])
    other = dict(base, **{"config:optimizer.name": "sgd", "library:disttrain": "9.9"})
    del other["launch:arguments"]
    text = describe_differences([base, other, base])
    assert text.startswith("config differs across ranks: optimizer.name is \"adam\" on ranks 0, 2 and \"sgd\" on "
                           "rank 1; launch arguments differ across ranks: 'train a.toml' on ranks 0, 2 and absent "
                           "on rank 1; library versions differ across ranks: disttrain is ")
    many = [{f"config:training.k{i}": i for i in range(9)}, {f"config:training.k{i}": -i for i in range(1, 10)}]
    text = describe_differences(many)
    assert text.count(" is ") == 6 and "and 4 more (training.k6, training.k7, training.k8, training.k9)" in text


def test_rank_lists_read_as_ranges():
    assert rank_list([3]) == "rank 3"
    assert rank_list([0, 2]) == "ranks 0, 2"
    assert rank_list([0, 1]) == "ranks 0, 1"
    assert rank_list([0, 1, 2, 3, 5, 7, 8]) == "ranks 0-3, 5, 7, 8"
