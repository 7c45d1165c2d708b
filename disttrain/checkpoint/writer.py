"""Writing a checkpoint: every rank's files into a hidden directory, the manifest last, one rename to
publish it, then the `latest` pointer; and the start-up check that the directory can take one."""

from __future__ import annotations

import json
import os
import shutil
import time

from .files import (FORMAT, FORMAT_VERSION, LATEST, MANIFEST, CheckpointError, _agree, _fsync_dir, _size,
                    _write_npz, list_checkpoints, step_dirname, write_error)


def model_state(ddp) -> dict:
    """{name: array} of every parameter and buffer of the DataParallel's model."""
    if hasattr(ddp.module, "state_dict"):
        return ddp.module.state_dict()
    return {name: param.data for name, param in ddp.named_parameters()}


def save(directory: str, step: int, ddp, optimizer, comm, extra: dict | None = None, keep: int = 3,
         fault=None) -> str:
    """COLLECTIVE. Write checkpoint `step` of `ddp` (a DataParallel) and `optimizer` (a
    ShardedOptimizer) into `directory`; keep the newest `keep`. `extra` (JSON-ready, its "rng_state"
    gathered per rank) goes into the manifest; `fault(point)` is a test hook. Returns the checkpoint's
    path on every rank, or raises CheckpointError on every rank (then nothing was published)."""
    final = os.path.join(directory, step_dirname(step))
    partial = os.path.join(directory, ".partial-" + step_dirname(step))
    try:
        _agree(comm, lambda: _prepare(directory, partial, comm.rank), f"checkpoint {final}: creating the directory")
        written = _agree(comm, lambda: _write_rank_files(partial, ddp, optimizer, comm.rank, fault),
                         f"checkpoint {final}: writing this rank's files")
        rng_states = comm.allgather_object(extra.get("rng_state") if extra else None)

        def publish():
            if comm.rank == 0:
                manifest = _manifest(step, ddp, comm.size, written, rng_states, extra)
                _publish(directory, partial, final, manifest, step, keep)
        _agree(comm, publish, f"checkpoint {final}: publishing")
    except CheckpointError:
        if comm.rank == 0:  # every rank is past its writes (each step above is agreed): give the space back
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def _prepare(directory: str, partial: str, rank: int) -> None:
    """On rank 0: the checkpoint directory exists, earlier partial checkpoints are gone, `partial` is new."""
    if rank != 0:
        return
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.startswith(".partial-"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    os.makedirs(partial)


def _write_rank_files(partial: str, ddp, optimizer, rank: int, fault) -> dict:
    """This rank's files in `partial`: model.npz (rank 0) and its optimizer part (every rank of a sharded
    optimizer, else rank 0). Returns what the manifest needs of them: file checksums, the segment table,
    each stateful parameter's scalars, the optimizer's class, sharding and hyperparameters."""
    if fault is not None:
        fault("checkpoint")
    files, segments, scalars = {}, [], {}
    state = optimizer.state_dict(copy=False)
    if rank == 0:
        files["model.npz"] = _write_npz(os.path.join(partial, "model.npz"), model_state(ddp))
    if state["sharded"] or rank == 0:
        name = f"optimizer-part-{rank:05d}.npz"
        arrays = {}
        for segment in state["segments"]:
            scalars[segment["param"]] = segment["scalars"]
            for key, value in segment["arrays"].items():
                array_key = f"a{len(arrays)}"
                arrays[array_key] = value
                segments.append({"file": name, "key": array_key, "state": key, "param": segment["param"],
                                 "start": segment["start"], "stop": segment["stop"]})
        files[name] = _write_npz(os.path.join(partial, name), arrays)
    compression = _write_compression_part(partial, ddp, rank, files)
    return {"files": files, "segments": segments, "scalars": scalars, "class": state["class"],
            "sharded": state["sharded"], "hyperparameters": state["hyperparameters"], "compression": compression}


def _write_compression_part(partial: str, ddp, rank: int, files: dict) -> dict | None:
    """This rank's gradient-compression state (error feedback, warm-start factors) as
    compression-part-RRRRR.npz, if the compressor keeps any; returns its manifest entry
    {"method", "options", "arrays": [{"file", "key", "param", "state"}]}, or None without compression."""
    compressor = getattr(ddp, "compressor", None)
    if compressor is None:
        return None
    state = compressor.state_dict()
    entry = {"method": state["method"], "options": state["options"], "arrays": []}
    arrays = {}
    name = f"compression-part-{rank:05d}.npz"
    for param, per_state in state["params"].items():
        for key, value in per_state.items():
            array_key = f"a{len(arrays)}"
            arrays[array_key] = value
            entry["arrays"].append({"file": name, "key": array_key, "param": param, "state": key})
    if arrays:
        files[name] = _write_npz(os.path.join(partial, name), arrays)
    return entry


def _manifest(step: int, ddp, world_size: int, written: list, rng_states: list, extra: dict | None) -> dict:
    """The manifest of checkpoint `step` from every rank's `_write_rank_files` result."""
    parameter_scalars = {}
    for part in written:
        parameter_scalars.update(part["scalars"])
    ordered = {name: parameter_scalars[name] for name, _, _ in ddp.layout.entries if name in parameter_scalars}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": world_size,
        "library_version": _library_version(),
        "parameters": [{"name": name, "shape": list(shape)} for name, _, shape in ddp.layout.entries],
        # scalars: the first parameter's (Adam's step, say); parameter_scalars: every stateful parameter's
        "optimizer": {"class": written[0]["class"], "sharded": written[0]["sharded"],
                      "scalars": next(iter(ordered.values()), {}), "parameter_scalars": ordered,
                      "hyperparameters": written[0]["hyperparameters"],
                      "segments": [seg for part in written for seg in part["segments"]]},
        "files": {name: info for part in written for name, info in part["files"].items()},
        "rng_states": rng_states,
        # gradient compression: the method and, per rank in rank order, its state arrays (absent when
        # written without compression)
        **({"compression": {"method": written[0]["compression"]["method"],
                            "options": written[0]["compression"]["options"],
                            "ranks": [part["compression"]["arrays"] for part in written]}}
           if written[0]["compression"] else {}),
        "extra": {key: value for key, value in (extra or {}).items() if key != "rng_state"},
    }


def _publish(directory: str, partial: str, final: str, manifest: dict, step: int, keep: int) -> None:
    """On rank 0: the manifest last, one rename to make the checkpoint whole, then `latest`, then pruning."""
    path = os.path.join(partial, MANIFEST)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    try:
        with open(path, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise CheckpointError(write_error(path, error, len(text))) from None
    _fsync_dir(partial)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(partial, final)
    _fsync_dir(directory)
    _point_latest(directory, step_dirname(step))
    _prune(directory, keep, step)


def _point_latest(directory: str, name: str) -> None:
    temporary = os.path.join(directory, LATEST + ".tmp")
    try:
        with open(temporary, "w") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise CheckpointError(write_error(temporary, error, len(name) + 1)) from None
    os.replace(temporary, os.path.join(directory, LATEST))
    _fsync_dir(directory)


def _prune(directory: str, keep: int, step: int) -> None:
    # checkpoints past `step` are another history (an earlier run, or one resumed from further back):
    # kept, they would outrank the new ones and keep-last-N would delete what this run just wrote
    published = list_checkpoints(directory)
    stale = [path for saved, path in published if saved > step]
    current = [path for saved, path in published if saved <= step]
    for path in stale + current[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _library_version() -> str:
    from .. import __version__

    return __version__


def probe(directory: str, comm, needed_bytes: int) -> None:
    """COLLECTIVE, at start-up. Remove what interrupted saves left in `directory` (`.partial-*`
    directories, `.probe-*` and `latest.tmp` files: no other run writes there, the run directory being
    locked), then raise CheckpointError on every rank unless `directory` can be created, written and
    has room for a checkpoint of about `needed_bytes`. The probe file is removed whatever happens."""
    def check():
        if comm.rank != 0:
            return
        path = os.path.join(directory, f".probe-{os.getpid()}")
        try:
            os.makedirs(directory, exist_ok=True)
            remove_leftovers(directory)
            with open(path, "wb") as handle:
                handle.write(b"\0" * 4096)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise CheckpointError(f"checkpoint directory {directory!r} is not writable: {error}") from None
        finally:
            if os.path.lexists(path):
                os.remove(path)
        free = shutil.disk_usage(directory).free
        if free < needed_bytes:
            raise CheckpointError(f"checkpoint directory {directory!r} has {_size(free)} free, a checkpoint "
                                  f"needs about {_size(needed_bytes)}")
    _agree(comm, check, "checkpoint directory check")


def remove_leftovers(directory: str) -> None:
    """Remove the `.partial-*` directories, `.probe-*` files and `latest.tmp` of saves that were cut short."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(".partial-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".probe-") or name == LATEST + ".tmp":
            os.remove(path)


# --------------------------------------------------------------------------------------------- load
