"""An uncaught exception on the last rank while every other rank waits in an allreduce.

Run under mpiexec. Without disttrain's abort hook the other ranks would wait forever.
"""

import numpy as np

from disttrain.distributed import init

comm = init()
if comm.rank == comm.size - 1:
    raise RuntimeError(f"deliberate failure on rank {comm.rank}")
comm.allreduce(np.zeros(4, dtype=np.float32))  # never completes: the last rank does not arrive
