"""Communicators: MPI (the only place mpi4py is imported) and a single-process stand-in.

Every collective works on contiguous numpy buffers through mpi4py's buffer (upper-case) API: no
pickling on the per-step path. Collectives marked COLLECTIVE must be called by every rank, in the same
order. `init()` picks the communicator, installs the abort-on-exception hook, and refuses the classic
launch mistake (N independent singletons started by `srun` without a matching PMI).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading
import time
import traceback

import numpy as np

_OPS = ("sum", "max", "min")
_SIZE_VARIABLES = ("SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


class LaunchError(RuntimeError):
    """The job was launched in a way that cannot work (e.g. N singletons instead of one world of N)."""


def _check_buffer(name: str, buffer: np.ndarray) -> None:
    if not isinstance(buffer, np.ndarray) or not buffer.flags.c_contiguous:
        kind = "a non-contiguous array" if isinstance(buffer, np.ndarray) else type(buffer).__name__
        raise ValueError(f"{name}: buffer must be a C-contiguous numpy array, got {kind}")


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
    current_collective = None
    collective_since = 0.0

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
        print("\n".join(prefix + line for line in str(message).splitlines() or [""]), file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _inside(self, name: str):
        """Mark this rank as inside collective `name` for the watchdog, until the block ends (or raises)."""
        self.current_collective = name
        self.collective_since = time.monotonic()
        try:
            yield
        finally:
            self.current_collective = None


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

    def broadcast(self, buffer, root=0):
        _check_buffer("broadcast", buffer)
        if root != 0:
            raise ValueError(f"broadcast: root {root} is out of range for world size 1")
        return buffer


class MPIComm(Communicator):
    """mpi4py's communicator (COMM_WORLD by default) behind the Communicator interface."""

    is_mpi = True

    def __init__(self, mpi_comm=None):
        from mpi4py import MPI  # the one import of mpi4py in disttrain

        self.MPI = MPI
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._topology = None

    def allreduce(self, buffer, op="sum"):
        _check_buffer("allreduce", buffer)
        _check_op(op)
        mpi_op = self._ops[op]
        with self._inside("allreduce"):
            self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=mpi_op)
        return buffer

    def reduce_scatter(self, send, recv=None):
        _check_buffer("reduce_scatter", send)
        if recv is None:
            if send.size % self.size:
                raise ValueError(f"reduce_scatter: {send.size} elements do not split into {self.size} equal blocks")
            with self._inside("reduce_scatter"):
                self.comm.Reduce_scatter_block(self.MPI.IN_PLACE, send, op=self.MPI.SUM)
            return send[:send.size // self.size]
        _check_buffer("reduce_scatter", recv)
        if send.size != recv.size * self.size or send.dtype != recv.dtype:
            raise ValueError(f"reduce_scatter: send has {send.size} {send.dtype} elements, expected "
                             f"{self.size} x {recv.size} {recv.dtype}")
        with self._inside("reduce_scatter"):
            self.comm.Reduce_scatter_block(send, recv, op=self.MPI.SUM)
        return recv

    def allgather(self, buffer):
        _check_buffer("allgather", buffer)
        if buffer.size % self.size:
            raise ValueError(f"allgather: {buffer.size} elements do not split into {self.size} equal blocks")
        with self._inside("allgather"):
            self.comm.Allgather(self.MPI.IN_PLACE, buffer)
        return buffer

    def broadcast(self, buffer, root=0):
        _check_buffer("broadcast", buffer)
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast: root {root} is out of range for world size {self.size}")
        with self._inside("broadcast"):
            self.comm.Bcast(buffer, root=root)
        return buffer

    def barrier(self):
        with self._inside("barrier"):
            self.comm.Barrier()

    # --- rooted collectives and sub-communicators, for hierarchical.py's three-phase synchronisation
    def reduce(self, send: np.ndarray, recv: np.ndarray | None, root: int = 0, op: str = "sum") -> None:
        """COLLECTIVE. On `root`, recv = the reduction of every rank's `send` (recv may be send: in
        place); other ranks only send (their recv is ignored, may be None)."""
        _check_buffer("reduce", send)
        _check_op(op)
        with self._inside("reduce"):
            if self.rank != root:
                self.comm.Reduce(send, None, op=self._ops[op], root=root)
            else:
                _check_buffer("reduce", recv)
                self.comm.Reduce(self.MPI.IN_PLACE if recv is send else send, recv, op=self._ops[op], root=root)

    def scatter(self, send: np.ndarray | None, recv: np.ndarray, root: int = 0) -> np.ndarray:
        """COLLECTIVE. `send` on root holds `size` equal blocks of len(recv); rank r receives block r
        (send is ignored, may be None, on other ranks)."""
        _check_buffer("scatter", recv)
        with self._inside("scatter"):
            self.comm.Scatter(send if self.rank == root else None, recv, root=root)
        return recv

    def gather(self, buffer: np.ndarray, root: int = 0) -> np.ndarray:
        """COLLECTIVE. In place: `buffer` holds `size` equal blocks; on `root` block r comes from rank r
        (other ranks send their own block; their buffer is unchanged)."""
        _check_buffer("gather", buffer)
        if buffer.size % self.size:
            raise ValueError(f"gather: {buffer.size} elements do not split into {self.size} equal blocks")
        with self._inside("gather"):
            if self.rank == root:
                self.comm.Gather(self.MPI.IN_PLACE, buffer, root=root)
            else:
                block = buffer.size // self.size
                self.comm.Gather(buffer[self.rank * block:(self.rank + 1) * block], None, root=root)
        return buffer

    def split(self, color: int | None, key: int = 0) -> "MPIComm | None":
        """COLLECTIVE. A communicator of the ranks that pass the same `color`, ordered by (key, rank);
        None for ranks that pass color None."""
        sub = self.comm.Split(self.MPI.UNDEFINED if color is None else color, key)
        return None if sub == self.MPI.COMM_NULL else MPIComm(sub)

    def split_shared(self) -> "MPIComm":
        """COLLECTIVE. A communicator of the ranks that share this node's memory, in this one's rank order."""
        return MPIComm(self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank))

    def allgather_object(self, value):
        with self._inside("allgather_object"):
            result = self.comm.allgather(value)
        return result

    def broadcast_object(self, value, root=0):
        with self._inside("broadcast_object"):
            result = self.comm.bcast(value, root=root)
        return result

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        # hydra's proxy can tear the job down before forwarding what was just printed (seen: a job's
        # whole stderr lost, ~1 in 100 fast failures under load); give it a moment to pass it on
        time.sleep(0.25)
        self.comm.Abort(code)

    def library_version(self):
        import mpi4py

        return f"mpi4py {mpi4py.__version__}; {self.MPI.Get_library_version().splitlines()[0].strip()}"

    def node_topology(self):
        if self._topology is None:
            local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
            local_rank, local_size = local.Get_rank(), local.Get_size()
            leader = local.bcast(self.rank, root=0)  # the lowest world rank on this node names it
            local.Free()
            entries = self.allgather_object((leader, socket.gethostname()))
            leaders = sorted({entry[0] for entry in entries})
            self._topology = {"nodes": len(leaders), "node_index": leaders.index(leader),
                              "local_rank": local_rank, "local_size": local_size,
                              "hostnames": [entries[rank][1] for rank in leaders]}
        return self._topology


def digest48(text: str) -> int:
    """A 48-bit digest of `text` (sha256): exact in float64, so all_equal can compare it."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "little")


# ------------------------------------------------------------------------------------------- init
_world: Communicator | None = None


def init(abort_on_exception: bool = True) -> Communicator:
    """The world communicator of this process (created on the first call; later calls return it).

    Under mpiexec/mpirun/srun this is MPI's COMM_WORLD; run plainly, or without mpi4py or an MPI
    library, it is a SingleProcessComm. With `abort_on_exception` (the default), an uncaught exception
    on any rank prints that rank's traceback and aborts the whole job instead of leaving it hanging.
    Raises LaunchError when the launcher started N > 1 processes that each see a world of 1.
    """
    global _world
    if _world is not None:
        return _world
    world = _mpi_world()
    expected = _launcher_world_size()
    if world.size == 1 and expected > 1:
        raise LaunchError(
            f"this process sees an MPI world of size 1, but the launcher asked for {expected} tasks "
            f"({_launcher_evidence()}): each task would train alone on the full data. Launch with "
            f"`srun --mpi=pmi2 ...` (SLURM, MPICH wheel) or the venv's `mpiexec -n {expected} ...`; "
            f"if mpi4py was built against another MPI than the launcher's, rebuild it "
            f"(`pip install --no-binary mpi4py mpi4py` with that MPI's mpicc on PATH).")
    if abort_on_exception:
        install_abort_hook(world)
    _world = world
    return world


def _mpi_world() -> Communicator:
    if os.environ.get("DISTTRAIN_NO_MPI") == "1":
        return SingleProcessComm()
    # MPICH's default Reduce_scatter_block is up to 7x slower than pairwise exchange for ~1e5-float
    # buffers and no faster elsewhere (measured, 2 ranks); read at MPI_Init, ignored by other MPIs.
    os.environ.setdefault("MPIR_CVAR_REDUCE_SCATTER_BLOCK_INTRA_ALGORITHM", "pairwise")
    try:
        world = MPIComm()
    except (ImportError, RuntimeError, OSError):
        return SingleProcessComm()
    return world


def _launcher_world_size() -> int:
    sizes = []
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            sizes.append(int(value))
    return max(sizes, default=1)


def _launcher_evidence() -> str:
    return ", ".join(f"{name}={os.environ[name]}" for name in _SIZE_VARIABLES if name in os.environ)


def install_abort_hook(comm: Communicator) -> None:
    """Make an uncaught exception on this rank print its traceback (prefixed with the rank) and abort all ranks."""
    def excepthook(kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        comm.error(text.rstrip())
        if comm.size > 1:
            comm.error(f"aborting all {comm.size} ranks because rank {comm.rank} failed")
            comm.abort(1)
        sys.exit(1)

    def thread_excepthook(args):
        excepthook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
