"""Data-parallel training over MPI: communicators, flat buffers, DataParallel, ShardedOptimizer.

Importing this package does not import mpi4py; `init()` does, on first call.
"""

from .comm import Communicator, SingleProcessComm
from .launch import LaunchError, init, install_abort_hook
from .mpi import MPIComm
from .flat import FlatLayout, FlatParameters
from .parallel import STRATEGIES, DataParallel, ModelMismatchError, check_same_model
from .zero import ShardedOptimizer

__all__ = ["Communicator", "LaunchError", "MPIComm", "SingleProcessComm", "init", "install_abort_hook",
           "FlatLayout", "FlatParameters", "STRATEGIES", "DataParallel", "ModelMismatchError",
           "check_same_model", "ShardedOptimizer"]
