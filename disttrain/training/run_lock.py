"""One owner per run directory: a lock file that names the training writing there.

Rank 0 creates DIR/disttrain.lock (JSON: pid, host, start time, the process's start tick, command)
before the run writes anything into DIR, atomically (the file is written aside and hard-linked into
place, which fails if a lock is already there). A second training into the same directory stops with
an error naming the holder. A lock left by a process that no longer runs (a crash, SIGKILL, an abort)
is taken over with a note when it was left on this host; one left on another host cannot be checked
from here, so the error says how to remove it. The lock is released when fit() ends, on every path.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

LOCK_NAME = "disttrain.lock"


class RunDirLockedError(RuntimeError):
    """Another training holds the run directory (or may: its lock was left on another host)."""


def acquire(comm, directories, say=print) -> "RunLock":
    """COLLECTIVE. Lock each of `directories`, (role, path) pairs such as ("run dir", "runs/a"), for
    this run on rank 0, creating them if missing; `say(line)` prints notes (a stale lock taken over).
    Raises RunDirLockedError on every rank if any is held or cannot be created."""
    lock = RunLock(directories if comm.rank == 0 else [])
    outcome = None
    if comm.rank == 0:
        try:
            outcome = ("ok", lock.take())
        except RunDirLockedError as error:
            outcome = ("locked", str(error))
        except OSError as error:
            role, directory = lock.current
            outcome = ("locked", f"{role} {directory!r} is not writable: cannot create its lock file "
                                 f"{LOCK_NAME} ({error.strerror or error})")
    kind, detail = comm.broadcast_object(outcome)
    if kind != "ok":
        raise RunDirLockedError(detail)
    for note in detail:
        say(note)
    return lock


class RunLock:
    """The lock files of one run's (role, directory) pairs (on rank 0; none elsewhere). `take()`
    creates them, `release()` removes those that are still this process's."""

    def __init__(self, directories):
        self.directories = []
        for role, directory in directories:  # one inside another is covered by the outer one's lock
            if not any(_within(directory, taken) for _, taken in self.directories):
                self.directories.append((role, directory))
        self.current = None
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "process_start": _process_start(os.getpid()),
                     "command": " ".join(sys.argv)}
        self.held = []

    def take(self) -> list:
        """Create every lock file; returns notes about stale locks taken over. Raises
        RunDirLockedError (after releasing any already taken) if one is held."""
        notes = []
        try:
            for role, directory in self.directories:
                self.current = (role, directory)
                notes += self._take_one(role, directory)
                self.held.append(os.path.join(directory, LOCK_NAME))
        except BaseException:
            self.release()
            raise
        return notes

    def _take_one(self, role: str, directory: str) -> list:
        os.makedirs(directory or ".", exist_ok=True)
        path, notes = os.path.join(directory, LOCK_NAME), []
        for _ in range(5):  # each retry follows a stale lock moved aside, or a lock gone as we looked
            if _link_new(path, self.mine):
                return notes
            holder = _read(path)
            if holder is None:
                continue  # removed between our attempt and the read
            if not holder:
                raise RunDirLockedError(f"{role} {directory} holds a lock file that is not disttrain's "
                                        f"or is damaged ({path}); if no training runs there, remove it")
            state = _holder_state(holder)
            if state == "running":
                raise RunDirLockedError(
                    f"{role} {directory} is in use by another training: pid {holder.get('pid')} on "
                    f"host {holder.get('host')}, started {holder.get('started')} (lock file {path}). Wait for it "
                    f"to end, stop it, or give this run another directory (--run-dir)")
            if state == "elsewhere":
                raise RunDirLockedError(
                    f"{role} {directory} is locked by pid {holder.get('pid')} on host "
                    f"{holder.get('host')}, started {holder.get('started')}, which cannot be checked from "
                    f"{socket.gethostname()}. If no training runs there, remove {path} and start again")
            if _move_aside(path, holder):
                notes.append(f"note: took over the lock of {role} {directory}: pid {holder.get('pid')} "
                             f"on host {holder.get('host')} (started {holder.get('started')}) is no longer running")
        raise RunDirLockedError(f"could not lock {role} {directory}: {path} keeps changing "
                                f"(several trainings starting at once?)")

    def release(self) -> None:
        """Remove the lock files this process still holds (a file now naming another process stays)."""
        for path in self.held:
            holder = _read(path)
            if holder is not None and all(holder.get(k) == self.mine[k] for k in ("pid", "host", "started")):
                try:
                    os.remove(path)
                except OSError:
                    pass
        self.held = []


def _within(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _link_new(path: str, content: dict) -> bool:
    """Write `content` aside and hard-link it to `path`: True if it is now there, False if a lock was."""
    aside = f"{path}.new-{os.getpid()}"
    try:
        with open(aside, "w") as handle:
            json.dump(content, handle)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.link(aside, path)
        return True
    except FileExistsError:
        return False
    finally:
        try:
            os.remove(aside)
        except OSError:
            pass


def _read(path: str) -> dict | None:
    """The lock's content; None if there is no file; {} if it cannot be read as a lock."""
    try:
        with open(path) as handle:
            content = json.load(handle)
        return content if isinstance(content, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _holder_state(holder: dict) -> str:
    """"running" (a live process on this host), "gone" (this host, not running), or "elsewhere"
    (another host, or a lock that names none)."""
    pid, host = holder.get("pid"), holder.get("host")
    if host != socket.gethostname() or not isinstance(pid, int):
        return "elsewhere"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:  # another user's process: alive
        return "running"
    started = holder.get("process_start")
    if started is not None and _process_start(pid) not in (None, started):
        return "gone"  # the pid was reused by another process
    return "running"


def _move_aside(path: str, holder: dict) -> bool:
    """Move the stale lock `holder` out of the way; False if what was moved is another, fresh lock
    (two trainings taking over at once), which is then put back."""
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    taken = _read(aside) == holder
    if not taken:
        try:
            os.link(aside, path)
        except OSError:
            pass
    try:
        os.remove(aside)
    except OSError:
        pass
    return taken


def _process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
