"""Reading a checkpoint: checking it fits the model, restoring parameters and (resharded) optimizer
state, and reading the model or the whole optimizer state without MPI (export)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import numpy as np

from .files import CheckpointError, _agree, candidates, read_manifest, verify_files


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
    compressor = getattr(ddp, "compressor", None)
    if compressor is not None:
        with SegmentReader(path) as reader:
            compressor.load_state_dict(saved_compression_state(manifest, reader), ddp.comm.rank, ddp.comm.size)


def saved_compression_state(manifest: dict, reader: "SegmentReader") -> dict | None:
    """The checkpoint's gradient-compression state in a compressor's load_state_dict form: {"method",
    "options", "world_size", "ranks": [per saved rank: {param: {state: array, read on first access}}]};
    None for a checkpoint written without compression."""
    saved = manifest.get("compression")
    if saved is None:
        return None
    ranks = []
    for arrays in saved["ranks"]:
        sources = {}
        for entry in arrays:
            sources.setdefault(entry["param"], {})[entry["state"]] = (entry["file"], entry["key"])
        ranks.append({param: _LazyArrays(reader, where) for param, where in sources.items()})
    return {"method": saved["method"], "options": saved["options"], "world_size": manifest["world_size"],
            "ranks": ranks}


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
    from ..distributed.shard_state import assemble

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
