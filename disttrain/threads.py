"""BLAS threads per rank: ranks on one node share its cores instead of oversubscribing them."""

from __future__ import annotations

import os

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
_limits = None  # keeps threadpoolctl's limit in force for the life of the process


def cores_available() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def choose_threads(local_size: int, requested: int = 0) -> tuple:
    """(threads per rank, why): `requested` if > 0, else a thread variable the user set, else the cores
    on this node divided by the ranks on it (at least 1). A launcher that already pinned each rank to
    fewer cores than the machine has (srun --cpu-bind) is taken at its word."""
    if requested > 0:
        return requested, "training.threads"
    for name in _THREAD_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value), f"${name}"
    cores = cores_available()
    total = os.cpu_count() or cores
    if cores < total:
        return max(1, cores), f"{cores} cores pinned to this rank"
    return max(1, cores // max(1, local_size)), f"{cores} cores / {local_size} ranks on this node"


def apply_threads(threads: int) -> None:
    """Limit every BLAS/OpenMP pool in this process to `threads` (process-wide, until exit)."""
    global _limits
    from threadpoolctl import threadpool_limits

    _limits = threadpool_limits(limits=int(threads))


def blas_info() -> list:
    """[{"library", "api", "version", "threads"}] for each BLAS/OpenMP pool numpy loaded."""
    from threadpoolctl import threadpool_info

    return [{"library": info.get("internal_api"), "api": info.get("user_api"), "version": info.get("version"),
             "threads": info.get("num_threads")} for info in threadpool_info()]
