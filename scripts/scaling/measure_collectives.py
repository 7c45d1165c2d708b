"""Time disttrain's collectives over a range of message sizes; run under mpiexec (e.g. on fake hosts).

    mpiexec -n 4 python scripts/scaling/measure_collectives.py --impl flat,hierarchical --out times.json

For each implementation (flat: disttrain's MPIComm, the calls DataParallel and ShardedOptimizer make -
in-place Allreduce, Reduce_scatter_block, in-place Allgather; hierarchical: HierarchicalComm's three
phases), each collective and each size (bytes of the full float32 buffer; reduce_scatter sends that
many and receives 1/size of it), every rank times each call after a barrier; a call's time is the slowest
rank's, the figure the median over `repeat` calls after one warm-up. The warm-up's result is checked
exactly (small integers sum exactly in float32), so a wrong implementation cannot be timed as a fast one.
Rank 0 writes {"world_size", "nodes", "ranks_per_node", "results": [{impl, collective, bytes, seconds,
samples}]} to --out (and prints one summary line per size).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from disttrain.distributed import init  # noqa: E402
from disttrain.distributed.hierarchical import HierarchicalComm  # noqa: E402

COLLECTIVES = ("allreduce", "reduce_scatter", "allgather")
DEFAULT_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20, 32 << 20]


def repeats_for(nbytes: int, requested: int) -> int:
    """Calls to time at a size: `requested` if given, else more for small messages (their noise is larger)."""
    if requested:
        return requested
    return 20 if nbytes <= 256 << 10 else 10 if nbytes <= 4 << 20 else 6


@functools.lru_cache(maxsize=2)
def patterned(elements: int) -> np.ndarray:
    """The values (i % 7) every rank starts from (plus its rank); shared, never written."""
    pattern = (np.arange(elements) % 7).astype(np.float32)
    pattern.flags.writeable = False
    return pattern


def run_one(comm, collective: str, elements: int, world_rank: int, world_size: int) -> tuple:
    """One call of `collective` on fresh patterned buffers; returns (seconds on this rank, result correct)."""
    pattern = patterned(elements)
    if collective == "allreduce":
        buffer = pattern + world_rank
        expected = pattern * world_size + world_size * (world_size - 1) / 2
        comm.barrier()
        start = time.perf_counter()
        comm.allreduce(buffer)
        seconds = time.perf_counter() - start
        return seconds, bool(np.array_equal(buffer, expected))
    if collective == "reduce_scatter":
        send = pattern + world_rank
        block = elements // world_size
        recv = np.empty(block, np.float32)
        mine = pattern[world_rank * block:(world_rank + 1) * block]
        expected = mine * world_size + world_size * (world_size - 1) / 2
        comm.barrier()
        start = time.perf_counter()
        comm.reduce_scatter(send, recv)
        seconds = time.perf_counter() - start
        return seconds, bool(np.array_equal(recv, expected))
    block = elements // world_size
    expected = pattern + np.repeat(np.arange(world_size, dtype=np.float32), block)
    buffer = np.zeros(elements, np.float32)
    buffer[world_rank * block:(world_rank + 1) * block] = expected[world_rank * block:(world_rank + 1) * block]
    comm.barrier()
    start = time.perf_counter()
    comm.allgather(buffer)
    seconds = time.perf_counter() - start
    return seconds, bool(np.array_equal(buffer, expected))


def main(argv=None) -> int:
    """Parse arguments, time every (implementation, collective, size), write the JSON on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", default="flat", help="comma-separated: flat, hierarchical")
    parser.add_argument("--collectives", default=",".join(COLLECTIVES))
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="bytes, comma-separated")
    parser.add_argument("--repeat", type=int, default=0, help="timed calls per size (0: by size)")
    parser.add_argument("--out", help="JSON file written by rank 0")
    args = parser.parse_args(argv)

    world = init()
    topology = world.node_topology()
    impls = {"flat": world}
    if "hierarchical" in args.impl.split(","):
        impls["hierarchical"] = HierarchicalComm(world)
    quantum = world.size * 16  # whole float32 blocks per rank, aligned like disttrain's flat buffers
    results = []
    for nbytes in map(int, args.sizes.split(",")):
        elements = max(quantum, (nbytes // 4) // quantum * quantum)
        for collective in args.collectives.split(","):
            for name in args.impl.split(","):
                comm = impls[name]
                _, correct = run_one(comm, collective, elements, world.rank, world.size)  # warm-up, checked
                if not world.allgather_object(correct) == [True] * world.size:
                    raise SystemExit(f"{name} {collective} of {elements * 4} bytes gave a wrong result")
                times = np.array([run_one(comm, collective, elements, world.rank, world.size)[0]
                                  for _ in range(repeats_for(nbytes, args.repeat))])
                world.allreduce(times, "max")  # a call lasts until its slowest rank returns
                results.append({"impl": name, "collective": collective, "bytes": elements * 4,
                                "seconds": float(np.median(times)), "samples": times.tolist()})
                if world.rank == 0:
                    print(f"{name:>12} {collective:>14} {elements * 4:>10} B  {np.median(times) * 1e3:9.3f} ms",
                          flush=True)
    if world.rank == 0 and args.out:
        with open(args.out, "w") as handle:
            json.dump({"world_size": world.size, "nodes": topology["nodes"], "ranks_per_node": topology["local_size"],
                       "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
