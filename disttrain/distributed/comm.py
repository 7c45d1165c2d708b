"""Communicators: what disttrain needs from one (Communicator), and a world of one process.

Every collective works on contiguous numpy buffers: no pickling on the per-step path. Collectives
marked COLLECTIVE must be called by every rank, in the same order. mpi.py holds the MPI one (the only
import of mpi4py in disttrain); launch.py picks the world's communicator when a job starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading
import time

import numpy as np

_OPS = ("sum", "max", "min")
# thread id -> (collective, since): the outermost collective each thread of this process is inside, on
# any communicator (the main thread's, the gradient thread's duplicate): what the watchdog reads
_waiting: dict = {}


def waiting_collectives() -> list:
    """[(collective name, seconds inside it, thread name)] of every thread of this process that is
    inside a collective now, the longest first."""
    now = time.monotonic()
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    entries = [(name, now - since, names.get(ident, "?")) for ident, (name, since) in list(_waiting.items())]
    return sorted(entries, key=lambda entry: -entry[1])


def _check_buffer(name: str, buffer: np.ndarray) -> None:
    if not isinstance(buffer, np.ndarray) or not buffer.flags.c_contiguous:
        kind = "a non-contiguous array" if isinstance(buffer, np.ndarray) else type(buffer).__name__
        raise ValueError(f"{name}: buffer must be a C-contiguous numpy array, got {kind}")


def _check_alltoall(send: np.ndarray, recv: np.ndarray, size: int) -> None:
    _check_buffer("alltoall", send)
    _check_buffer("alltoall", recv)
    if send.shape != recv.shape or send.dtype != recv.dtype or send.size % size:
        raise ValueError(f"alltoall: send ({send.shape} {send.dtype}) and recv ({recv.shape} {recv.dtype}) must "
                         f"have the same shape and dtype, with a size divisible by {size} ranks")


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"reduction op must be one of {_OPS}, got {op!r}")


class Communicator:
    """What disttrain needs from a communicator. `rank` in [0, size); collectives are COLLECTIVE.

    `current_collective` names the collective this rank is inside (None between collectives) and
    `collective_since` when it entered it: the watchdog reads both.
    """

    rank = 0
    size = 1
    is_mpi = False
    threads_ok = True  # a background thread may run collectives on a dup() of this communicator
    current_collective = None
    collective_since = 0.0

    def dup(self) -> "Communicator":
        """COLLECTIVE. A communicator over the same ranks whose collectives never match this one's, so
        that another thread can run its own sequence of collectives on it."""
        return self

    # --- collectives (all COLLECTIVE)
    def allreduce(self, buffer: np.ndarray, op: str = "sum") -> np.ndarray:
        """COLLECTIVE. Reduce `buffer` over all ranks in place; returns it."""
        raise NotImplementedError

    def reduce_scatter(self, send: np.ndarray, recv: np.ndarray | None = None) -> np.ndarray:
        """COLLECTIVE. `send` holds `size` equal blocks; this rank receives the sum over ranks of block
        `rank` into `recv`, or, with recv None, in place into the FIRST block of `send` (MPI's in-place
        rule; no extra buffer, and faster). Returns the array holding the result."""
        raise NotImplementedError

    def allgather(self, buffer: np.ndarray) -> np.ndarray:
        """COLLECTIVE. In place: `buffer` holds `size` equal blocks; block r comes from rank r."""
        raise NotImplementedError

    def broadcast(self, buffer: np.ndarray, root: int = 0) -> np.ndarray:
        """COLLECTIVE. Copy root's `buffer` into every rank's `buffer` in place."""
        raise NotImplementedError

    def alltoall(self, send: np.ndarray, recv: np.ndarray) -> np.ndarray:
        """COLLECTIVE. `send` and `recv` (same dtype and size) each hold `size` equal blocks: block r of
        this rank's `send` goes to rank r, and block j of `recv` comes from rank j. Returns recv."""
        raise NotImplementedError

    def barrier(self) -> None:
        """COLLECTIVE. Wait until every rank arrives."""

    def allgather_object(self, value) -> list:
        """COLLECTIVE, pickled: for start-up and error paths only, never per step."""
        return [value]

    def broadcast_object(self, value, root: int = 0):
        """COLLECTIVE, pickled: for start-up and error paths only, never per step."""
        return value

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now with exit code `code` (no collective needed)."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    # --- helpers
    def any_true(self, flag: bool) -> bool:
        """COLLECTIVE. True on every rank if `flag` is true on any rank (one scalar allreduce)."""
        buffer = np.array([1.0 if flag else 0.0])
        return bool(self.allreduce(buffer, "max")[0] > 0)

    def all_equal(self, values) -> np.ndarray:
        """COLLECTIVE. For each of `values` (numbers exact in float64, e.g. 48-bit digests or CRCs; the
        same count on every rank), True where every rank passed the same value: one allreduce (max)
        of the values beside their negatives."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        bounds = self.allreduce(np.concatenate([values, -values]), "max")
        return (bounds[:len(values)] == values) & (bounds[len(values):] == -values)

    def node_topology(self) -> dict:
        """COLLECTIVE (first call only). Hosts and ranks per host, from shared-memory groups."""
        return {"nodes": 1, "node_index": 0, "local_rank": 0, "local_size": 1,
                "hostnames": [socket.gethostname()]}

    def library_version(self) -> str:
        """Which MPI this communicator runs on, in one line."""
        return "none (single process)"

    def print(self, *args, all_ranks: bool = False, file=None, **kwargs) -> None:
        """Print on rank 0 only (or on every rank, each line prefixed with its rank)."""
        file = file or sys.stdout
        if all_ranks and self.size > 1:
            text = " ".join(str(a) for a in args)
            prefix = f"[rank {self.rank}] "
            print("\n".join(prefix + line for line in text.splitlines() or [""]), file=file, flush=True)
        elif self.rank == 0:
            print(*args, file=file, flush=True, **kwargs)

    def error(self, message: str) -> None:
        """Print an error line from this rank, prefixed with the rank, to stderr."""
        prefix = f"[rank {self.rank}] " if self.size > 1 else ""
        # one write, newline included: lines of ranks that fail together must not run into each other
        sys.stderr.write("".join(prefix + line + "\n" for line in str(message).splitlines() or [""]))
        sys.stderr.flush()

    @contextlib.contextmanager
    def _inside(self, name: str):
        """Mark this rank as inside collective `name` for the watchdog, until the block ends (or raises)."""
        self.current_collective = name
        self.collective_since = since = time.monotonic()
        thread = threading.get_ident()
        outermost = thread not in _waiting
        if outermost:
            _waiting[thread] = (name, since)
        try:
            yield
        finally:
            self.current_collective = None
            if outermost:
                _waiting.pop(thread, None)


class SingleProcessComm(Communicator):
    """A world of one: every collective is a local copy (or nothing)."""

    def allreduce(self, buffer, op="sum"):
        _check_buffer("allreduce", buffer)
        _check_op(op)
        return buffer

    def reduce_scatter(self, send, recv=None):
        _check_buffer("reduce_scatter", send)
        if recv is None:
            return send
        _check_buffer("reduce_scatter", recv)
        if send.size != recv.size:
            raise ValueError(f"reduce_scatter: send has {send.size} elements, expected 1 x {recv.size}")
        np.copyto(recv, send.reshape(recv.shape))
        return recv

    def allgather(self, buffer):
        _check_buffer("allgather", buffer)
        return buffer

    def alltoall(self, send, recv):
        _check_alltoall(send, recv, 1)
        np.copyto(recv, send)
        return recv

    def broadcast(self, buffer, root=0):
        _check_buffer("broadcast", buffer)
        if root != 0:
            raise ValueError(f"broadcast: root {root} is out of range for world size 1")
        return buffer


def digest48(text: str) -> int:
    """A 48-bit digest of `text` (sha256): exact in float64, so all_equal can compare it."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "little")
