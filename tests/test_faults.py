"""Fault injection under real `mpiexec`: a failing, killed, signalled, sleeping or NaN-producing rank,
parameters that drift apart, and checkpoints that are half-written, truncated, corrupt, missing a shard
or written by another model. Nothing may hang, nothing but the work since the last checkpoint may be
lost, and every failure must be reported once, by name.

Faults are injected through DISTTRAIN_FAULT (disttrain/faults.py) or by signalling processes found
through /proc (tests/workers/faults_processes.py). Every job runs with a timeout, and every test checks
that no process of its job is left behind. Elapsed-time bounds are loose on purpose (this machine has
2 cores and is shared): they tell "ends within seconds" from "hangs until a timeout".
"""

import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest

WORKERS = os.path.join(os.path.dirname(__file__), "workers")
sys.path.insert(0, WORKERS)
from faults_processes import Job, assert_no_leftovers, rank_pids  # noqa: E402

from disttrain import checkpoint  # noqa: E402
from disttrain.distributed import SingleProcessComm  # noqa: E402

# 300 synthetic samples -> 240 train -> 4 steps per epoch of global batch 64; 3 epochs = 12 steps
CONFIG = """
[model]
name = "mlp"
hidden = [32]

[data]
name = "synthetic"
samples = 300
features = 16
classes = 4

[optimizer]
name = "adam"
lr = 0.01

[training]
epochs = 3
batch_size = 64
log_every = 1
progress = "lines"

[checkpoint]
every_steps = 2
every_epochs = 0
keep = 3
"""
STEPS = 12
QUICK = 30  # seconds: "within seconds" on a loaded 2-core machine; a hang would run into the timeout


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "faults.toml"
    path.write_text(CONFIG)
    return str(path)


def train(config, run_dir, *settings, ranks=2, fault=None, resume=False, timeout=120):
    """Run `disttrain train` to its end; returns (exit code, stdout, stderr, seconds). No leftovers allowed."""
    args = ["train", config, "--run-dir", run_dir, *(x for s in settings for x in ("--set", s))]
    if resume:
        args += ["--resume"] if resume is True else ["--resume", str(resume)]
    env = {"DISTTRAIN_FAULT": fault} if fault else {}
    job = Job(args, ranks, str(run_dir) + f"-{time.monotonic_ns()}", **env)
    try:
        result = job.finish(timeout)
    finally:
        job.stop()
    assert_no_leftovers(job.tag)
    return result


def run_script(name, args, ranks, log_dir, timeout=120):
    """Run tests/workers/NAME under mpiexec; (exit code, stdout, stderr, seconds). No leftovers allowed."""
    job = Job(args, ranks, str(log_dir / name), script=os.path.join(WORKERS, name))
    try:
        result = job.finish(timeout)
    finally:
        job.stop()
    assert_no_leftovers(job.tag)
    return result


def train_ok(config, run_dir, *settings, **kwargs):
    code, out, err, _ = train(config, run_dir, *settings, **kwargs)
    assert code == 0, f"exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


def train_losses(run_dir) -> dict:
    """{step: global loss} from metrics.jsonl; every step once (a resume must not leave duplicates)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        steps = [(r["step"], r["loss"]) for r in map(json.loads, handle) if r["kind"] == "train"]
    assert [s for s, _ in steps] == sorted({s for s, _ in steps}), f"steps repeated or out of order: {steps}"
    return dict(steps)


def record_kinds(run_dir) -> list:
    """[(kind, step)] of every metrics record, in file order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [(r["kind"], r["step"]) for r in map(json.loads, handle)]


def final_state(run_dir):
    """(step, {name: array}) of the run's latest checkpoint: parameters and the full optimizer state."""
    params, manifest, path = checkpoint.read_model(str(run_dir))
    state = {f"param.{name}": value for name, value in params.items()}
    for key, per_param in checkpoint.consolidated_optimizer_state(path, manifest).items():
        state.update({f"optimizer.{key}.{name}": value for name, value in per_param.items()})
    scalars = manifest["optimizer"]["scalars"]
    state.update({f"scalar.{key}": np.asarray(value) for key, value in scalars.items()})
    return manifest["step"], state


def assert_same_training(run_dir, reference_dir, steps=STEPS):
    """Bit for bit: the same final parameters and optimizer state, and the same loss at every step."""
    step, state = final_state(run_dir)
    ref_step, reference = final_state(reference_dir)
    assert step == ref_step == steps
    assert sorted(state) == sorted(reference)
    for name in reference:
        assert state[name].dtype == reference[name].dtype, name
        assert np.array_equal(state[name], reference[name]), f"{name} differs from the uninterrupted run"
    assert train_losses(run_dir) == train_losses(reference_dir)
    assert sorted(train_losses(run_dir)) == list(range(1, steps + 1))
    assert record_kinds(run_dir) == record_kinds(reference_dir)  # no eval/epoch record lost or repeated


def latest_step(run_dir) -> int:
    with open(os.path.join(run_dir, "checkpoints", "latest")) as handle:
        return int(handle.read().strip().split("-")[1])


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """Uninterrupted runs (12 steps by default, checkpoints every 2, keep 3), one per world size and
    length, made on first use."""
    runs = {}

    def get(ranks, epochs=3):
        if (ranks, epochs) not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference-{ranks}-{epochs}") / "run"
            train_ok(config, run_dir, f"training.epochs={epochs}", ranks=ranks)
            runs[ranks, epochs] = run_dir
        return runs[ranks, epochs]
    return get


# ------------------------------------------------------------------------------- rank failures
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("point, failing, step", [("data", 0, 3), ("forward", -1, 3), ("backward", -1, 2),
                                                  ("checkpoint", -1, 2)])
def test_exception_on_one_rank_ends_the_job_within_seconds_with_its_traceback_once(config, tmp_path, ranks,
                                                                                   point, failing, step):
    failing = failing % ranks
    code, out, err, seconds = train(config, tmp_path / "run", ranks=ranks, fault=f"{point}:{failing}:{step}")
    assert code == 1, f"exit code {code}\n{err}"
    assert seconds < QUICK
    assert err.count("Traceback (most recent call last)") == 1, err
    assert f"[rank {failing}] Traceback (most recent call last)" in err
    trace = [line for line in err.splitlines() if line.lstrip("[rank 0123456789]").startswith("File ")]
    assert trace and all(line.startswith(f"[rank {failing}] ") for line in trace), err
    # the agreed summary: printed once, by rank 0, naming the failing rank and the fault
    assert err.count("disttrain: error:") == 1, err
    summary = next(line for line in err.splitlines() if "disttrain: error:" in line)
    assert f"failed on rank {failing}" in summary
    assert f"InjectedFault: injected fault in {point} at step {step}" in summary
    if point == "checkpoint":  # the first checkpoint failed: none was published
        assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest")


@pytest.mark.parametrize("ranks", [2, 3])
def test_uncaught_exception_aborts_every_rank_waiting_in_a_collective(tmp_path, ranks):
    """disttrain.distributed.init()'s hook: without it the waiting ranks would hang forever."""
    code, out, err, seconds = run_script("faults_uncaught.py", [], ranks, tmp_path)
    last = ranks - 1
    assert code != 0 and seconds < QUICK
    assert err.count("Traceback (most recent call last)") == 1, err
    assert f"[rank {last}] Traceback (most recent call last)" in err
    assert f"[rank {last}] RuntimeError: deliberate failure on rank {last}" in err
    assert f"aborting all {ranks} ranks because rank {last} failed" in err


# ------------------------------------------------------------------------------ SIGKILL + resume
@pytest.mark.parametrize("ranks", [2, 3])
def test_rank_killed_mid_step_ends_the_job_and_resume_matches_the_uninterrupted_run_bit_for_bit(
        config, reference, tmp_path, ranks):
    run_dir = tmp_path / "run"
    code, out, err, seconds = train(config, run_dir, ranks=ranks, fault=f"kill:{ranks - 1}:7")
    assert code != 0 and seconds < QUICK, f"exit code {code}\n{err}"
    assert latest_step(run_dir) == 6  # the last complete checkpoint before the kill at step 7
    out, _ = train_ok(config, run_dir, ranks=ranks, resume=True)
    assert f"resumed from {run_dir}/checkpoints/step-00000006 at step 6" in out
    assert_same_training(run_dir, reference(ranks))


# --------------------------------------------------------------------------------- stop signals
def _wait_for_step(run_dir, step, job, timeout=60):
    deadline = time.monotonic() + timeout
    path = os.path.join(run_dir, "metrics.jsonl")
    while time.monotonic() < deadline:
        assert job.process.poll() is None, f"the job ended early:\n{job.stderr()}"
        if os.path.exists(path):
            with open(path) as handle:
                if any(json.loads(line).get("step", 0) >= step for line in handle if line.endswith("\n")):
                    return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout} s")


@pytest.mark.parametrize("signum, target, ranks", [(signal.SIGTERM, "mpiexec", 2), (signal.SIGUSR1, "mpiexec", 3),
                                                   (signal.SIGTERM, "one rank", 3), (signal.SIGUSR1, "one rank", 2)])
def test_stop_signal_saves_a_checkpoint_exits_zero_and_resume_matches_the_uninterrupted_run(
        config, reference, tmp_path, signum, target, ranks):
    # 40 steps, slowed to >= 0.1 s each by a sleeping rank 0 so the signal lands mid-training;
    # sleeping changes no numbers, so the uninterrupted reference runs without it
    run_dir = tmp_path / "run"
    job = Job(["train", config, "--run-dir", run_dir, "--set", "training.epochs=10"], ranks, str(tmp_path / "job"),
              DISTTRAIN_FAULT="sleep:0:*:0.1")
    try:
        _wait_for_step(run_dir, 3, job)
        pid = job.process.pid if target == "mpiexec" else rank_pids(job.tag)[ranks - 1]
        job.mark()
        os.kill(pid, signum)
        code, out, err, seconds = job.finish(120)
    finally:
        job.stop()
    assert_no_leftovers(job.tag)
    assert code == 0, f"exit code {code}\n{err}"
    assert seconds < QUICK
    stopped = latest_step(run_dir)
    assert 3 <= stopped < 40
    assert f"saved checkpoint {run_dir}/checkpoints/step-{stopped:08d} at step {stopped}" in out
    assert f"received {signal.Signals(signum).name}: saved checkpoint" in out  # named even if one rank got it
    assert "resume with: " in out
    assert "Traceback" not in err
    out, _ = train_ok(config, run_dir, "training.epochs=10", ranks=ranks, resume=True)
    assert f"resumed from {run_dir}/checkpoints/step-{stopped:08d} at step {stopped}" in out
    assert_same_training(run_dir, reference(ranks, epochs=10), steps=40)


def test_stop_signal_arriving_after_training_finished_leaves_exit_code_zero(config, tmp_path):
    """A batch system's warning can come as the job exits: the work is saved, the exit must stay 0."""
    job = Job(["train", config, "--run-dir", tmp_path / "run"], 2, str(tmp_path / "job"))
    try:
        pids = {}
        while job.process.poll() is None and "done:" not in job.stdout():
            pids = rank_pids(job.tag) or pids
            time.sleep(0.005)
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # already gone: nothing to test on this rank
                pass
        code, out, err, _ = job.finish(60)
    finally:
        job.stop()
    assert_no_leftovers(job.tag)
    assert len(pids) == 2 and "done:" in out
    assert code == 0, f"exit code {code}\n{out}\n{err}"


# ------------------------------------------------------------------------------------- watchdog
@pytest.mark.parametrize("ranks", [2, 3])
def test_watchdog_aborts_a_job_whose_rank_sleeps_and_names_the_collective_the_others_wait_in(config, tmp_path,
                                                                                             ranks):
    sleeper = ranks - 1
    code, out, err, seconds = train(config, tmp_path / "run", "training.watchdog_seconds=6", ranks=ranks,
                                    fault=f"sleep:{sleeper}:3:120")
    assert code != 0, err
    assert seconds < QUICK  # the sleep alone would take 120 s
    assert "[rank 0] watchdog: step 3 has run for" in err
    # the first collective of the gradient sync: the allreduce of which parameters have gradients
    assert "waiting in collective 'allreduce'" in err
    assert f"[rank {sleeper}] watchdog: step 3 has run for" in err
    assert "not inside a collective" in err
    # rank 0 hears every rank's heartbeat: it names the rank that is not in the collective, and why
    assert f"Not in a collective: rank {sleeper} (step 3, computing" in err
    assert all(f"rank {rank} (step" not in err for rank in range(1, sleeper)), err  # the waiting ones are not named


# ---------------------------------------------------------------------------- numerical faults
@pytest.mark.parametrize("ranks", [2, 3])
def test_nan_on_one_rank_stops_every_rank_with_an_error_naming_step_and_parameter(config, tmp_path, ranks):
    code, out, err, seconds = train(config, tmp_path / "run", ranks=ranks, fault=f"nan:{ranks - 1}:3")
    assert code == 1 and seconds < QUICK, err
    assert err.count("disttrain: error:") == 1, err
    assert "non-finite loss or gradient at step 3" in err
    assert f"first parameter with a non-finite gradient: '1.weight' (non-finite loss on rank {ranks - 1})" in err
    assert "Traceback" not in err
    assert "step 3/" not in out  # nothing was logged as a completed step 3


@pytest.mark.parametrize("ranks", [2, 3])
def test_nan_on_one_rank_in_skip_mode_skips_that_step_on_all_ranks_and_counts_it(config, tmp_path, ranks):
    run_dir = tmp_path / "run"
    out, err = train_ok(config, run_dir, 'training.on_nonfinite="skip"', "training.check_replicas_every=1",
                        ranks=ranks, fault=f"nan:{ranks - 1}:3")
    assert "step 3: non-finite loss or gradient, step skipped on all ranks (1 so far)" in out
    with open(run_dir / "metrics.jsonl") as handle:
        records = {r["step"]: r for r in map(json.loads, handle) if r["kind"] == "train"}
    assert [records[s]["skipped_steps"] for s in (2, 3, 4, STEPS)] == [0, 1, 1, 1]
    _, state = final_state(run_dir)
    assert all(np.all(np.isfinite(value)) for value in state.values())
    assert state["scalar.step"] == STEPS - 1  # Adam's step count: the skipped step made no update


@pytest.mark.parametrize("ranks", [2, 3])
def test_replica_check_reports_the_first_differing_parameter_on_every_rank(tmp_path, ranks):
    # (that the check passes on healthy replicas is pinned by the skip-mode test, which checks every step)
    code, out, err, _ = run_script("faults_replicas.py", [tmp_path, "corrupt"], ranks, tmp_path)
    assert code == 0, err
    results = {(tmp_path / f"rank-{r}.txt").read_text() for r in range(ranks)}
    assert results == {"ReplicaMismatchError: parameter '1.weight' differs across ranks at step 2 "
                       "(ranks must hold bit-identical parameters)"}


# -------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("ranks, killed", [(2, 0), (3, 2)])
def test_checkpoint_killed_mid_write_is_never_used_and_resume_uses_the_previous_one(config, reference, tmp_path,
                                                                                    ranks, killed):
    run_dir = tmp_path / "run"
    code, out, err, seconds = train(config, run_dir, ranks=ranks, fault=f"checkpoint:{killed}:6:kill")
    assert code != 0 and seconds < QUICK, err
    assert latest_step(run_dir) == 4
    assert not os.path.exists(run_dir / "checkpoints" / "step-00000006")
    assert os.path.isdir(run_dir / "checkpoints" / ".partial-step-00000006")
    out, err = train_ok(config, run_dir, ranks=ranks, resume=True)
    assert f"resumed from {run_dir}/checkpoints/step-00000004 at step 4" in out
    assert "warning" not in out + err  # a partial directory is not a checkpoint: nothing to skip
    assert_same_training(run_dir, reference(ranks))


def _line_starting(text, prefix):
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one line starting with {prefix!r} in:\n{text}"
    return lines[0]


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(path):
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {
    "truncated shard": ("optimizer-part-00001.npz", _truncate, "truncated or altered"),
    "corrupt model file": ("model.npz", _flip_a_byte, "checksum mismatch (the file is corrupt)"),
    "missing shard": ("optimizer-part-00000.npz", os.remove, "missing (a shard of this checkpoint is gone)"),
    "missing manifest": ("manifest.json", os.remove, "missing (the checkpoint is incomplete)"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_is_refused_by_name_and_resume_falls_back_to_the_previous_one(
        config, reference, tmp_path, damage):
    name, spoil, reason = DAMAGE[damage]
    run_dir = tmp_path / "run"
    shutil.copytree(reference(2), run_dir)
    spoil(run_dir / "checkpoints" / "step-00000012" / name)
    out, err = train_ok(config, run_dir, ranks=2, resume=True)
    latest = run_dir / "checkpoints" / "step-00000012"
    warning = _line_starting(out + err, f"warning: skipping checkpoint {latest}: ")
    assert f"{latest}/{name}: {reason}" in warning
    assert f"resumed from {run_dir}/checkpoints/step-00000010 at step 10" in out
    assert_same_training(run_dir, reference(2))


def test_checkpoint_of_a_different_model_is_skipped_with_a_warning_and_refused_when_alone(config, reference,
                                                                                          tmp_path):
    other = tmp_path / "other"
    train_ok(config, other, "model.hidden=[8]", "training.epochs=1", ranks=2)
    run_dir = tmp_path / "run"
    shutil.copytree(reference(2), run_dir)
    # a newer checkpoint from the other model, pointed to by `latest`
    shutil.copytree(other / "checkpoints" / "step-00000004", run_dir / "checkpoints" / "step-00000099")
    (run_dir / "checkpoints" / "latest").write_text("step-00000099\n")
    out, err = train_ok(config, run_dir, ranks=2, resume=True)
    foreign = run_dir / "checkpoints" / "step-00000099"
    warning = _line_starting(out + err, f"warning: skipping checkpoint {foreign}: ")
    assert f"{foreign}: written by a different model" in warning and "mis-shaped ['1.weight:" in warning
    assert f"resumed from {run_dir}/checkpoints/step-00000012 at step 12" in out
    # alone, the other model's checkpoint is refused: an error naming it and the changed key, exit 1, no training
    code, out, err, seconds = train(config, tmp_path / "alone", ranks=2,
                                    resume=other / "checkpoints" / "step-00000004")
    assert code == 1 and seconds < QUICK
    assert err.count("disttrain: error:") == 1, err
    assert f"cannot resume {other}/checkpoints/step-00000004 with a changed model.hidden = [" in err
    assert "step 1/" not in out


def test_unwritable_checkpoint_directory_is_reported_before_training_starts(config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, out, err, seconds = train(config, tmp_path / "run", f'checkpoint.dir="{blocker}/checkpoints"', ranks=2)
    assert code == 1 and seconds < QUICK
    assert err.count("disttrain: error:") == 1, err
    assert f"checkpoint directory '{blocker}/checkpoints' is not writable" in err
    assert "step 1/" not in out and "Traceback" not in err


def test_checkpoint_directory_without_room_for_a_checkpoint_is_refused(tmp_path):
    needed = shutil.disk_usage(tmp_path).free + 2**40
    with pytest.raises(checkpoint.CheckpointError, match=r"GiB free, a checkpoint needs about [0-9.]+ GiB"):
        checkpoint.probe(str(tmp_path), SingleProcessComm(), needed)
