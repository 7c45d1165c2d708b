"""The `latest` pointer: what it names when publishing fails at its last step, and that loading follows it.

A checkpoint is written into `.partial-step-XXXXXXXX/`, renamed to `step-XXXXXXXX/`, and only then
named by the `latest` pointer file: `latest` always names a complete checkpoint. The first tests make
the rename itself fail (the files and the manifest are written by then) and check what a reader sees;
the last checks that loading tries the checkpoint `latest` names before any other.
"""

import contextlib
import errno
import os
import re

import numpy as np
import pytest

from disttrain import Tensor, checkpoint as ckpt, nn
from disttrain.distributed import DataParallel, ShardedOptimizer, SingleProcessComm
from disttrain.optim import Adam

STEP_DIR = re.compile(r"^step-\d{8,}$")


def _run(seed):
    """(ddp, sharded Adam, comm) for a small model in one process."""
    nn.manual_seed(seed)
    comm = SingleProcessComm()
    ddp = DataParallel(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), comm)
    return ddp, ShardedOptimizer(Adam, ddp.parameters(), comm, lr=0.01), comm


def _train_one_step(ddp, optimizer, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((8, 5), dtype=np.float32), rng.integers(0, 3, 8)
    nn.SoftmaxLoss()(ddp(Tensor(x)), y).backward()
    optimizer.step()
    optimizer.reset_grad()


def _parameters(ddp):
    return {name: p.data.copy() for name, p in ddp.named_parameters()}


def _latest(directory):
    with open(os.path.join(directory, "latest")) as handle:
        return handle.read().strip()


@contextlib.contextmanager
def publish_rename_fails(monkeypatch):
    """Inside, renaming a `.partial-*` directory to `step-*` raises (through os.rename and os.replace
    alike); every other rename works. Yields the list of refused targets."""
    refused = []

    def refusing(real):
        def rename(source, target, *args, **kwargs):
            if os.path.basename(os.fspath(source)).startswith(".partial-") and \
                    STEP_DIR.match(os.path.basename(os.fspath(target))):
                refused.append(os.fspath(target))
                raise OSError(errno.EIO, "Input/output error (injected at the publish rename)")
            return real(source, target, *args, **kwargs)
        return rename
    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", refusing(os.rename))
        patch.setattr(os, "replace", refusing(os.replace))
        yield refused


def test_a_publish_that_fails_at_the_rename_leaves_latest_naming_the_previous_checkpoint(tmp_path, monkeypatch):
    directory = str(tmp_path)
    ddp, optimizer, comm = _run(seed=0)
    _train_one_step(ddp, optimizer, seed=1)
    first = ckpt.save(directory, 1, ddp, optimizer, comm)
    at_step_1 = _parameters(ddp)
    _train_one_step(ddp, optimizer, seed=2)
    assert any(not np.array_equal(at_step_1[name], value) for name, value in _parameters(ddp).items())

    with publish_rename_fails(monkeypatch) as refused:
        with pytest.raises(ckpt.CheckpointError, match="Input/output error"):
            ckpt.save(directory, 2, ddp, optimizer, comm)
    assert refused == [os.path.join(directory, "step-00000002")]  # the save got as far as the rename

    assert _latest(directory) == "step-00000001"
    assert ckpt.list_checkpoints(directory) == [(1, first)]
    assert ckpt.candidates(directory)[0] == first
    warnings = []
    other_ddp, other_optimizer, other_comm = _run(seed=5)
    info = ckpt.load(directory, other_ddp, other_optimizer, other_comm, warn=warnings.append)
    assert info["path"] == first and info["step"] == 1
    assert warnings == []  # nothing had to be skipped on the way to it
    loaded = _parameters(other_ddp)
    for name, expected in at_step_1.items():
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)


def test_after_a_failed_publish_rename_the_next_save_publishes_and_moves_latest(tmp_path, monkeypatch):
    directory = str(tmp_path)
    ddp, optimizer, comm = _run(seed=0)
    _train_one_step(ddp, optimizer, seed=1)
    ckpt.save(directory, 1, ddp, optimizer, comm)
    _train_one_step(ddp, optimizer, seed=2)
    with publish_rename_fails(monkeypatch):
        with pytest.raises(ckpt.CheckpointError):
            ckpt.save(directory, 2, ddp, optimizer, comm)
    _train_one_step(ddp, optimizer, seed=3)
    at_step_3 = _parameters(ddp)
    third = ckpt.save(directory, 3, ddp, optimizer, comm)

    assert _latest(directory) == "step-00000003"
    assert [step for step, _ in ckpt.list_checkpoints(directory)] == [1, 3]
    other_ddp, other_optimizer, other_comm = _run(seed=5)
    info = ckpt.load(directory, other_ddp, other_optimizer, other_comm)
    assert info["path"] == third and info["step"] == 3
    for name, value in _parameters(other_ddp).items():
        np.testing.assert_array_equal(value, at_step_3[name], err_msg=name)


def test_load_follows_latest_even_when_a_newer_complete_checkpoint_exists(tmp_path):
    # e.g. a job that died between renaming step 3 into place and moving `latest`, or a user who
    # pointed `latest` back at step 2 by hand: `latest` is tried first, the rest newest first after it
    directory = str(tmp_path)
    ddp, optimizer, comm = _run(seed=0)
    saved = {}
    for step in (1, 2, 3):
        _train_one_step(ddp, optimizer, seed=step)
        saved[step] = (ckpt.save(directory, step, ddp, optimizer, comm), _parameters(ddp))
    with open(os.path.join(directory, "latest"), "w") as handle:
        handle.write("step-00000002\n")

    assert ckpt.candidates(directory) == [saved[2][0], saved[3][0], saved[1][0]]
    warnings = []
    other_ddp, other_optimizer, other_comm = _run(seed=5)
    info = ckpt.load(directory, other_ddp, other_optimizer, other_comm, warn=warnings.append)
    assert info["step"] == 2 and info["path"] == saved[2][0] and warnings == []
    for name, value in _parameters(other_ddp).items():
        np.testing.assert_array_equal(value, saved[2][1][name], err_msg=name)
