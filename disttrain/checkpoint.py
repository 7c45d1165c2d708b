"""Checkpoints: atomic, checksummed, sharded on save, resharded on load to any world size.

A checkpoint is a directory `step-XXXXXXXX/` holding plain numpy files and a JSON manifest (no pickle:
opening a checkpoint never runs code):

    model.npz                 every parameter and buffer by name (written by rank 0)
    optimizer-part-RRRRR.npz  optimizer state arrays written by rank R, each a segment of one
                              parameter's flattened elements [start, stop)
    manifest.json             format, step, world size, versions, config, sampler/scheduler/RNG state,
                              sha256 and size of every file, and the segment table

The segment table keys state by parameter name and element range, never by "rank i's state", so a
checkpoint written by N ranks loads on M. Saving writes into `.partial-step-XXXXXXXX/`, fsyncs every
file, writes the manifest last, renames the directory, and only then moves the `latest` pointer: a
checkpoint is either complete and pointed to, or ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import traceback
import zipfile
from collections.abc import Mapping

import numpy as np

FORMAT = "disttrain-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file and the problem."""


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------------------ helpers
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_npz(path: str, arrays: dict) -> dict:
    """np.savez to `path`, fsync'd; returns its {"sha256", "bytes"}."""
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    return {"sha256": _sha256(path), "bytes": os.path.getsize(path)}


def _agree(comm, action, what: str):
    """COLLECTIVE. Run `action()` on this rank; if it raised on any rank, raise CheckpointError on every
    rank with the first failing rank's message. Returns every rank's result (a list)."""
    try:
        result, error = action(), None
    except Exception as exc:  # every failure must reach the other ranks, or they would wait forever
        result, error = None, f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, CheckpointError):  # ours say what is wrong; anything else needs its traceback
            comm.error(f"{what} failed:\n{traceback.format_exc().rstrip()}")
    outcomes = comm.allgather_object((error, result))
    for rank, (message, _) in enumerate(outcomes):
        if message is not None:
            raise CheckpointError(f"{what} failed on rank {rank}: {message}")
    return [value for _, value in outcomes]


def _model_state(ddp) -> dict:
    """{name: array} of every parameter and buffer of the DataParallel's model."""
    if hasattr(ddp.module, "state_dict"):
        return ddp.module.state_dict()
    return {name: param.data for name, param in ddp.named_parameters()}


# --------------------------------------------------------------------------------------------- save
def save(directory: str, step: int, ddp, optimizer, comm, extra: dict | None = None, keep: int = 3,
         fault=None) -> str:
    """COLLECTIVE. Write checkpoint `step` of `ddp` (a DataParallel) and `optimizer` (a
    ShardedOptimizer) into `directory`; keep the newest `keep`. Returns the checkpoint's path on every
    rank, or raises CheckpointError on every rank (then nothing was published)."""
    final = os.path.join(directory, step_dirname(step))
    partial = os.path.join(directory, ".partial-" + step_dirname(step))

    def prepare():
        if comm.rank == 0:
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):
                if name.startswith(".partial-"):
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            os.makedirs(partial)
    _agree(comm, prepare, f"checkpoint {final}: creating the directory")

    def write_files():
        if fault is not None:
            fault("checkpoint")
        files, segments, scalars = {}, [], {}
        state = optimizer.state_dict(copy=False)
        if comm.rank == 0:
            files["model.npz"] = _write_npz(os.path.join(partial, "model.npz"), _model_state(ddp))
        if state["sharded"] or comm.rank == 0:
            name = f"optimizer-part-{comm.rank:05d}.npz"
            arrays = {}
            for segment in state["segments"]:
                scalars[segment["param"]] = segment["scalars"]
                for key, value in segment["arrays"].items():
                    array_key = f"a{len(arrays)}"
                    arrays[array_key] = value
                    segments.append({"file": name, "key": array_key, "state": key, "param": segment["param"],
                                     "start": segment["start"], "stop": segment["stop"]})
            files[name] = _write_npz(os.path.join(partial, name), arrays)
        return {"files": files, "segments": segments, "scalars": scalars, "class": state["class"],
                "sharded": state["sharded"], "hyperparameters": state["hyperparameters"]}
    written = _agree(comm, write_files, f"checkpoint {final}: writing this rank's files")
    rng_states = comm.allgather_object(extra.get("rng_state") if extra else None)

    def publish():
        if comm.rank != 0:
            return None
        parameter_scalars = {}
        for part in written:
            parameter_scalars.update(part["scalars"])
        ordered = {name: parameter_scalars[name] for name, _, _ in ddp.layout.entries if name in parameter_scalars}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": comm.size,
            "library_version": _library_version(),
            "parameters": [{"name": name, "shape": list(shape)} for name, _, shape in ddp.layout.entries],
            # scalars: the first parameter's (Adam's step, say); parameter_scalars: every stateful parameter's
            "optimizer": {"class": written[0]["class"], "sharded": written[0]["sharded"],
                          "scalars": next(iter(ordered.values()), {}), "parameter_scalars": ordered,
                          "hyperparameters": written[0]["hyperparameters"],
                          "segments": [seg for part in written for seg in part["segments"]]},
            "files": {name: info for part in written for name, info in part["files"].items()},
            "rng_states": rng_states,
            "extra": {key: value for key, value in (extra or {}).items() if key != "rng_state"},
        }
        path = os.path.join(partial, MANIFEST)
        with open(path, "w") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(partial)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync_dir(directory)
        _point_latest(directory, step_dirname(step))
        _prune(directory, keep, step)
        return None
    _agree(comm, publish, f"checkpoint {final}: publishing")
    return final


def _point_latest(directory: str, name: str) -> None:
    temporary = os.path.join(directory, LATEST + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
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
    from . import __version__

    return __version__


def probe(directory: str, comm, needed_bytes: int) -> None:
    """COLLECTIVE. Raise CheckpointError on every rank unless `directory` can be created, written and
    has room for a checkpoint of about `needed_bytes` (checked before training starts)."""
    def check():
        if comm.rank != 0:
            return
        try:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f".probe-{os.getpid()}")
            with open(path, "wb") as handle:
                handle.write(b"\0" * 4096)
                handle.flush()
                os.fsync(handle.fileno())
            os.remove(path)
        except OSError as error:
            raise CheckpointError(f"checkpoint directory {directory!r} is not writable: {error}") from None
        free = shutil.disk_usage(directory).free
        if free < needed_bytes:
            raise CheckpointError(f"checkpoint directory {directory!r} has {free / 2**20:.1f} MiB free, a "
                                  f"checkpoint needs about {needed_bytes / 2**20:.1f} MiB")
    _agree(comm, check, "checkpoint directory check")


# --------------------------------------------------------------------------------------------- load
def list_checkpoints(directory: str) -> list:
    """[(step, path)] of published checkpoints in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def candidates(path: str) -> list:
    """Checkpoint directories to try for `path`: itself if it is one, else `latest` then older ones
    (in `path` or, for a run directory, in `path/checkpoints`)."""
    if os.path.isfile(os.path.join(path, MANIFEST)) or _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        return [path]
    nested = os.path.join(path, "checkpoints")
    if not list_checkpoints(path) and os.path.isdir(nested):
        path = nested
    ordered = [p for _, p in reversed(list_checkpoints(path))]
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as handle:
            target = os.path.join(path, handle.read().strip())
        if target in ordered:
            ordered.remove(target)
            ordered.insert(0, target)
    return ordered


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint `path`, checked for format; raises CheckpointError."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{manifest_path}: missing (the checkpoint is incomplete)")
    try:
        with open(manifest_path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable ({error})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest


def verify_files(path: str, manifest: dict, names) -> None:
    """Raise CheckpointError naming the first of `names` that is missing, truncated or corrupt."""
    for name in names:
        info = manifest["files"][name]
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{file_path}: missing (a shard of this checkpoint is gone)")
        size = os.path.getsize(file_path)
        if size != info["bytes"]:
            raise CheckpointError(f"{file_path}: truncated or altered ({size} bytes, manifest says {info['bytes']})")
        if _sha256(file_path) != info["sha256"]:
            raise CheckpointError(f"{file_path}: checksum mismatch (the file is corrupt)")


def check_compatible(manifest: dict, ddp, optimizer, path: str) -> None:
    """Raise CheckpointError unless the checkpoint's parameters and optimizer fit this model."""
    theirs = {p["name"]: tuple(p["shape"]) for p in manifest["parameters"]}
    ours = {name: tuple(shape) for name, _, shape in ddp.layout.entries}
    missing = [n for n in ours if n not in theirs]
    unexpected = [n for n in theirs if n not in ours]
    misshaped = [f"{n}: checkpoint {theirs[n]} vs model {ours[n]}" for n in ours if n in theirs and theirs[n] != ours[n]]
    if missing or unexpected or misshaped:
        raise CheckpointError(f"{path}: written by a different model (missing {missing}, unexpected "
                              f"{unexpected}, mis-shaped {misshaped})")
    ours = optimizer.state_dict(copy=False)["class"] if optimizer is not None else None
    if ours is not None and manifest["optimizer"]["class"] != ours:
        raise CheckpointError(f"{path}: optimizer state is for {manifest['optimizer']['class']}, this run uses "
                              f"{ours}")


def load(path: str, ddp, optimizer, comm, warn=None) -> dict | None:
    """COLLECTIVE. Restore the newest usable checkpoint for `path` (a checkpoint, or a directory of them,
    tried from `latest` backwards) into `ddp` and `optimizer`, resharding optimizer state to this world
    size. Returns {"path", "step", "world_size", "extra", "rng_state"}; None if the directory holds
    no checkpoint. Unusable checkpoints are skipped with `warn(message)`; if none is usable, raises
    CheckpointError naming each and why."""
    tried = comm.broadcast_object(candidates(path) if comm.rank == 0 else None)
    if not tried:
        if not os.path.isdir(path):
            raise CheckpointError(f"resume path {path!r} does not exist")
        return None
    reasons = []
    for candidate in tried:
        try:
            manifest = _agree(comm, lambda: _verify(candidate, ddp, optimizer, comm), f"checking {candidate}")[0]
        except CheckpointError as error:
            reasons.append(str(error))
            if warn is not None and len(tried) > 1:
                warn(f"warning: skipping checkpoint {candidate}: {error}")
            continue
        _agree(comm, lambda: _restore(candidate, manifest, ddp, optimizer), f"loading {candidate}")
        states = manifest.get("rng_states") or []
        same_world = manifest["world_size"] == comm.size and comm.rank < len(states)
        return {"path": candidate, "step": manifest["step"], "world_size": manifest["world_size"],
                "extra": manifest.get("extra", {}), "rng_state": states[comm.rank] if same_world else None}
    raise CheckpointError("no usable checkpoint: " + "; ".join(reasons))


def _verify(path: str, ddp, optimizer, comm) -> dict:
    manifest = read_manifest(path)
    check_compatible(manifest, ddp, optimizer, path)
    names = sorted(manifest["files"])
    verify_files(path, manifest, names[comm.rank::comm.size])  # each rank checks its share, in parallel
    return manifest


def _restore(path: str, manifest: dict, ddp, optimizer) -> None:
    with np.load(os.path.join(path, "model.npz"), allow_pickle=False) as archive:
        state = {name: archive[name] for name in archive.files}
    if hasattr(ddp.module, "load_state_dict"):
        ddp.module.load_state_dict(state)
    else:
        for name, param in ddp.named_parameters():
            np.copyto(param.data, state[name])
    if optimizer is not None:
        with SegmentReader(path) as reader:
            saved = saved_optimizer_state(manifest, reader)
            try:
                optimizer.load_state_dict(saved)
            except ValueError as error:
                raise CheckpointError(f"{path}: {error}") from None


def saved_optimizer_state(manifest: dict, reader: "SegmentReader") -> dict:
    """The checkpoint's optimizer state in ShardedOptimizer.load_state_dict's form (shard_state.py),
    its arrays read from the part files through `reader` only when a rank asks for them. The saved
    hyperparameters are left out: a resumed run keeps its own settings (the manifest records them)."""
    opt = manifest["optimizer"]
    per_param = opt.get("parameter_scalars")
    grouped = {}
    for seg in opt["segments"]:
        where = (seg["param"], seg["start"], seg["stop"])
        grouped.setdefault(where, {})[seg["state"]] = (seg["file"], seg["key"])
    segments = [{"param": name, "start": start, "stop": stop, "arrays": _LazyArrays(reader, sources),
                 "scalars": per_param.get(name, {}) if per_param is not None else dict(opt["scalars"])}
                for (name, start, stop), sources in grouped.items()]
    if per_param is not None:
        stateful = list(per_param)
    else:  # written before per-parameter scalars: every parameter had state if any had
        stateful = [p["name"] for p in manifest.get("parameters", [])] if grouped else []
    return {"class": opt.get("class"), "segments": segments, "stateful": stateful}


def read_optimizer_state(path: str, manifest: dict, pieces) -> list:
    """The saved optimizer state of each (param name, start, stop) piece, as shard_state.assemble gives
    it, whatever world size wrote the checkpoint. Raises CheckpointError naming a gap or bad file."""
    from .distributed.shard_state import assemble

    with SegmentReader(path) as reader:
        try:
            return assemble(saved_optimizer_state(manifest, reader), pieces)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None


class SegmentReader:
    """Opens a checkpoint's part files on first use and keeps them open until the `with` block ends;
    `array(file, key)` reads one saved segment. Unreadable files raise CheckpointError naming them."""

    def __init__(self, path: str):
        self.path, self.open_files = path, {}

    def __enter__(self) -> "SegmentReader":
        return self

    def __exit__(self, *exc) -> None:
        for archive in self.open_files.values():
            archive.close()

    def array(self, name: str, key: str) -> np.ndarray:
        file_path = os.path.join(self.path, name)
        try:
            if name not in self.open_files:
                self.open_files[name] = np.load(file_path, allow_pickle=False)
            return self.open_files[name][key]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"{file_path}: unreadable ({error})") from None


class _LazyArrays(Mapping):
    """{state key: array} of one saved segment, each read from its part file when first asked for."""

    def __init__(self, reader: SegmentReader, sources: dict):
        self.reader, self.sources = reader, sources

    def __getitem__(self, key):
        return self.reader.array(*self.sources[key])

    def __iter__(self):
        return iter(self.sources)

    def __len__(self):
        return len(self.sources)


# ------------------------------------------------------------------------------------------- export
def read_model(path: str) -> tuple:
    """({name: array}, manifest, checkpoint path) of the newest usable checkpoint for `path`
    (verified), read serially without MPI."""
    errors = []
    for candidate in candidates(path):
        try:
            manifest = read_manifest(candidate)
            verify_files(candidate, manifest, ["model.npz"])
            with np.load(os.path.join(candidate, "model.npz"), allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}, manifest, candidate
        except CheckpointError as error:
            errors.append(str(error))
    raise CheckpointError(f"no usable checkpoint under {path!r}" + (": " + "; ".join(errors) if errors else ""))


def consolidated_optimizer_state(path: str, manifest: dict) -> dict:
    """{state key: {param name: full array}} assembled from every shard of checkpoint `path`
    (parameters without state are left out)."""
    verify_files(path, manifest, sorted(manifest["files"]))
    shapes = {p["name"]: tuple(p["shape"]) for p in manifest["parameters"]}
    full = {}
    with SegmentReader(path) as reader:
        for seg in manifest["optimizer"]["segments"]:
            per_param = full.setdefault(seg["state"], {})
            if seg["param"] not in per_param:
                per_param[seg["param"]] = np.zeros(int(np.prod(shapes[seg["param"]])), np.float32)
            per_param[seg["param"]][seg["start"]:seg["stop"]] = reader.array(seg["file"], seg["key"])
    return {key: {name: flat.reshape(shapes[name]) for name, flat in params.items()} for key, params in full.items()}
