"""HierarchicalComm's collectives against their definitions, run by tests/test_multihost_training.py under
mpiexec on fake hosts.

Every rank starts from (i % 7) + rank (small integers: float32 sums are exact in any order) and checks
allreduce (sum and max), reduce_scatter and allgather exactly, at a size that splits into whole blocks
and at 1 element per rank. Rank 0 prints one JSON line: world size, whether node placement is `blocked`
(so reduce_scatter/allgather run in three phases), the number of node leaders, and each check's result.
"""

import json

import numpy as np

from disttrain.distributed import init
from disttrain.distributed.hierarchical import HierarchicalComm


def checks(comm, world_size: int, rank: int, elements: int) -> dict:
    """{name: correct on this rank} for each collective at `elements` (a multiple of world_size)."""
    pattern = (np.arange(elements) % 7).astype(np.float32)
    total = pattern * world_size + world_size * (world_size - 1) / 2
    block = elements // world_size
    results = {}

    buffer = pattern + rank
    results["allreduce_sum"] = np.array_equal(comm.allreduce(buffer), total)
    buffer = pattern + rank
    results["allreduce_max"] = np.array_equal(comm.allreduce(buffer, "max"), pattern + world_size - 1)
    recv = np.full(block, -1, np.float32)
    comm.reduce_scatter(pattern + rank, recv)
    results["reduce_scatter"] = np.array_equal(recv, total[rank * block:(rank + 1) * block])
    expected = pattern + np.repeat(np.arange(world_size, dtype=np.float32), block)
    buffer = np.zeros(elements, np.float32)
    buffer[rank * block:(rank + 1) * block] = expected[rank * block:(rank + 1) * block]
    results["allgather"] = np.array_equal(comm.allgather(buffer), expected)
    return {f"{name}_{elements}": bool(ok) for name, ok in results.items()}


def main() -> None:
    world = init()
    comm = HierarchicalComm(world)
    mine = {}
    for elements in (world.size * 4099, world.size):
        mine.update(checks(comm, world.size, world.rank, elements))
    everyone = world.allgather_object(mine)
    leaders = world.allgather_object(comm.is_leader)
    if world.rank == 0:
        print(json.dumps({"world_size": world.size, "blocked": comm.blocked, "leaders": sum(leaders),
                          "correct": {name: all(r[name] for r in everyone) for name in mine}}), flush=True)


if __name__ == "__main__":
    main()
