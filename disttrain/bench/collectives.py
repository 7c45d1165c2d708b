"""Raw MPI collective times for a buffer of the model's size: the floor under a system's communication.

Measured after the training steps through disttrain's MPIComm (one thin call over mpi4py's buffer
API, the package's only MPI import) on a float32 buffer of `elements` (the padded flat size), each
repetition started right after a barrier so that waiting is excluded. The report divides a system's
measured communication time by these figures.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

RAW_REPEATS = 15
RAW_WARMUP = 3
EVICT_BYTES = 64 << 20  # more than the last-level cache of the machines we measure on


def raw_mpi_collectives(comm, elements: int, repeats: int = RAW_REPEATS) -> dict:
    """COLLECTIVE. Median seconds on this rank of in-place Reduce_scatter_block, Allgather and Allreduce
    over `elements` float32 (rounded up to a multiple of the size) through `comm` (an MPIComm): the
    fastest forms, as disttrain uses.

    Each is timed twice: back to back with the buffer warm in cache (NAME), and after evicting the
    caches by writing a 64 MiB scratch array (NAME_cold), as in training, where backward and the
    optimizer have just swept more memory than the caches hold. The two bracket a training step's case.
    """
    size = comm.size
    elements = -(-int(elements) // size) * size
    full = np.ones(elements, np.float32)
    evict = np.empty(EVICT_BYTES // 4, np.float32)
    calls = {
        "reduce_scatter_block": lambda: comm.reduce_scatter(full),
        "allgather_in_place": lambda: comm.allgather(full),
        "allreduce_in_place": lambda: comm.allreduce(full),
    }
    result = {"elements": elements, "bytes": elements * 4}
    for name, call in calls.items():
        for suffix, cold in (("", False), ("_cold", True)):
            times = []
            for i in range(RAW_WARMUP + repeats):
                full.fill(1.0)
                if cold:
                    evict.fill(float(i))
                comm.barrier()
                start = time.perf_counter()
                call()
                if i >= RAW_WARMUP:
                    times.append(time.perf_counter() - start)
            result[name + suffix] = statistics.median(times)
    return result
