"""What a run saves beside the model and the optimizer (TrainState, sampler, schedule, RNG, config),
and how a resumed run takes it back. The files themselves are checkpoint.py's."""

from __future__ import annotations

from .. import checkpoint as ckpt
from .. import nn


def save(directory: str, parts, state, config: dict, keep: int, fault=None) -> str:
    """COLLECTIVE. Checkpoint `state.step` of the run `parts` (RunParts) into `directory`, keeping the
    newest `keep`; returns its path. `fault(point)` is the fault-injection hook (tests only)."""
    parts.ddp.wait_for_parameters()
    extra = {**state.state_dict(), "sampler": parts.sampler.state_dict(), "scheduler": parts.scheduler.state_dict(),
             "config": config, "rng_state": nn.default_rng().bit_generator.state}
    return ckpt.save(directory, state.step, parts.ddp, parts.optimizer, parts.comm, extra, keep=keep, fault=fault)


def resume(path: str, parts, state, must_exist: bool, warn) -> dict | None:
    """COLLECTIVE. Restore the newest usable checkpoint under `path` into the run: parameters,
    optimizer state (resharded to this world size), `state`, sampler, schedule and, at the same world
    size, this rank's RNG. Returns the checkpoint loader's info, or None when `path` holds no
    checkpoint and `must_exist` is False (raises CheckpointError when it is True)."""
    info = ckpt.load(path, parts.ddp, parts.optimizer, parts.comm, warn=warn)
    if info is None:
        if must_exist:
            raise ckpt.CheckpointError(f"resume path {path!r} holds no checkpoint (expected step-XXXXXXXX "
                                       f"directories or a `latest` pointer)")
        return None
    extra = info["extra"]
    state.load_state_dict(info["step"], extra)
    parts.sampler.load_state_dict(extra["sampler"])
    parts.scheduler.load_state_dict(extra["scheduler"])
    if info["rng_state"] is not None:
        nn.default_rng().bit_generator.state = info["rng_state"]
    return info


def checkpoint_bytes(parts) -> int:
    """About what one checkpoint of the run takes on disk: parameters plus up to three optimizer-state
    arrays of the same size, this rank's share of any compression state (PowerSGD's error feedback
    is as large as the weights it compresses, on every rank), plus metadata."""
    compressor = parts.ddp.compressor
    compression = sum(value.nbytes for per_state in compressor.state_dict()["params"].values()
                      for value in per_state.values()) if compressor is not None else 0
    return parts.ddp.layout.padded_total * 4 * 4 + compression * parts.comm.size + (1 << 20)
