"""The checkpoint format's names and files: constants, the error type, checksums, fsync'd writes, the
collective agreement on a file operation, and finding and verifying checkpoints on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import traceback

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
    """np.savez to `path`, fsync'd; returns its {"sha256", "bytes"}. An OSError (a full disk, say)
    becomes a CheckpointError naming the file, what it needed and what was free."""
    try:
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise CheckpointError(write_error(path, error, sum(np.asarray(a).nbytes for a in arrays.values()))) from None
    return {"sha256": _sha256(path), "bytes": os.path.getsize(path)}


def write_error(path: str, error: OSError, needed_bytes: int | None = None) -> str:
    """One line for an OSError while writing `path`: the file, the system's reason and, when known,
    how many bytes the write needed and how many the file system has free."""
    text = f"cannot write {path}: {error.strerror or error}"
    if needed_bytes is not None:
        text += f" (it needs about {_size(needed_bytes)}"
        try:
            text += f"; {_size(shutil.disk_usage(os.path.dirname(path) or '.').free)} free there)"
        except OSError:
            text += ")"
    return text


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _agree(comm, action, what: str):
    """COLLECTIVE. Run `action()` on this rank; if it raised on any rank, raise CheckpointError on every
    rank with the first failing rank's message. Returns every rank's result (a list). A CheckpointError
    or OSError is reported as its message alone; anything else also prints its traceback (a bug)."""
    try:
        result, error = action(), None
    except CheckpointError as exc:
        result, error = None, str(exc)
    except OSError as exc:
        result, error = None, f"{exc.filename}: {exc.strerror or exc}" if exc.filename else f"{exc.strerror or exc}"
    except Exception as exc:  # every failure must reach the other ranks, or they would wait forever
        result, error = None, f"{type(exc).__name__}: {exc}"
        comm.error(f"{what} failed:\n{traceback.format_exc().rstrip()}")
    outcomes = comm.allgather_object((error, result))
    for rank, (message, _) in enumerate(outcomes):
        if message is not None:
            raise CheckpointError(f"{what} failed on rank {rank}: {message}")
    return [value for _, value in outcomes]


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


