"""The disk: what a checkpoint needs, and a disk that fills up.

The start-up check asks for what a checkpoint really takes (never less, at most 1.5x); its probe file
never stays behind; what interrupted saves left (`.partial-*`, `.probe-*`, `latest.tmp`) is removed at
the next start. A full disk while saving a checkpoint or writing metrics.jsonl ends the job with one
line naming the file, the rank and the space it needed, no traceback, and the previous checkpoint
intact and resumable. Real full disks are small tmpfs mounts (needs root: CI runs as root; elsewhere
those tests skip, saying so); the same failures are also injected in-process on a chosen rank.
"""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

import launch
from disttrain import checkpoint as ckpt
from disttrain.distributed import SingleProcessComm

WORKERS = os.path.join(os.path.dirname(__file__), "workers")

CONFIG = """
[model]
name = "mlp"
hidden = [{hidden}, {hidden}]

[data]
name = "synthetic"
samples = 256       # 205 train / 51 test
features = 64
classes = 4

[training]
epochs = {epochs}
batch_size = 64
log_every = {log_every}
progress = "lines"

[checkpoint]
every_epochs = 1
keep = 5
"""


def _config(tmp_path, hidden=256, epochs=6, log_every=10):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG.format(hidden=hidden, epochs=epochs, log_every=log_every))
    return path


@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of `size` (e.g. "3m") mounted at `path` while inside."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small full disk needs a tmpfs mount, which this environment refuses "
                    f"({mounted.stderr.strip() or 'not root'}); the in-process tests below cover the same paths")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("disttrain: error: "), err
    return lines[0]


# --------------------------------------------------------------------------------------- the estimate
@pytest.mark.parametrize("ranks", [3])  # three ranks: parameters split into pieces across owners
def test_the_space_estimate_is_never_less_than_a_real_checkpoint_and_at_most_1_5x(tmp_path, ranks):
    launch.mpirun(ranks, [os.path.join(WORKERS, "checkpoint_size.py"), tmp_path], timeout=180, MPIEXEC_TIMEOUT=160)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert len(sizes) == 6
    for name, estimate, actual in sizes:
        assert actual <= estimate <= 1.5 * actual, (name, estimate, actual)


# ---------------------------------------------------------------------------------- full disks, real
def test_a_disk_that_fills_during_a_checkpoint_ends_the_job_with_one_line_and_the_last_checkpoint_resumes(tmp_path):
    config = _config(tmp_path)  # 83,460 parameters: each checkpoint ~1.0 MiB, the fourth does not fit in 3 MiB
    with tmpfs(tmp_path / "disk", "3m") as disk:
        run_dir = disk / "run"
        proc = launch.disttrain("train", config, "--run-dir", run_dir, ranks=2, timeout=120, check=False)
        assert proc.returncode == 1, proc.stderr
        line = _one_error_line(proc.stderr)
        assert line.startswith(f"disttrain: error: checkpoint {run_dir}/checkpoints/step-00000016: writing this "
                               f"rank's files failed on rank "), line
        assert ": No space left on device (it needs about " in line and " free there)" in line
        assert "epoch 4/6" in proc.stdout and "Traceback" not in proc.stderr
        checkpoints = str(run_dir / "checkpoints")
        assert [step for step, _ in ckpt.list_checkpoints(checkpoints)] == [4, 8, 12]
        assert ckpt.candidates(checkpoints)[0].endswith("step-00000012")
        assert sorted(os.listdir(checkpoints)) == ["latest", "step-00000004", "step-00000008", "step-00000012"]
        assert not os.path.exists(run_dir / "disttrain.lock")

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        proc = launch.disttrain("train", config, "--run-dir", run_dir, "--resume", ranks=2, timeout=120)
        assert f"resumed from {checkpoints}/step-00000012 at step 12 (epoch 4)" in proc.stdout
        assert "done: 24 steps" in proc.stdout


def test_a_disk_that_fills_with_metrics_ends_the_job_with_one_line(tmp_path):
    config = _config(tmp_path, hidden=8, epochs=40, log_every=1)  # 160 steps: ~45 KB of metrics lines
    with tmpfs(tmp_path / "disk", "16k") as disk:
        proc = launch.disttrain("train", config, "--run-dir", disk / "run", "--set",
                                f"checkpoint.dir={json.dumps(str(tmp_path / 'checkpoints'))}", ranks=2, timeout=120,
                                check=False)
        assert proc.returncode == 1, proc.stderr
        line = _one_error_line(proc.stderr)
        assert f"failed on rank 0: cannot write {disk / 'run' / 'metrics.jsonl'}: No space left on device (it " \
               f"needs about " in line, line
        with open(disk / "run" / "metrics.jsonl") as handle:
            lines = handle.read().splitlines()
        assert len(lines) > 20  # written up to the full disk
        assert not os.path.exists(disk / "run" / "disttrain.lock")


def test_the_probe_file_is_removed_when_the_disk_is_already_full(tmp_path):
    config = _config(tmp_path, hidden=8)
    with tmpfs(tmp_path / "disk", "64k") as disk:
        with open(disk / "filler", "wb") as handle:  # leaves one page: the lock file's
            handle.write(b"\0" * (shutil.disk_usage(disk).free - 4096))
        proc = launch.disttrain("train", config, "--run-dir", disk / "run", ranks=2, timeout=120, check=False)
        assert proc.returncode == 1
        line = _one_error_line(proc.stderr)
        assert f"checkpoint directory '{disk}/run/checkpoints' is not writable" in line and "No space left" in line
        assert sorted(os.listdir(disk / "run" / "checkpoints")) == []


# ------------------------------------------------------------------------------ full disks, injected
def test_a_rank_whose_checkpoint_write_fails_is_named_in_the_one_line(tmp_path):
    config = _config(tmp_path, hidden=8, epochs=2)
    proc = launch.mpirun(2, [os.path.join(WORKERS, "disk_full_cli.py"), "savez:1", "train", config, "--run-dir",
                             tmp_path / "run"], timeout=120, check=False, MPIEXEC_TIMEOUT=100)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    partial = tmp_path / "run" / "checkpoints" / ".partial-step-00000004"
    assert line.startswith(f"disttrain: error: checkpoint {tmp_path}/run/checkpoints/step-00000004: writing this "
                           f"rank's files failed on rank 1: cannot write {partial}/optimizer-part-00001.npz: No space "
                           f"left on device (it needs about "), line
    assert os.listdir(tmp_path / "run" / "checkpoints") == []  # the partial checkpoint was removed


@pytest.mark.parametrize("nth_write, log_every, where", [
    (5, 2, "step 7 failed on rank 0"),           # mid-run: the next step's agreement stops every rank
    (2, 100, "writing metrics failed on rank 0"),  # the last record: checked when the run ends
])
def test_a_metrics_write_that_fails_ends_every_rank_with_one_line(tmp_path, nth_write, log_every, where):
    config = _config(tmp_path, hidden=8, epochs=2 if nth_write == 5 else 1, log_every=log_every)
    proc = launch.mpirun(2, [os.path.join(WORKERS, "disk_full_cli.py"), f"metrics:{nth_write}", "train", config,
                             "--run-dir", tmp_path / "run"], timeout=120, check=False, MPIEXEC_TIMEOUT=100)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert line.startswith(f"disttrain: error: {where}: cannot write {tmp_path}/run/metrics.jsonl: No space left on "
                           f"device (it needs about "), line


def test_a_metrics_file_that_cannot_be_opened_is_one_line(tmp_path):
    config = _config(tmp_path, hidden=8, epochs=1)
    os.makedirs(tmp_path / "run" / "metrics.jsonl")
    proc = launch.disttrain("train", config, "--run-dir", tmp_path / "run", ranks=2, timeout=120, check=False)
    assert proc.returncode == 1
    assert _one_error_line(proc.stderr) == (f"disttrain: error: cannot write {tmp_path}/run/metrics.jsonl: Is a "
                                            f"directory (rank 0)")


def test_the_probe_file_is_removed_when_its_write_fails(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(ckpt.CheckpointError, match="is not writable: .*No space left on device"):
        ckpt.probe(str(tmp_path), SingleProcessComm(), 1)
    assert os.listdir(tmp_path) == []


def test_leftovers_of_interrupted_saves_are_removed_at_the_next_start(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / ".partial-step-00000003").mkdir(parents=True)
    (checkpoints / ".partial-step-00000003" / "model.npz").write_bytes(b"\0" * 1000)
    (checkpoints / ".probe-12345").write_bytes(b"\0" * 4096)
    (checkpoints / "latest.tmp").write_text("step-00000003\n")
    config = _config(tmp_path, hidden=8, epochs=1)
    launch.disttrain("train", config, "--run-dir", tmp_path / "run", "--set", "checkpoint.every_epochs=0",
                     timeout=120)
    assert os.listdir(checkpoints) == []


def test_the_space_check_refuses_a_directory_without_room_naming_both_sizes(tmp_path):
    config = _config(tmp_path, hidden=1024)  # 1.12 M parameters: a checkpoint of 12.8 MiB (Adam: 3 arrays)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        proc = launch.disttrain("train", config, "--run-dir", disk / "run", timeout=120, check=False)
        assert proc.returncode == 1
        line = _one_error_line(proc.stderr)
        assert line == (f"disttrain: error: checkpoint directory check failed on rank 0: checkpoint directory "
                        f"'{disk}/run/checkpoints' has 4.0 MiB free, a checkpoint needs about 14.1 MiB")
