"""A run directory has one owner: RUN_DIR/disttrain.lock names the training writing there.

Two trainings started into one run dir at once: one trains, the other stops at start-up with one line
naming the holder (pid, host, start), and metrics.jsonl holds one run's records only. A lock left by a
process that is gone (same host) is taken over with a note; one from another host is an error that
says which file to remove. The lock is removed when training ends, whichever way it ends.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import launch
from disttrain.training import run_lock

WORKERS = os.path.join(os.path.dirname(__file__), "workers")
sys.path.insert(0, WORKERS)
from faults_processes import Job, assert_no_leftovers  # noqa: E402

CONFIG = """
[model]
name = "mlp"
hidden = [8]

[data]
name = "synthetic"
samples = 200
features = 6
classes = 3

[training]
epochs = 2
batch_size = 32
log_every = 1
progress = "lines"

[checkpoint]
every_epochs = 1
"""
STEPS = 10  # 2 epochs of 5 batches of 32 (160 training samples)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    return path


def _lock_path(run_dir):
    return os.path.join(run_dir, run_lock.LOCK_NAME)


def _write_lock(run_dir, **fields):
    os.makedirs(run_dir, exist_ok=True)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000",
              "process_start": run_lock._process_start(os.getpid()), "command": "disttrain train other.toml"}
    holder.update(fields)
    with open(_lock_path(run_dir), "w") as handle:
        json.dump(holder, handle)
    return holder


def test_two_trainings_started_into_one_run_dir_at_once_one_trains_the_other_stops_with_one_line(tmp_path, config):
    run_dir = tmp_path / "run"
    slow = {"DISTTRAIN_FAULT": "sleep:0:*:0.3"}  # each run takes > 3 s: the two overlap whichever starts first
    jobs = [Job(["train", config, "--run-dir", run_dir], ranks, str(tmp_path / f"job{ranks}"), **slow)
            for ranks in (0, 2)]
    try:
        results = [job.finish(120) for job in jobs]
    finally:
        for job in jobs:
            job.stop()
    for job in jobs:
        assert_no_leftovers(job.tag)
    codes = sorted(code for code, *_ in results)
    assert codes == [0, 1], results
    winner = next(result for result in results if result[0] == 0)
    loser = next(result for result in results if result[0] == 1)
    errors = [line for line in loser[2].splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"disttrain: error: run dir {run_dir} is in use by another "
                                                     f"training: pid "), loser[2]
    assert f"on host {socket.gethostname()}, started " in errors[0] and "Traceback" not in loser[2]
    assert "step 1/" not in loser[1] and f"done: {STEPS} steps" in winner[1]
    with open(run_dir / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle]  # every line whole: nothing interleaved or torn
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert not os.path.exists(_lock_path(run_dir))


def test_a_lock_left_by_a_process_that_is_gone_is_taken_over_with_a_note(tmp_path, config):
    gone = subprocess.Popen(["true"])
    gone.wait()
    _write_lock(tmp_path / "run", pid=gone.pid, process_start=None)
    proc = launch.disttrain("train", config, "--run-dir", tmp_path / "run", ranks=2, timeout=120)
    assert (f"note: took over the lock of run dir {tmp_path / 'run'}: pid {gone.pid} on host {socket.gethostname()} "
            f"(started 2026-01-01T00:00:00+0000) is no longer running") in proc.stdout
    assert f"done: {STEPS} steps" in proc.stdout and not os.path.exists(_lock_path(tmp_path / "run"))


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, config):
    _write_lock(tmp_path / "run", process_start=1)  # this test's pid, but not this process's start
    proc = launch.disttrain("train", config, "--run-dir", tmp_path / "run", timeout=120)
    assert f"pid {os.getpid()} on host" in proc.stdout and "is no longer running" in proc.stdout


def test_a_lock_held_by_a_running_process_stops_the_run_naming_pid_host_and_start(tmp_path, config):
    holder = _write_lock(tmp_path / "run")  # this test process: alive, on this host
    proc = launch.disttrain("train", config, "--run-dir", tmp_path / "run", ranks=2, timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"disttrain: error: run dir {tmp_path / 'run'} is in use by another training: pid {os.getpid()} on host "
        f"{socket.gethostname()}, started 2026-01-01T00:00:00+0000 (lock file {_lock_path(tmp_path / 'run')}). "
        f"Wait for it to end, stop it, or give this run another directory (--run-dir)")
    with open(_lock_path(tmp_path / "run")) as handle:
        assert json.load(handle) == holder  # left alone


def test_a_lock_from_another_host_is_an_error_that_says_which_file_to_remove(tmp_path, config):
    _write_lock(tmp_path / "run", host="node-17", pid=4242)
    proc = launch.disttrain("train", config, "--run-dir", tmp_path / "run", timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"disttrain: error: run dir {tmp_path / 'run'} is locked by pid 4242 on host node-17, started "
        f"2026-01-01T00:00:00+0000, which cannot be checked from {socket.gethostname()}. If no training runs "
        f"there, remove {_lock_path(tmp_path / 'run')} and start again")


def test_a_damaged_lock_file_is_an_error_naming_it(tmp_path, config):
    os.makedirs(tmp_path / "run")
    with open(_lock_path(tmp_path / "run"), "w") as handle:
        handle.write("{")
    proc = launch.disttrain("train", config, "--run-dir", tmp_path / "run", timeout=120, check=False)
    assert proc.returncode == 1 and "holds a lock file that is not disttrain's or is damaged" in proc.stderr


@pytest.mark.parametrize("fault, code", [("forward:1:3", 1), ("", 0)])
def test_the_lock_is_released_when_the_run_ends_by_error_or_normally(tmp_path, config, fault, code):
    checkpoints = tmp_path / "elsewhere"  # outside the run dir: locked too
    proc = launch.disttrain("train", config, "--run-dir", tmp_path / "run", "--set",
                            f"checkpoint.dir={json.dumps(str(checkpoints))}", ranks=2, timeout=120, check=False,
                            DISTTRAIN_FAULT=fault)
    assert proc.returncode == code, proc.stderr
    assert not os.path.exists(_lock_path(tmp_path / "run")) and not os.path.exists(_lock_path(checkpoints))


def test_a_checkpoint_dir_shared_by_two_runs_is_locked_too(tmp_path, config):
    checkpoints = tmp_path / "shared-checkpoints"
    _write_lock(checkpoints)
    proc = launch.disttrain("train", config, "--run-dir", tmp_path / "run", "--set",
                            f"checkpoint.dir={json.dumps(str(checkpoints))}", timeout=120, check=False)
    assert proc.returncode == 1 and f"checkpoint directory {checkpoints} is in use by another training" in proc.stderr
    assert not os.path.exists(_lock_path(tmp_path / "run"))  # the one it had taken is given back


def test_the_lock_is_released_after_a_stop_signal(tmp_path, config):
    proc = subprocess.Popen([sys.executable, "-m", "disttrain", "train", str(config), "--run-dir",
                             str(tmp_path / "run")], env=launch.env(DISTTRAIN_FAULT="sleep:0:*:0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not metrics.exists() or "step" not in metrics.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert os.path.exists(_lock_path(tmp_path / "run"))
        assert not os.path.exists(_lock_path(tmp_path / "run" / "checkpoints"))  # inside: covered by the run dir's
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "received SIGTERM" in out, err
    assert not os.path.exists(_lock_path(tmp_path / "run"))
