"""Resuming under real mpiexec, through the `disttrain train` CLI.

Same world size: a run stopped by SIGUSR1 (raised on one rank, at a fixed step, by a model wrapper:
the stop is agreed by all ranks and saves a checkpoint) and continued with `--resume` must equal an
uninterrupted run BIT FOR BIT: every metrics record except timings (losses, learning rates, epoch
train losses, test metrics) and the final parameters and Adam moments. The config uses a cosine
schedule with warm-up and dropout, so the scheduler, sampler position and per-rank RNG must all be
restored exactly. N = 1, 2, 3 stop mid-epoch (step 10); N = 2 also stops on an epoch's last step (7),
before the end-of-epoch evaluation, which the resumed run must then do.

Resharding: a run stopped by training.max_steps on N ranks resumes on M ranks, (N, M) in (4, 3),
(2, 1), (1, 3), (3, 2), with Adam under ZeRO-1 and small gradient buckets (several owned ranges per
rank). The first 10 steps come from the N-rank run and are identical to the uninterrupted N-rank
run; the rest must match the uninterrupted runs on N and on M ranks within float tolerance: losses
1e-5 relative; parameters and first moments 1e-4 relative + 2e-5 absolute; second moments (values
1e-5 to 1e-3) 1e-4 relative + 1e-7 absolute. Why that tolerance: N and M ranks sum the same per-sample
gradients in a different order, so after the switch the runs differ by float32 rounding - a few
units in the last place per step (measured: at most 1.6e-7 relative in losses and 1.2e-7 absolute
in parameters over the 11 steps after the switch), which Adam's elementwise normalisation keeps from
growing. A resharding bug (a moment zeroed, shifted or taken from the wrong element) changes
parameters by more than 1e-3.

The training set has 203 samples (not divisible by 2, 3 or 4) in global batches of 32, so every
epoch ends with an uneven batch of 11.
"""

import json
import os
import shutil

import numpy as np
import pytest

import launch
from disttrain import checkpoint as ckpt

STOP_STEP = 10
TOTAL_STEPS = 21  # 3 epochs of 7 global batches
TIMINGS = {"samples_per_s", "compute_s", "comm_s", "optimizer_s", "step_s", "seconds"}

COMMON = """
[data]
name = "synthetic"
samples = 254        # 203 train / 51 test
features = 12
classes = 4
test_fraction = 0.2

[optimizer]
name = "adam"
lr = 0.01
sharded = true
bucket_mb = 0.00025  # 65 elements: several buckets, so each rank owns several ranges

[training]
epochs = 3
batch_size = 32
log_every = 1
seed = 3

[checkpoint]
every_steps = 4
every_epochs = 0
keep = 3
"""

# The stop is raised from inside the model on one rank, so it lands at the same step every time.
STOPPER = """
import os
import signal

from disttrain import models, nn


class SignalAt(nn.Module):
    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(signal.SIGUSR1)
        return self.inner(x)


def mlp(input_shape, classes, hidden=(16,), dropout=0.0):
    at = int(os.environ.get("STOP_AT_STEP", "0"))
    if os.environ.get("PMI_RANK", "0") != os.environ.get("STOP_RANK", "0"):
        at = 0
    return SignalAt(models.mlp(input_shape, classes, hidden, "relu", dropout), at)
"""


def _config(model: str, schedule: str) -> str:
    """The shared config with a [model] section and schedule keys added to [training]."""
    return model + COMMON.replace("[checkpoint]", schedule + "\n[checkpoint]")


SAME_WORLD_CONFIG = _config('[model]\nname = "stopper:mlp"\noptions = {hidden = [16], dropout = 0.2}\n',
                            'schedule = "cosine"\nwarmup_steps = 3\n')
RESHARD_CONFIG = _config('[model]\nname = "mlp"\nhidden = [16]\n', 'schedule = "step"\nstep_size = 5\ngamma = 0.7\n')


def train(workdir, config, run_dir, ranks, *extra, **env):
    """`disttrain train` on `ranks` ranks (0: a plain process) in `workdir`; returns its stdout."""
    # hydra's own timeout fires first, so a hung job is ended with its ranks rather than orphaning them
    return launch.disttrain("train", config, "--run-dir", run_dir, *extra, ranks=ranks, timeout=180,
                            cwd=workdir, MPIEXEC_TIMEOUT=150, **env).stdout


def records(run_dir, kinds=("train", "epoch", "eval")):
    """metrics.jsonl records without wall-clock fields."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [{k: v for k, v in record.items() if k not in TIMINGS}
                for record in map(json.loads, handle) if record["kind"] in kinds]


def final_state(run_dir):
    """(parameters, {state key: {param: array}}, manifest) of the run's last checkpoint."""
    path = os.path.join(run_dir, "checkpoints", ckpt.step_dirname(TOTAL_STEPS))
    params, manifest, _ = ckpt.read_model(path)
    return params, ckpt.consolidated_optimizer_state(path, manifest), manifest


def latest(run_dir):
    with open(os.path.join(run_dir, "checkpoints", ckpt.LATEST)) as handle:
        return handle.read().strip()


# --------------------------------------------------------------------------- same world size, exact
SAME_WORLD_CASES = [(1, STOP_STEP), (2, STOP_STEP), (3, STOP_STEP), (2, 7)]  # (ranks, step stopped at)


@pytest.fixture(scope="module")
def same_world(tmp_path_factory):
    """{(ranks, stop step): (uninterrupted run dir, interrupted-then-resumed run dir, outputs)}."""
    workdir = tmp_path_factory.mktemp("resume")
    (workdir / "stopper.py").write_text(STOPPER)
    (workdir / "run.toml").write_text(SAME_WORLD_CONFIG)
    runs = {}
    for ranks, stop in SAME_WORLD_CASES:
        whole, pieces = str(workdir / f"whole-{ranks}"), str(workdir / f"pieces-{ranks}-{stop}")
        if not os.path.isdir(whole):
            train(workdir, "run.toml", whole, ranks)
        stopped = train(workdir, "run.toml", pieces, ranks, STOP_AT_STEP=stop, STOP_RANK=ranks - 1)
        stopped_records = records(pieces, ("train", "epoch", "eval"))
        stopped_latest = latest(pieces)
        resumed = train(workdir, "run.toml", pieces, ranks, "--resume")
        with open(os.path.join(pieces, "metrics.jsonl")) as handle:
            epoch_records = [r for r in map(json.loads, handle) if r["kind"] == "epoch"]
        runs[ranks, stop] = (whole, pieces, {"stopped": stopped, "stopped_records": stopped_records,
                                              "stopped_latest": stopped_latest, "resumed": resumed,
                                              "epoch_records": epoch_records})
    return runs


@pytest.mark.parametrize("ranks, stop", SAME_WORLD_CASES)
def test_sigusr1_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(same_world, ranks, stop):
    _, _, out = same_world[ranks, stop]
    # the ranks agree on which signal came, so rank 0 names it even when another rank received it
    assert "received SIGUSR1: saved checkpoint" in out["stopped"] and f"at step {stop};" in out["stopped"]
    assert out["stopped_latest"] == ckpt.step_dirname(stop)
    assert [r["step"] for r in out["stopped_records"] if r["kind"] == "train"] == list(range(1, stop + 1))
    # the epoch end (evaluation, epoch record) of the stop step is left to the resumed run
    assert all(r["step"] < stop for r in out["stopped_records"] if r["kind"] != "train")
    assert "resumed from " in out["resumed"] and f"at step {stop} (epoch {(stop - 1) // 7 + 1})" in out["resumed"]


@pytest.mark.parametrize("ranks, stop", SAME_WORLD_CASES)
def test_resumed_run_matches_uninterrupted_run_bit_for_bit_on_the_same_world_size(same_world, ranks, stop):
    whole, pieces, _ = same_world[ranks, stop]
    expected, got = records(whole), records(pieces)
    assert [r["step"] for r in got if r["kind"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    assert len([r for r in got if r["kind"] == "eval"]) == 3
    assert got == expected  # every loss, lr, epoch train loss and test metric, exactly

    params_whole, state_whole, manifest_whole = final_state(whole)
    params_pieces, state_pieces, manifest_pieces = final_state(pieces)
    assert manifest_pieces["world_size"] == manifest_whole["world_size"] == ranks
    assert params_pieces.keys() == params_whole.keys()
    for name in params_whole:
        assert params_pieces[name].dtype == np.float32
        assert np.array_equal(params_pieces[name], params_whole[name]), name
    assert state_pieces.keys() == state_whole.keys() == {"exp_avg", "exp_avg_sq"}
    for key in state_whole:
        for name in state_whole[key]:
            assert np.array_equal(state_pieces[key][name], state_whole[key][name]), (key, name)
    assert manifest_pieces["optimizer"]["scalars"] == manifest_whole["optimizer"]["scalars"] == {"step": TOTAL_STEPS}


@pytest.mark.parametrize("stop, samples_by_epoch", [(STOP_STEP, [203, 107, 203]), (7, [0, 203, 203])])
def test_epoch_throughput_after_a_resume_counts_only_samples_trained_since(same_world, stop, samples_by_epoch):
    # the epoch record's samples/s is over the time this process spent on the epoch: samples from
    # before the stop (steps 8-10 of epoch 2: 96 samples; all of epoch 1) must not be counted in it
    _, _, out = same_world[2, stop]
    records_ = out["epoch_records"]
    assert [r["step"] for r in records_] == [7, 14, 21]
    assert [round(r["samples_per_s"] * r["seconds"]) for r in records_] == samples_by_epoch


def test_checkpoints_record_each_ranks_own_dropout_rng_state(same_world):
    # with dropout drawing from it, a resumed rank that did not get its own RNG back would differ above
    whole, _, _ = same_world[2, STOP_STEP]
    with open(os.path.join(whole, "checkpoints", ckpt.step_dirname(20), ckpt.MANIFEST)) as handle:
        states = json.load(handle)["rng_states"]
    assert len(states) == 2 and states[0] != states[1]


# ------------------------------------------------------------------------ resharding, within tolerance
RESHARD_PAIRS = [(4, 3), (2, 1), (1, 3), (3, 2)]


def _launch_ranks(ranks):
    return 0 if ranks == 1 else ranks  # one rank: a plain process, as on a laptop


@pytest.fixture(scope="module")
def reshard(tmp_path_factory):
    """{"whole": {ranks: run dir}, "pieces": {(n, m): run dir}, "output": {(n, m): resumed stdout},
    "stop_manifests": {(n, m): manifest of the checkpoint resumed from}}."""
    workdir = tmp_path_factory.mktemp("reshard")
    (workdir / "run.toml").write_text(RESHARD_CONFIG)
    whole, stopped, pieces, output, stop_manifests = {}, {}, {}, {}, {}
    for ranks in (1, 2, 3, 4):
        whole[ranks] = str(workdir / f"whole-{ranks}")
        train(workdir, "run.toml", whole[ranks], _launch_ranks(ranks))
    for written_by in sorted({n for n, _ in RESHARD_PAIRS}):
        stopped[written_by] = str(workdir / f"stopped-{written_by}")
        train(workdir, "run.toml", stopped[written_by], _launch_ranks(written_by),
              "--set", f"training.max_steps={STOP_STEP}")
    for written_by, read_by in RESHARD_PAIRS:
        pieces[written_by, read_by] = str(workdir / f"pieces-{written_by}-{read_by}")
        shutil.copytree(stopped[written_by], pieces[written_by, read_by])
        stop_manifests[written_by, read_by] = ckpt.read_manifest(
            os.path.join(pieces[written_by, read_by], "checkpoints", ckpt.step_dirname(STOP_STEP)))
        output[written_by, read_by] = train(workdir, "run.toml", pieces[written_by, read_by],
                                            _launch_ranks(read_by), "--resume")
    return {"whole": whole, "pieces": pieces, "output": output, "stop_manifests": stop_manifests}


def _flat(arrays):
    return np.concatenate([arrays[name].ravel() for name in sorted(arrays)])


@pytest.mark.parametrize("written_by, read_by", RESHARD_PAIRS)
def test_checkpoint_of_n_ranks_resumes_on_m_ranks_to_the_uninterrupted_result(reshard, written_by, read_by):
    run_dir = reshard["pieces"][written_by, read_by]
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', ckpt.step_dirname(STOP_STEP))}" \
        in reshard["output"][written_by, read_by]
    assert reshard["stop_manifests"][written_by, read_by]["world_size"] == written_by
    params, state, manifest = final_state(run_dir)
    assert manifest["world_size"] == read_by
    assert len([name for name in manifest["files"] if name.startswith("optimizer-part-")]) == read_by

    got = records(run_dir, ("train",))
    assert [r["step"] for r in got] == list(range(1, TOTAL_STEPS + 1))
    # steps before the stop were trained on N ranks: identical to the uninterrupted N-rank run
    assert got[:STOP_STEP] == records(reshard["whole"][written_by], ("train",))[:STOP_STEP]
    for reference_ranks in sorted({written_by, read_by}):
        reference = reshard["whole"][reference_ranks]
        expected = records(reference, ("train",))
        assert [r["lr"] for r in got] == [r["lr"] for r in expected]
        np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in expected], rtol=1e-5)
        ref_params, ref_state, _ = final_state(reference)
        np.testing.assert_allclose(_flat(params), _flat(ref_params), rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(_flat(state["exp_avg"]), _flat(ref_state["exp_avg"]), rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(_flat(state["exp_avg_sq"]), _flat(ref_state["exp_avg_sq"]), rtol=1e-4, atol=1e-7)
    assert manifest["optimizer"]["scalars"] == {"step": TOTAL_STEPS}


def test_resharded_runs_trained_and_the_world_sizes_really_differ(reshard):
    # guards the comparison above against runs that trained nothing or compared a run with itself
    epoch_losses = [r["train_loss"] for r in records(reshard["whole"][1], ("epoch",))]
    assert len(epoch_losses) == 3 and epoch_losses[-1] < 0.8 * epoch_losses[0]
    first, _, _ = final_state(reshard["whole"][1])
    initial_gap = [np.abs(_flat(final_state(reshard["whole"][n])[0]) - _flat(first)).max() for n in (2, 3, 4)]
    assert max(initial_gap) > 0  # different world sizes do round differently: the tolerance is needed
