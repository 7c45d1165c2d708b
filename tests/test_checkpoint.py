"""Checkpoints in one process (the single-process communicator): the on-disk format, its safety
(no pickle, checksums, atomic publication, `latest`, keep-last-N) and resharding of optimizer state.

Resharding is tested directly through `read_optimizer_state`: checkpoints laid out for N ranks
(written here in the documented segment format, or by `save()` itself for N = 1) are read back into
the pieces each of M ranks owns. The same property under real mpiexec is in test_resume.py.
"""

import json
import os
import zipfile

import numpy as np
import pytest

from disttrain import __version__, checkpoint as ckpt, nn
from disttrain.distributed import DataParallel, FlatLayout, ShardedOptimizer, SingleProcessComm
from disttrain.optim import SGD, Adam
from disttrain.tensor import Tensor

FEATURES, CLASSES = 5, 3


def make_run(seed=0, optimizer=Adam, bucket_mb=25.0, **hyperparameters):
    """(ddp, sharded optimizer, comm) for a small model with a BatchNorm buffer, untrained."""
    nn.manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, CLASSES))
    comm = SingleProcessComm()
    ddp = DataParallel(model, comm, "reduce_scatter", bucket_mb)
    opt = ShardedOptimizer(optimizer, ddp.parameters(), comm, **(hyperparameters or {"lr": 0.01}))
    return ddp, opt, comm


def train(ddp, opt, steps, seed=1):
    """`steps` optimizer steps on seeded random batches; returns the losses."""
    rng = np.random.default_rng(seed)
    loss_fn, losses = nn.SoftmaxLoss(), []
    for _ in range(steps):
        x = rng.standard_normal((8, FEATURES), dtype=np.float32)
        y = rng.integers(0, CLASSES, 8)
        loss = loss_fn(ddp(Tensor(x)), y)
        loss.backward()
        opt.step()
        opt.reset_grad()
        losses.append(float(loss.data))
    return losses


def trained(tmp_path, steps=3, step=3, keep=3, extra=None, **kwargs):
    """A run trained `steps` steps and saved as checkpoint `step`; returns (ddp, opt, comm, path)."""
    ddp, opt, comm = make_run(**kwargs)
    train(ddp, opt, steps)
    path = ckpt.save(str(tmp_path), step, ddp, opt, comm, extra, keep=keep)
    return ddp, opt, comm, path


def snapshot(ddp, opt):
    """Copies of every parameter, buffer and optimizer-state value, for bit-for-bit comparison."""
    model = {name: value.copy() for name, value in ddp.module.state_dict().items()}
    state = [{key: np.array(value, copy=True) if isinstance(value, np.ndarray) else value
              for key, value in entry.items()} for entry in opt.optimizer.state]
    return model, state


def assert_same_bits(first, second):
    (model_a, state_a), (model_b, state_b) = first, second
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert model_a[name].dtype == model_b[name].dtype == np.float32
        assert np.array_equal(model_a[name], model_b[name]), name
    assert len(state_a) == len(state_b)
    for entry_a, entry_b in zip(state_a, state_b):
        assert entry_a.keys() == entry_b.keys()
        for key in entry_a:
            if isinstance(entry_a[key], np.ndarray):
                assert entry_b[key].dtype == entry_a[key].dtype
                assert np.array_equal(entry_a[key], entry_b[key]), key
            else:
                assert entry_a[key] == entry_b[key], key


def latest_name(directory):
    with open(os.path.join(directory, ckpt.LATEST)) as handle:
        return handle.read().strip()


# ------------------------------------------------------------------------------------------- format
def test_manifest_records_step_world_versions_parameters_state_and_every_file(tmp_path):
    extra = {"epoch": 2, "sampler": {"epoch": 2, "consumed": 16}, "config": {"training": {"epochs": 5}},
             "rng_state": nn.default_rng().bit_generator.state}
    ddp, opt, _, path = trained(tmp_path, step=12, extra=extra)
    manifest = ckpt.read_manifest(path)

    assert os.path.basename(path) == "step-00000012"
    assert manifest["format"] == ckpt.FORMAT and manifest["format_version"] == ckpt.FORMAT_VERSION
    assert manifest["step"] == 12 and manifest["world_size"] == 1
    assert manifest["library_version"] == __version__
    assert manifest["parameters"] == [{"name": name, "shape": list(shape)} for name, _, shape in ddp.layout.entries]
    assert manifest["optimizer"]["class"] == "Adam" and manifest["optimizer"]["sharded"] is True
    assert manifest["optimizer"]["scalars"] == {"step": 3}
    assert manifest["optimizer"]["hyperparameters"]["lr"] == pytest.approx(0.01)
    assert manifest["extra"] == {key: value for key, value in extra.items() if key != "rng_state"}
    assert manifest["rng_states"] == [json.loads(json.dumps(extra["rng_state"]))]

    on_disk = sorted(name for name in os.listdir(path) if name != ckpt.MANIFEST)
    assert sorted(manifest["files"]) == on_disk == ["model.npz", "optimizer-part-00000.npz"]
    for name, info in manifest["files"].items():
        assert info["bytes"] == os.path.getsize(os.path.join(path, name))
        assert info["sha256"] == ckpt.files._sha256(os.path.join(path, name))

    # the segment table covers every element of every parameter once, for each state array
    sizes = {name: int(np.prod(shape)) for name, _, shape in ddp.layout.entries}
    for key in ("exp_avg", "exp_avg_sq"):
        covered = {name: 0 for name in sizes}
        for seg in manifest["optimizer"]["segments"]:
            assert set(seg) == {"file", "key", "state", "param", "start", "stop"}
            if seg["state"] == key:
                covered[seg["param"]] += seg["stop"] - seg["start"]
        assert covered == sizes


def test_every_checkpoint_file_is_plain_numpy_or_json_and_loads_without_pickle(tmp_path):
    _, _, _, path = trained(tmp_path, extra={"epoch": 0, "rng_state": nn.default_rng().bit_generator.state})
    for name in os.listdir(path):
        file_path = os.path.join(path, name)
        if name == ckpt.MANIFEST:
            with open(file_path) as handle:
                json.load(handle)
            continue
        assert name.endswith(".npz")
        with zipfile.ZipFile(file_path) as archive:
            assert all(member.endswith(".npy") for member in archive.namelist())
        with np.load(file_path, allow_pickle=False) as arrays:
            for key in arrays.files:
                assert arrays[key].dtype != object and arrays[key].dtype == np.float32, (name, key)
    assert latest_name(tmp_path) == os.path.basename(path)


# --------------------------------------------------------------------------------------- round trip
def test_round_trip_restores_parameters_buffers_and_optimizer_state_bit_for_bit(tmp_path):
    ddp, opt, comm, path = trained(tmp_path, steps=4, step=4)
    saved = snapshot(ddp, opt)

    other_ddp, other_opt, other_comm = make_run(seed=7)
    train(other_ddp, other_opt, 2, seed=5)  # different parameters and state that must be overwritten
    info = ckpt.load(str(tmp_path), other_ddp, other_opt, other_comm)

    assert info["step"] == 4 and info["world_size"] == 1 and info["path"] == path
    assert_same_bits(snapshot(other_ddp, other_opt), saved)
    # restored in place: the parameters still are views of the flat buffer they train through
    assert all(p.data is view for p, view in zip(other_ddp.flat.params, other_ddp.flat.views))
    # continuing from the restored state is continuing the original run, bit for bit
    assert train(other_ddp, other_opt, 3, seed=9) == train(ddp, opt, 3, seed=9)
    assert_same_bits(snapshot(other_ddp, other_opt), snapshot(ddp, opt))


def test_round_trip_of_sgd_momentum_state(tmp_path):
    ddp, opt, comm, path = trained(tmp_path, optimizer=SGD, lr=0.1, momentum=0.9)
    other_ddp, other_opt, other_comm = make_run(seed=3, optimizer=SGD, lr=0.1, momentum=0.9)
    ckpt.load(path, other_ddp, other_opt, other_comm)
    assert_same_bits(snapshot(other_ddp, other_opt), snapshot(ddp, opt))


def test_loading_into_a_different_model_or_optimizer_names_the_mismatch(tmp_path):
    _, _, _, path = trained(tmp_path)
    nn.manual_seed(0)
    comm = SingleProcessComm()
    wider = DataParallel(nn.Sequential(nn.Linear(FEATURES, 9), nn.Tanh(), nn.Linear(9, CLASSES)), comm)
    with pytest.raises(ckpt.CheckpointError, match=r"different model.*0\.weight: checkpoint \(7, 5\) vs model \(9, 5\)"):
        ckpt.load(path, wider, None, comm)
    sgd_ddp, sgd_opt, sgd_comm = make_run(optimizer=SGD, lr=0.1)
    with pytest.raises(ckpt.CheckpointError, match="optimizer state is for Adam, this run uses SGD"):
        ckpt.load(path, sgd_ddp, sgd_opt, sgd_comm)


# ------------------------------------------------------------------------------ checksums, fallback
def _flip_last_byte(path):
    with open(path, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage, message", [(_flip_last_byte, "checksum mismatch"),
                                             (_truncate, "truncated or altered"),
                                             (os.remove, "missing")])
@pytest.mark.parametrize("file_name", ["model.npz", "optimizer-part-00000.npz"])
def test_a_damaged_file_is_rejected_by_its_recorded_size_and_checksum(tmp_path, damage, message, file_name):
    _, _, _, path = trained(tmp_path)
    damage(os.path.join(path, file_name))
    ddp, opt, comm = make_run(seed=4)
    before = snapshot(ddp, opt)
    with pytest.raises(ckpt.CheckpointError, match=f"{file_name}: {message}"):
        ckpt.load(path, ddp, opt, comm)
    assert_same_bits(snapshot(ddp, opt), before)  # nothing half-loaded


def test_load_falls_back_to_the_previous_checkpoint_with_a_warning_when_latest_is_corrupt(tmp_path):
    ddp, opt, comm = make_run()
    train(ddp, opt, 2)
    ckpt.save(str(tmp_path), 2, ddp, opt, comm)
    at_step_2 = snapshot(ddp, opt)
    train(ddp, opt, 2, seed=2)
    newest = ckpt.save(str(tmp_path), 4, ddp, opt, comm)
    _flip_last_byte(os.path.join(newest, "optimizer-part-00000.npz"))

    warnings = []
    other_ddp, other_opt, other_comm = make_run(seed=8)
    info = ckpt.load(str(tmp_path), other_ddp, other_opt, other_comm, warn=warnings.append)
    assert info["step"] == 2
    assert_same_bits(snapshot(other_ddp, other_opt), at_step_2)
    assert len(warnings) == 1 and "skipping checkpoint" in warnings[0] and "step-00000004" in warnings[0]
    assert "checksum mismatch" in warnings[0]


def test_load_raises_naming_every_checkpoint_when_none_is_usable(tmp_path):
    ddp, opt, comm = make_run()
    for step in (1, 2):
        train(ddp, opt, 1)
        path = ckpt.save(str(tmp_path), step, ddp, opt, comm)
        os.remove(os.path.join(path, "model.npz"))
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint.*step-00000002.*step-00000001"):
        ckpt.load(str(tmp_path), *make_run(seed=1))


def test_load_of_an_empty_directory_returns_none_and_of_a_missing_path_raises(tmp_path):
    assert ckpt.load(str(tmp_path), *make_run()) is None
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(str(tmp_path / "nowhere"), *make_run())


# ------------------------------------------------------------------ publication, latest, keep-last-N
def test_only_the_newest_keep_checkpoints_are_kept(tmp_path):
    ddp, opt, comm = make_run()
    for step in range(1, 6):
        train(ddp, opt, 1, seed=step)
        ckpt.save(str(tmp_path), step, ddp, opt, comm, keep=2)
        assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == list(range(max(1, step - 1), step + 1))
        assert latest_name(tmp_path) == ckpt.step_dirname(step)


def test_a_failed_save_publishes_nothing_and_latest_keeps_naming_the_last_complete_checkpoint(tmp_path):
    ddp, opt, comm = make_run()
    train(ddp, opt, 1)
    good = ckpt.save(str(tmp_path), 1, ddp, opt, comm)

    def disk_full(point):
        raise OSError(28, "No space left on device")
    train(ddp, opt, 1)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        ckpt.save(str(tmp_path), 2, ddp, opt, comm, fault=disk_full)

    assert ckpt.list_checkpoints(str(tmp_path)) == [(1, good)]
    assert latest_name(tmp_path) == "step-00000001"
    assert os.path.isfile(os.path.join(good, ckpt.MANIFEST))
    assert ckpt.candidates(str(tmp_path)) == [good]
    # the next successful save clears the leftover temporary directory
    ckpt.save(str(tmp_path), 3, ddp, opt, comm)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".partial-")]


def test_a_failed_save_leaves_no_partial_directory_behind(tmp_path):
    ddp, opt, comm = make_run()
    train(ddp, opt, 1)

    def disk_full(point):
        raise OSError(28, "No space left on device")
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        ckpt.save(str(tmp_path), 1, ddp, opt, comm, fault=disk_full)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".partial-")]  # its space is given back

def test_partial_and_manifestless_directories_are_never_loaded(tmp_path):
    ddp, opt, comm = make_run()
    train(ddp, opt, 2)
    good = ckpt.save(str(tmp_path), 2, ddp, opt, comm)
    expected = snapshot(ddp, opt)
    # a save that died before its rename, and a directory that only looks like a checkpoint
    os.makedirs(tmp_path / ".partial-step-00000009")
    (tmp_path / ".partial-step-00000009" / "model.npz").write_bytes(b"garbage")
    os.makedirs(tmp_path / "step-00000007")
    (tmp_path / "step-00000007" / "model.npz").write_bytes(b"garbage")

    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2, 7]
    warnings = []
    other_ddp, other_opt, other_comm = make_run(seed=2)
    info = ckpt.load(str(tmp_path), other_ddp, other_opt, other_comm, warn=warnings.append)
    assert info["path"] == good  # `latest` names step 2, and step 7 has no manifest
    assert_same_bits(snapshot(other_ddp, other_opt), expected)

    os.remove(tmp_path / ckpt.LATEST)  # without the pointer, the newest directory is tried first
    warnings.clear()
    info = ckpt.load(str(tmp_path), *make_run(seed=2), warn=warnings.append)
    assert info["path"] == good
    assert len(warnings) == 1 and "step-00000007" in warnings[0] and "incomplete" in warnings[0]


def test_a_fresh_run_in_an_old_checkpoint_directory_keeps_its_own_checkpoints(tmp_path):
    ddp, opt, comm = make_run()
    for step in (10, 20):  # an earlier run that got further
        train(ddp, opt, 1)
        ckpt.save(str(tmp_path), step, ddp, opt, comm, keep=2)

    ddp, opt, comm = make_run(seed=1)
    train(ddp, opt, 1)
    ckpt.save(str(tmp_path), 4, ddp, opt, comm, keep=2)
    # the earlier run's later steps belong to another history: they give way, not the new checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [4]
    assert latest_name(tmp_path) == "step-00000004"
    info = ckpt.load(str(tmp_path), *make_run(seed=3))
    assert info["step"] == 4


def test_a_checkpoint_is_found_from_the_run_directory_its_checkpoint_directory_or_itself(tmp_path):
    ddp, opt, comm = make_run()
    train(ddp, opt, 1)
    path = ckpt.save(str(tmp_path / "checkpoints"), 1, ddp, opt, comm)
    for where in (tmp_path, tmp_path / "checkpoints", path):
        assert ckpt.candidates(str(where)) == [path]
        params, manifest, found = ckpt.read_model(str(where))
        assert found == path and manifest["step"] == 1
        assert set(params) == set(ddp.module.state_dict())


# ------------------------------------------------------------------------------------ export helpers
def test_consolidated_optimizer_state_is_the_full_state_by_parameter_name(tmp_path):
    ddp, opt, _, path = trained(tmp_path, bucket_mb=40 * 4 / 2**20)  # several buckets, one range each
    full = ckpt.consolidated_optimizer_state(path, ckpt.read_manifest(path))
    assert sorted(full) == ["exp_avg", "exp_avg_sq"]
    for key, per_param in full.items():
        flat = np.concatenate([state[key] for state in opt.optimizer.state])
        for name, offset, shape in ddp.layout.entries:
            assert per_param[name].shape == shape and per_param[name].dtype == np.float32
            assert np.array_equal(per_param[name].ravel(), flat[offset:offset + int(np.prod(shape))])


# ----------------------------------------------------------------------------------------- resharding
SHAPES = [("embed.weight", (13, 7)), ("block.weight", (7, 7)), ("block.bias", (7,)), ("head.weight", (7, 3)),
          ("head.bias", (3,))]
BUCKET_ELEMENTS = 100  # small: several buckets, so each rank owns several ranges and parameters split


def _expected(key, flat_index):
    """The value a test checkpoint stores for state `key` at flat element `flat_index`."""
    return (flat_index + (0.5 if key == "exp_avg" else 1000.25)).astype(np.float32)


def write_checkpoint_for_world(path, world_size, keys=("exp_avg", "exp_avg_sq"), drop_rank=None):
    """A checkpoint directory as `world_size` ranks lay it out: each rank's owned ranges cut into
    per-parameter segments in its own file (the format save() writes). Returns the manifest."""
    layout = FlatLayout(SHAPES, world_size, BUCKET_ELEMENTS)
    assert len(layout.buckets) > 1
    segments = []
    for rank in range(world_size):
        name = f"optimizer-part-{rank:05d}.npz"
        arrays = {}
        for lo, hi in layout.owned_ranges(rank):
            for key in keys:
                values = _expected(key, np.arange(lo, hi))
                for param, start, stop, flat_lo, flat_hi in layout.segments(lo, hi):
                    array_key = f"a{len(arrays)}"
                    arrays[array_key] = values[flat_lo - lo:flat_hi - lo]
                    segments.append({"file": name, "key": array_key, "state": key, "param": param,
                                     "start": start, "stop": stop})
        if rank != drop_rank:
            np.savez(os.path.join(path, name), **arrays)
        else:
            segments = [seg for seg in segments if seg["file"] != name]
    return {"optimizer": {"segments": segments, "scalars": {"step": 17}},
            "parameters": [{"name": name, "shape": list(shape)} for name, shape in SHAPES]}


def owned_pieces(layout, rank):
    """[(param name, start, stop, flat_lo, flat_hi)] of every piece of a parameter that `rank` owns."""
    return [piece for lo, hi in layout.owned_ranges(rank) for piece in layout.segments(lo, hi)]


@pytest.mark.parametrize("written_by, read_by", [(1, 4), (4, 1), (4, 3), (3, 4), (2, 3), (3, 2), (2, 1), (1, 3)])
def test_optimizer_state_written_by_n_ranks_reshards_onto_the_ranges_of_m_ranks(tmp_path, written_by, read_by):
    manifest = write_checkpoint_for_world(str(tmp_path), written_by)
    layout = FlatLayout(SHAPES, read_by, BUCKET_ELEMENTS)
    seen = np.zeros(layout.total, int)
    for rank in range(read_by):
        pieces = owned_pieces(layout, rank)
        states = ckpt.read_optimizer_state(str(tmp_path), manifest, [piece[:3] for piece in pieces])
        assert len(states) == len(pieces)
        for (_, start, stop, flat_lo, flat_hi), state in zip(pieces, states):
            assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"] and state["step"] == 17
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].dtype == np.float32 and state[key].shape == (stop - start,)
                assert np.array_equal(state[key], _expected(key, np.arange(flat_lo, flat_hi)))
            seen[flat_lo:flat_hi] += 1
    assert (seen == 1).all()  # the M ranks' pieces tile every parameter element once


def test_resharding_a_checkpoint_with_a_missing_shard_names_the_gap(tmp_path):
    manifest = write_checkpoint_for_world(str(tmp_path), 3, drop_rank=1)
    layout = FlatLayout(SHAPES, 2, BUCKET_ELEMENTS)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer state of parameter '[a-z.]+' covers \d+ of its "
                                                   r"elements \[\d+, \d+\) \(a shard is missing\)"):
        for rank in range(2):
            ckpt.read_optimizer_state(str(tmp_path), manifest, [piece[:3] for piece in owned_pieces(layout, rank)])


@pytest.mark.parametrize("read_by", [2, 3, 4])
def test_a_checkpoint_saved_by_one_process_reshards_to_each_rank_of_m(tmp_path, read_by):
    ddp, opt, _, path = trained(tmp_path, bucket_mb=BUCKET_ELEMENTS * 4 / 2**20)
    full = {key: np.concatenate([state[key] for state in opt.optimizer.state]) for key in ("exp_avg", "exp_avg_sq")}
    assert full["exp_avg"].any()
    names_shapes = [(name, shape) for name, _, shape in ddp.layout.entries]
    layout = FlatLayout(names_shapes, read_by, BUCKET_ELEMENTS)
    manifest = ckpt.read_manifest(path)
    for rank in range(read_by):
        pieces = owned_pieces(layout, rank)
        states = ckpt.read_optimizer_state(path, manifest, [piece[:3] for piece in pieces])
        for (_, _, _, flat_lo, flat_hi), state in zip(pieces, states):
            assert state["step"] == 3
            for key in full:
                assert np.array_equal(state[key], full[key][flat_lo:flat_hi])
