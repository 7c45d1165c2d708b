"""A float32 Allreduce across (fake) hosts, run by tests/test_multihost.py under mpiexec.

Every rank fills `--elements` float32 values with (i % 7) + rank and sums them in place `--repeat` times
(after one warm-up), checking each result exactly (small integers are exact in float32). Rank 0 prints
one JSON line: world size, each rank's processor name and COMM_TYPE_SHARED size, whether every result
was right, the buffer's bytes and the median seconds per Allreduce. With `--loop` it then prints
"looping" and keeps reducing until the job is killed (for fault tests).
"""

import argparse
import json
import time

import numpy as np
from mpi4py import MPI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elements", type=int, default=1 << 20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", action="store_true")
    args = parser.parse_args()

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    pattern = (np.arange(args.elements) % 7).astype(np.float32)
    expected = pattern * world.size + world.size * (world.size - 1) / 2
    values = np.empty(args.elements, dtype=np.float32)

    correct = True
    seconds = []
    for attempt in range(args.repeat + 1):
        values[:] = pattern + world.rank
        world.Barrier()
        start = time.perf_counter()
        world.Allreduce(MPI.IN_PLACE, values, op=MPI.SUM)
        if attempt:  # the first one is a warm-up (connections are made lazily)
            seconds.append(time.perf_counter() - start)
        correct &= bool(np.array_equal(values, expected))

    names = world.gather(MPI.Get_processor_name())
    shared_sizes = world.gather(node.size)
    all_correct = world.allreduce(correct, op=MPI.LAND)
    slowest = world.allreduce(float(np.median(seconds)), op=MPI.MAX)
    if world.rank == 0:
        print(json.dumps({"world_size": world.size, "processor_names": names, "shared_sizes": shared_sizes,
                          "correct": all_correct, "nbytes": values.nbytes, "repeat": args.repeat,
                          "seconds_per_allreduce": slowest}), flush=True)
    if args.loop:
        if world.rank == 0:
            print("looping", flush=True)
        while True:
            world.Allreduce(MPI.IN_PLACE, values, op=MPI.SUM)


if __name__ == "__main__":
    main()
