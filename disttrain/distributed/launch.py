"""Starting a job: `init()` picks the world's communicator (MPI under a launcher, else a world of one),
installs the abort-on-exception hook so that a failing rank ends the job instead of leaving it
hanging, and refuses the classic launch mistake (N independent singletons started by `srun` without a
matching PMI)."""

from __future__ import annotations

import os
import sys
import threading
import traceback

from .comm import Communicator, SingleProcessComm

_SIZE_VARIABLES = ("SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


class LaunchError(RuntimeError):
    """The job was launched in a way that cannot work (e.g. N singletons instead of one world of N)."""


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
    # MPICH's default (I)reduce_scatter_block is up to 8x slower than pairwise exchange for ~1e5-float
    # buffers and no faster elsewhere (measured, 2 ranks); read at MPI_Init, ignored by other MPIs.
    os.environ.setdefault("MPIR_CVAR_REDUCE_SCATTER_BLOCK_INTRA_ALGORITHM", "pairwise")
    os.environ.setdefault("MPIR_CVAR_IREDUCE_SCATTER_BLOCK_INTRA_ALGORITHM", "sched_pairwise")
    try:
        from .mpi import MPIComm  # imports mpi4py: only here, when a job starts

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
