"""Compression state in checkpoints, under real mpiexec.

Through the `disttrain train` CLI: a compressed run stopped by training.max_steps and resumed with
--resume equals the uninterrupted run bit for bit on the same world size (PowerSGD at 2 and 3 ranks,
fp16 at 2): every loss and test metric, the final parameters and the final error feedback and Q of
every rank. On another world size (2 -> 3) it resumes and keeps training.

Through the checkpoint API (tests/workers/compression_state.py): the state each rank loads. Same world
size: exactly what that rank saved. Another world size: Q from saved rank 0 on every rank, and rank 0
holds the sum over saved ranks of the error feedback (the part of the combined gradient still owed),
every other rank zero. A checkpoint written without compression loads with fresh state.
"""

import json
import os
import shutil

import numpy as np
import pytest

import launch
from disttrain import checkpoint as ckpt
from disttrain.distributed.powersgd import initial_q

WORKER = os.path.join(os.path.dirname(__file__), "workers", "compression_state.py")
STOP_STEP, TOTAL_STEPS = 10, 21  # 3 epochs of 7 global batches
TIMINGS = {"samples_per_s", "compute_s", "comm_s", "optimizer_s", "step_s", "seconds"}

CONFIG = """
[model]
name = "mlp"
hidden = [16]
dropout = 0.2

[data]
name = "synthetic"
samples = 254        # 203 train / 51 test
features = 12
classes = 4
test_fraction = 0.2

[optimizer]
name = "adam"
lr = 0.01
compression = "{compression}"
powersgd_rank = 2

[training]
epochs = 3
batch_size = 32
log_every = 1
seed = 3
check_replicas_every = 5

[checkpoint]
every_steps = 4
every_epochs = 0
keep = 3
"""


def _train(workdir, run_dir, ranks, *extra):
    return launch.disttrain("train", "run.toml", "--run-dir", run_dir, *extra, ranks=ranks, timeout=180,
                            cwd=workdir, MPIEXEC_TIMEOUT=150).stdout


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [{k: v for k, v in record.items() if k not in TIMINGS}
                for record in map(json.loads, handle) if record["kind"] in ("train", "epoch", "eval")]


def _final(run_dir):
    """(parameters, {file: {key: array}} of the compression parts, manifest) of the last checkpoint."""
    path = os.path.join(run_dir, "checkpoints", ckpt.step_dirname(TOTAL_STEPS))
    params, manifest, _ = ckpt.read_model(path)
    parts = {}
    for name in sorted(manifest["files"]):
        if name.startswith("compression-part-"):
            with np.load(os.path.join(path, name)) as archive:
                parts[name] = {key: archive[key] for key in archive.files}
    return params, parts, manifest


CASES = [("powersgd", 2), ("powersgd", 3), ("fp16", 2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(compression, ranks): (uninterrupted run dir, stopped-and-resumed run dir)}; also
    ("powersgd", "2->3"): a 2-rank run stopped and resumed on 3 ranks, with its resumed output."""
    found = {}
    for compression in sorted({c for c, _ in CASES}):
        workdir = tmp_path_factory.mktemp(f"resume-{compression}")
        (workdir / "run.toml").write_text(CONFIG.format(compression=compression))
        for case, ranks in CASES:
            if case != compression:
                continue
            whole, pieces = str(workdir / f"whole-{ranks}"), str(workdir / f"pieces-{ranks}")
            _train(workdir, whole, ranks)
            _train(workdir, pieces, ranks, "--set", f"training.max_steps={STOP_STEP}")
            if (compression, ranks) == ("powersgd", 2):
                shutil.copytree(pieces, str(workdir / "pieces-2-3"))
            resumed = _train(workdir, pieces, ranks, "--resume")
            found[compression, ranks] = (whole, pieces, resumed)
        if compression == "powersgd":
            switched = str(workdir / "pieces-2-3")
            found[compression, "2->3"] = (None, switched, _train(workdir, switched, 3, "--resume"))
    return found


@pytest.mark.parametrize("compression, ranks", CASES)
def test_resumed_compressed_run_matches_the_uninterrupted_run_bit_for_bit(runs, compression, ranks):
    whole, pieces, resumed = runs[compression, ranks]
    assert f"resumed from {os.path.join(pieces, 'checkpoints', ckpt.step_dirname(STOP_STEP))}" in resumed
    assert f", {compression}" in resumed and " compression" in resumed  # the banner names it
    expected, got = _records(whole), _records(pieces)
    assert [r["step"] for r in got if r["kind"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    # the stopped run ended with an evaluation at its last step; the uninterrupted run had none there
    got = [r for r in got if r["kind"] == "train" or r["step"] != STOP_STEP]
    assert len([r for r in got if r["kind"] == "eval"]) == 3
    assert got == expected  # every loss, epoch train loss and test metric, exactly
    params_whole, parts_whole, manifest_whole = _final(whole)
    params_pieces, parts_pieces, manifest_pieces = _final(pieces)
    for name in params_whole:
        assert np.array_equal(params_pieces[name], params_whole[name]), name
    assert manifest_pieces["compression"] == manifest_whole["compression"]
    assert manifest_whole["compression"]["method"] == compression
    if compression == "powersgd":  # every rank's error feedback and Q, exactly
        assert len(parts_whole) == ranks and parts_pieces.keys() == parts_whole.keys()
        for name, arrays in parts_whole.items():
            assert arrays.keys() == parts_pieces[name].keys() and len(arrays) == 4  # 2 weights x (error, q)
            for key in arrays:
                assert np.array_equal(parts_pieces[name][key], arrays[key]), (name, key)
            assert any(np.abs(value).max() > 0 for value in arrays.values())
    else:
        assert parts_whole == {}  # 16-bit compression keeps no state


def test_compressed_run_resumes_on_another_world_size_and_keeps_training(runs):
    _, switched, output = runs["powersgd", "2->3"]
    assert "resumed from " in output and "world 3" in output
    records = [r for r in _records(switched) if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    epochs = [r["train_loss"] for r in _records(switched) if r["kind"] == "epoch"]
    assert len(epochs) == 3 and epochs[-1] < epochs[0]
    _, parts, manifest = _final(switched)
    assert manifest["world_size"] == 3 and len(parts) == 3


# ------------------------------------------------------------------------------ the state loaded
def _state(out_dir, action, size, rank):
    with np.load(os.path.join(out_dir, f"{action}-{size}-{rank}.npz")) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """Checkpoints saved by 2 and 3 ranks (PowerSGD) and by 2 ranks without compression, each loaded
    by 2 and 3 ranks; returns the dump directory."""
    out = tmp_path_factory.mktemp("compression-state")
    for saved_by, compression in ((2, "powersgd"), (3, "powersgd"), (2, "none")):
        directory = str(out / f"ckpt-{compression}-{saved_by}")
        dumps = out / f"{compression}-{saved_by}"
        dumps.mkdir()
        launch.mpirun(saved_by, [WORKER, "save", compression, directory, str(dumps)], timeout=120)
        for loaded_by in (2, 3):
            launch.mpirun(loaded_by, [WORKER, "load", "powersgd", directory, str(dumps)], timeout=120)
    return out


@pytest.mark.parametrize("ranks", [2, 3])
def test_same_world_size_reloads_each_ranks_own_compression_state_exactly(states, ranks):
    dumps = states / f"powersgd-{ranks}"
    for rank in range(ranks):
        saved, loaded = _state(dumps, "save", ranks, rank), _state(dumps, "load", ranks, rank)
        assert len(saved) == 6 and saved.keys() == loaded.keys()  # 3 weights x (error, q)
        for key in saved:
            assert np.array_equal(loaded[key], saved[key]), (rank, key)
    errors = [_state(dumps, "save", ranks, rank)["error:1.weight"] for rank in range(ranks)]
    assert not np.array_equal(errors[0], errors[1])  # the ranks' error feedback really differs


@pytest.mark.parametrize("saved_by, loaded_by", [(2, 3), (3, 2)])
def test_another_world_size_puts_the_summed_error_feedback_on_rank_0_and_keeps_q(states, saved_by, loaded_by):
    dumps = states / f"powersgd-{saved_by}"
    saved = [_state(dumps, "save", saved_by, rank) for rank in range(saved_by)]
    loaded = [_state(dumps, "load", loaded_by, rank) for rank in range(loaded_by)]
    for key in saved[0]:
        if key.startswith("error:"):
            owed = saved[0][key].copy()
            for part in saved[1:]:
                owed += part[key]  # rank order, float32
            assert np.array_equal(loaded[0][key], owed) and np.abs(owed).max() > 0, key
            for part in loaded[1:]:
                assert not part[key].any(), key
        else:
            for part in loaded:
                assert np.array_equal(part[key], saved[0][key]), key


def test_a_checkpoint_without_compression_state_loads_with_fresh_state(states):
    dumps = states / "none-2"
    assert _state(dumps, "save", 2, 0) == {}
    for rank in range(2):
        loaded = _state(dumps, "load", 2, rank)
        assert len(loaded) == 6
        for key, value in loaded.items():
            kind, name = key.split(":")
            if kind == "error":
                assert not value.any()
            else:
                assert np.array_equal(value, initial_q(name, 2, value.shape[1]))
