"""A NaN gradient under a finite loss: training must notice the gradient, not only the loss.

The model (tests/workers/sqrt_features.py) computes head(sqrt(relu(x * scale))). Where a feature is
exactly 0, sqrt(relu(0)) = 0 and every loss stays finite, but the chain rule meets d sqrt/dz = inf at
0 times relu's slope 0 there: the gradient of `scale` is NaN. The training data (not shuffled) holds one such sample, in global
batch 3, so step 3 is the first and only step whose gradient is not finite. With
training.on_nonfinite = "error" training must stop at step 3 with NonFiniteError (from the CLI: one
clean error line naming step 3) before any parameter is touched; with "skip" the step is skipped
and every parameter stays finite and exactly as after step 2. A check that looked at the loss only
would apply the NaN at step 3 and notice one step late, when the parameters are already NaN.

The single-process cases go through `disttrain.trainer.fit`; the multi-rank ones run under real
mpiexec (pytest-mpi at 2 and 3 ranks, and the CLI at 2 ranks), where only one rank's gradient is NaN.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest

import launch
from disttrain import Tensor, nn
from disttrain.data import ArrayDataset, split_evenly
from disttrain.distributed import SingleProcessComm, init
from disttrain.trainer import NonFiniteError, fit

MODEL_FILE = os.path.join(os.path.dirname(__file__), "workers", "sqrt_features.py")
sys.path.insert(0, os.path.dirname(MODEL_FILE))
from sqrt_features import SqrtFeatures  # noqa: E402

FEATURES, CLASSES, SAMPLES, BATCH = 5, 3, 40, 8  # 5 steps per epoch
NAN_STEP = 3
NAN_ROW = (NAN_STEP - 1) * BATCH + 5  # position 5 of global batch 3: one rank's part on 2 and 3 ranks
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")


def _data():
    """SAMPLES positive samples (features in [0.5, 1.5], so x * scale > 0 while scale stays positive)
    and one feature of sample NAN_ROW exactly 0."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, (SAMPLES, FEATURES)).astype(np.float32)
    x[NAN_ROW, 2] = 0.0
    return x, rng.integers(0, CLASSES, SAMPLES)


def _model():
    nn.manual_seed(4)
    return SqrtFeatures(FEATURES, CLASSES)


def _fit(model, run_dir, comm, on_nonfinite, max_steps=0) -> dict:
    """Train `model` one epoch with Adam on the unshuffled data; returns fit's summary."""
    return fit(model, ArrayDataset(*_data()), nn.SoftmaxLoss(), comm=comm, optimizer={"name": "adam", "lr": 0.05},
               training={"epochs": 1, "batch_size": BATCH, "shuffle": False, "max_steps": max_steps,
                         "on_nonfinite": on_nonfinite, "log_every": 1, "progress": "none",
                         "run_dir": str(run_dir)},
               checkpoint={"every_epochs": 0, "every_steps": 0})


def _trained(run_dir, comm, on_nonfinite, max_steps=0):
    """(a fresh model trained by _fit, the summary)."""
    model = _model()
    return model, _fit(model, run_dir, comm, on_nonfinite, max_steps)


def _state(model):
    return {name: value.copy() for name, value in model.state_dict().items()}


def _assert_finite_and_equal(state, expected):
    assert state.keys() == expected.keys()
    for name, value in state.items():
        assert np.all(np.isfinite(value)), f"parameter '{name}' is not finite: {value}"
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def _train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return {r["step"]: r["loss"] for r in map(json.loads, handle) if r["kind"] == "train"}


# ---------------------------------------------------------------------------------- one process
def test_the_model_makes_a_nan_gradient_under_a_finite_loss_at_that_sample_only():
    """The premise of the other tests, checked without the trainer."""
    model = _model()
    x, y = _data()
    for rows, nan_expected in ((slice(NAN_ROW - 5, NAN_ROW + 3), True), (slice(0, BATCH), False)):
        loss = nn.SoftmaxLoss()(model(Tensor(x[rows])), y[rows])
        loss.backward()
        assert np.isfinite(float(loss.data))
        assert bool(np.isnan(np.asarray(model.scale.grad)).any()) == nan_expected
        assert np.all(np.isfinite(np.asarray(model.head.weight.grad)))
        model.zero_grad()


def test_a_nan_gradient_under_a_finite_loss_stops_training_at_that_step(tmp_path):
    with pytest.raises(NonFiniteError, match=rf"\bstep {NAN_STEP}\b.*'scale'") as error:
        _trained(tmp_path, SingleProcessComm(), "error")
    assert f"step {NAN_STEP + 1}" not in str(error.value)
    losses = _train_losses(tmp_path)
    assert sorted(losses) == list(range(1, NAN_STEP)) and all(np.isfinite(list(losses.values())))


def test_a_nan_gradient_stop_leaves_the_parameters_as_after_the_step_before(tmp_path):
    reference, _ = _trained(tmp_path / "reference", SingleProcessComm(), "error", max_steps=NAN_STEP - 1)
    model = _model()
    with pytest.raises(NonFiniteError):
        _fit(model, tmp_path / "run", SingleProcessComm(), "error")
    _assert_finite_and_equal(_state(model), _state(reference))


def test_a_nan_gradient_under_a_finite_loss_is_skipped_leaving_every_parameter_as_before(tmp_path):
    reference, _ = _trained(tmp_path / "reference", SingleProcessComm(), "skip", max_steps=NAN_STEP - 1)
    skipped, summary = _trained(tmp_path / "skipped", SingleProcessComm(), "skip", max_steps=NAN_STEP)
    _assert_finite_and_equal(_state(skipped), _state(reference))
    assert summary["steps"] == NAN_STEP and summary["skipped_steps"] == 1


def test_training_continues_after_a_skipped_nan_gradient_step_with_finite_parameters(tmp_path):
    reference, _ = _trained(tmp_path / "reference", SingleProcessComm(), "skip", max_steps=NAN_STEP - 1)
    model, summary = _trained(tmp_path / "run", SingleProcessComm(), "skip")
    assert summary["steps"] == SAMPLES // BATCH and summary["skipped_steps"] == 1
    state, before = _state(model), _state(reference)
    assert all(np.all(np.isfinite(value)) for value in state.values())
    assert not np.array_equal(state["scale"], before["scale"])  # the steps after the skipped one trained
    assert all(np.isfinite(list(_train_losses(tmp_path / "run").values())))


# ----------------------------------------------------------------------------- several ranks
@pytest.fixture
def mpi_run_dir(tmp_path_factory):
    """One directory shared by every rank of the MPI job (rank 0's)."""
    comm = init(abort_on_exception=False)
    path = str(tmp_path_factory.mktemp("nonfinite")) if comm.rank == 0 else None
    return comm.broadcast_object(path)


@pytest.mark.mpi(min_size=2)
def test_a_nan_gradient_on_one_rank_stops_every_rank_at_that_step(mpi_run_dir):
    comm = init(abort_on_exception=False)
    owner = [r for r in range(comm.size)
             if NAN_ROW - (NAN_STEP - 1) * BATCH in range(*split_evenly(BATCH, comm.size, r))]
    assert owner == [1]  # one rank (not rank 0) sees the zero feature
    reference, _ = _trained(os.path.join(mpi_run_dir, "reference"), comm, "error", max_steps=NAN_STEP - 1)
    model = _model()
    with pytest.raises(NonFiniteError, match=rf"\bstep {NAN_STEP}\b.*'scale'"):
        _fit(model, os.path.join(mpi_run_dir, "error"), comm, "error")
    _assert_finite_and_equal(_state(model), _state(reference))


@pytest.mark.mpi(min_size=2)
def test_a_nan_gradient_on_one_rank_is_skipped_on_every_rank_leaving_the_parameters_as_before(mpi_run_dir):
    comm = init(abort_on_exception=False)
    reference, _ = _trained(os.path.join(mpi_run_dir, "reference"), comm, "skip", max_steps=NAN_STEP - 1)
    skipped, summary = _trained(os.path.join(mpi_run_dir, "skipped"), comm, "skip", max_steps=NAN_STEP)
    _assert_finite_and_equal(_state(skipped), _state(reference))
    assert summary["steps"] == NAN_STEP and summary["skipped_steps"] == 1
    everyone = comm.allgather_object({name: value.tobytes() for name, value in _state(skipped).items()})
    assert all(state == everyone[0] for state in everyone), "replicas differ"


def test_cli_on_two_ranks_stops_with_one_clean_error_naming_the_step(tmp_path):
    x, y = _data()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "x_test.npy", x[:8] + 1)
    np.save(tmp_path / "y_test.npy", y[:8])
    shutil.copy(MODEL_FILE, tmp_path / "sqrt_features.py")
    (tmp_path / "run.toml").write_text(f"""
[model]
name = "sqrt_features:build"

[data]
name = "npy"
path = "x.npy"
labels = "y.npy"
test_path = "x_test.npy"
test_labels = "y_test.npy"

[optimizer]
name = "adam"
lr = 0.05

[training]
epochs = 1
batch_size = {BATCH}
shuffle = false
seed = 4
log_every = 1
progress = "lines"
on_nonfinite = "error"

[checkpoint]
every_epochs = 0
""")
    proc = launch.disttrain("train", "run.toml", "--run-dir", "run", ranks=2, cwd=tmp_path, check=False,
                            timeout=120, MPIEXEC_TIMEOUT=90)
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("disttrain: error:")]
    assert len(errors) == 1, proc.stderr
    assert f"at step {NAN_STEP} " in errors[0] and "'scale'" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert sorted(_train_losses(tmp_path / "run")) == list(range(1, NAN_STEP))
