"""What a run saves beside the model and the optimizer (TrainState, sampler, schedule, RNG, config),
and how a resumed run takes it back. The files themselves are checkpoint.py's."""

from __future__ import annotations

import numpy as np

from .. import checkpoint as ckpt
from .. import nn
from . import resume_changes
from .build import hyperparameters
from .step_stats import NonFiniteError, TrainingError, raise_agreed


def save(directory: str, parts, state, config: dict, keep: int, fault=None) -> str:
    """COLLECTIVE. Checkpoint `state.step` of the run `parts` (RunParts) into `directory`, keeping the
    newest `keep`; returns its path. `fault(point)` is the fault-injection hook (tests only)."""
    parts.ddp.wait_for_parameters()
    extra = {**state.state_dict(), "sampler": parts.sampler.state_dict(), "scheduler": parts.scheduler.state_dict(),
             "config": config, "rng_state": nn.default_rng().bit_generator.state}
    return ckpt.save(directory, state.step, parts.ddp, parts.optimizer, parts.comm, extra, keep=keep, fault=fault)


def resume(path: str, parts, state, must_exist: bool, warn, config: dict | None = None) -> dict | None:
    """COLLECTIVE. Restore the newest usable checkpoint under `path` into the run: parameters,
    optimizer state (resharded to this world size), `state`, sampler, schedule and, at the same world
    size, this rank's RNG. Returns the checkpoint loader's info with "notes" (lines saying which changed
    settings are applied), or None when `path` holds no checkpoint and `must_exist` is False (raises
    CheckpointError when it is True). `config` is this run's ({section: {key: value}}): compared with
    the checkpoint's (resume_changes.py), its optimizer hyperparameters and schedule replace the saved
    ones; a change a resume cannot take raises ConfigError."""
    try:
        info = ckpt.load(path, parts.ddp, parts.optimizer, parts.comm, warn=warn)
    except ckpt.CheckpointError:  # raised on every rank: no usable checkpoint. Say why if a setting changed
        newest = parts.comm.broadcast_object(_newest_config(path) if parts.comm.rank == 0 else None)
        if newest is not None:
            resume_changes.refuse(resume_changes.changed_settings(newest[1], config or {}), newest[0])
        raise
    if info is None:
        if must_exist:
            raise ckpt.CheckpointError(f"resume path {path!r} holds no checkpoint (expected step-XXXXXXXX "
                                       f"directories or a `latest` pointer)")
        return None
    extra = info["extra"]
    changes = resume_changes.changed_settings(extra.get("config"), config or {})
    resume_changes.refuse(changes, info["path"])
    state.load_state_dict(info["step"], extra)
    parts.sampler.load_state_dict(extra["sampler"])
    scheduler_state = dict(extra["scheduler"])
    if config and "optimizer" in config:  # this run's hyperparameters, not the saved ones
        for key, value in hyperparameters(config["optimizer"]).items():
            setattr(parts.optimizer.optimizer, key, value)
        scheduler_state["base_lr"] = config["optimizer"]["lr"]
    parts.scheduler.load_state_dict(scheduler_state)
    if info["rng_state"] is not None:
        nn.default_rng().bit_generator.state = info["rng_state"]
    schedule = (config or {}).get("training", {}).get("schedule", "constant")
    info["notes"] = resume_changes.describe(changes, (
        f"the learning rate follows the {schedule} schedule rebuilt from lr {scheduler_state['base_lr']:g} over "
        f"{parts.total_steps} steps, continuing at step {info['step']} (lr {parts.optimizer.lr:.4g})"))
    return info


def _newest_config(path: str) -> tuple | None:
    """(checkpoint path, recorded config) of the checkpoint a resume from `path` tries first, or None."""
    try:
        newest = ckpt.candidates(path)[0]
        return newest, ckpt.read_manifest(newest).get("extra", {}).get("config")
    except (IndexError, OSError, ckpt.CheckpointError):
        return None


# Bytes a checkpoint spends beside the numbers themselves, measured on numpy 2's .npz (zip member
# headers, central directory, .npy header) and on our manifest (json, indent 1); names count apart.
# tests/test_disk.py checks checkpoint_bytes against real checkpoints: never under, within 1.5x.
NPZ_ARRAY_BYTES = 200            # plus twice the array's name
MANIFEST_BASE_BYTES = 1600       # plus the recorded config
MANIFEST_PARAMETER_BYTES = 90    # its "parameters" entry and its optimizer scalars, plus twice its name
MANIFEST_SEGMENT_BYTES = 150     # one row of the segment table (one state array of one piece), plus the name
MANIFEST_RANK_BYTES = 350        # one rank's RNG state and its file entry
MARGIN = 1.1                     # room for what the constants miss (longer numbers, another numpy)


def state_arrays_per_element(optimizer) -> int:
    """How many float32 state arrays the wrapped optimizer keeps per parameter element: Adam/AdamW
    two moments, SGD a momentum buffer if it has momentum; 2 for any other optimizer."""
    from ..optim import SGD

    wrapped = optimizer.optimizer
    if isinstance(wrapped, SGD):
        return 1 if wrapped.momentum else 0
    return 2  # Adam, AdamW, and the guess for an optimizer of unknown state


def open_metrics(comm, path: str, resume_step: int | None):
    """COLLECTIVE. Rank 0's MetricsFile at `path` (kept up to `resume_step` when resuming; None on
    other ranks). Raises TrainingError on every rank, naming the file, if rank 0 cannot open it."""
    from ..progress import MetricsFile

    metrics, error = None, None
    if comm.rank == 0:
        try:
            metrics = MetricsFile(path, resume_step)
        except OSError as exc:
            error = ckpt.files.write_error(path, exc)
    error = comm.broadcast_object(error)
    if error:
        raise TrainingError(f"{error} (rank 0)")
    return metrics


def agree_metrics_written(comm, metrics) -> None:
    """COLLECTIVE. Raise TrainingError on every rank if rank 0 failed to write a record of `metrics`
    (its MetricsFile; None elsewhere): one allreduce, at the end of a run."""
    error = metrics.error if metrics is not None else None
    if comm.any_true(error is not None):
        raise_agreed(comm, error, "writing metrics failed")


def refuse_all_skipped(steps: int, skipped: int) -> None:
    """Raise NonFiniteError if this run trained `steps` > 0 steps and skipped every one of them
    (the same numbers on every rank: skipping is agreed)."""
    if steps and skipped == steps:
        raise NonFiniteError(f"every one of the {steps} steps of this run was skipped (non-finite loss or gradient, "
                             f"training.on_nonfinite = \"skip\"): nothing was trained. Lower the learning rate, clip "
                             f"gradients (training.clip_norm), or look for NaN/inf in the data")


def checkpoint_bytes(parts, config: dict | None = None) -> int:
    """About what one checkpoint of the run takes on disk (a little more, never less): the model's
    arrays, the optimizer's state arrays (every piece on every rank) and the manifest (with `config`)."""
    import json

    layout, world, sharded = parts.ddp.layout, parts.comm.size, parts.optimizer.shard
    total = sum(nbytes + NPZ_ARRAY_BYTES + 2 * len(name) for name, nbytes in _model_arrays(parts.ddp))
    per_element = state_arrays_per_element(parts.optimizer)
    owned = [range_ for rank in range(world) for range_ in layout.owned_ranges(rank)] if sharded \
        else [(0, layout.padded_total)]
    piece_names = [name for lo, hi in owned for name, *_ in layout.segments(lo, hi)]
    total += per_element * (layout.total * 4 + sum(NPZ_ARRAY_BYTES + MANIFEST_SEGMENT_BYTES + len(name)
                                                   for name in piece_names))
    total += (MANIFEST_BASE_BYTES + len(json.dumps(config or {}, indent=1, default=repr)) + MANIFEST_RANK_BYTES * world
              + sum(MANIFEST_PARAMETER_BYTES + 2 * len(name) for name, _, _ in layout.entries))
    total += _compression_bytes(parts)
    return int(total * MARGIN)


def _compression_bytes(parts) -> int:
    """Every rank's compression state (PowerSGD's error feedback is as large as the weights it
    compresses, on every rank), with the npz overhead of each array; 0 without compression."""
    compressor = parts.ddp.compressor
    if compressor is None:
        return 0
    arrays = [value.nbytes for per_state in compressor.state_dict()["params"].values() for value in per_state.values()]
    return (sum(arrays) + NPZ_ARRAY_BYTES * len(arrays)) * parts.comm.size


def _model_arrays(ddp) -> list:
    """(name, bytes) of every array model.npz holds: parameters and buffers (no copies made)."""
    module = ddp.module
    arrays = [(name, param.data.nbytes) for name, param in ddp.named_parameters()]
    if hasattr(module, "named_buffers"):
        arrays += [(name, np.asarray(buffer).nbytes) for name, buffer in module.named_buffers()]
    return arrays
