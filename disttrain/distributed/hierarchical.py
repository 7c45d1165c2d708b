"""Hierarchical synchronisation: combine within each node over shared memory, across nodes among one
leader per node, then share within each node again, so that each node's network link carries the
minimum: one node's share, not one share per rank on the node.

Built from two sub-communicators of an MPIComm (mpi.py holds the MPI calls): `node`, the ranks that
share a node's memory (MPI's COMM_TYPE_SHARED split), and `leaders`, the lowest rank of each node.

Opt-in (optimizer.hierarchical): measured on 2 fake hosts x 2 ranks with 1 Gbit/s links (docs/scaling.json),
a ZeRO-1 step was 22.6% faster for a 40 MB gradient but 6.8% slower for a 7.5 MB one, where the extra
shared-memory phases cost more than the network bytes they save. MPICH's flat allreduce already sends
each node's minimum across the network, so only reduce_scatter and allgather (ZeRO-1) gain.
"""

from __future__ import annotations

import numpy as np

from .comm import Communicator, _check_buffer, _check_op
from .mpi import MPIComm


class HierarchicalComm(Communicator):
    """A Communicator over the same ranks as `world` (an MPIComm) whose allreduce, reduce_scatter and
    allgather each run in three phases: within the node, among node leaders, within the node.

    allreduce:      reduce to the node leader -> allreduce among leaders -> broadcast from the leader
    reduce_scatter: reduce to the node leader -> reduce-scatter of node shares among leaders -> scatter
    allgather:      gather to the node leader -> allgather of node shares among leaders -> broadcast
    Results equal `world`'s up to float rounding (sums are taken in another order). reduce_scatter and
    allgather need every node to hold the same number of ranks with consecutive world ranks (mpiexec
    -ppn / block placement); otherwise they fall back to `world`'s flat collectives (`blocked` says
    which). Constructing it is COLLECTIVE; so is every collective, as for any Communicator.
    """

    is_mpi = True
    is_hierarchical = True

    def __init__(self, world: MPIComm):
        if not isinstance(world, MPIComm):
            raise TypeError(f"HierarchicalComm wraps an MPIComm, got {type(world).__name__}")
        self.world = world
        self.rank, self.size, self.threads_ok = world.rank, world.size, world.threads_ok
        self.node = world.split_shared()
        self.is_leader = self.node.rank == 0
        self.leaders = world.split(0 if self.is_leader else None)
        placement = world.allgather_object((self.node.rank, self.node.size))
        local_size = self.node.size
        # blocked: rank r is local rank r % L of node r // L, for one L on every node
        self.blocked = all(size == local_size and local == rank % local_size
                           for rank, (local, size) in enumerate(placement))
        self._scratch = {}

    # --- the three-phase collectives
    def allreduce(self, buffer, op="sum"):
        _check_buffer("allreduce", buffer)
        _check_op(op)
        with self._inside("allreduce"):
            self.node.reduce(buffer, buffer, root=0, op=op)
            if self.is_leader:
                self.leaders.allreduce(buffer, op)
            self.node.broadcast(buffer, root=0)
        return buffer

    def reduce_scatter(self, send, recv=None):
        if not self.blocked:
            return self.world.reduce_scatter(send, recv)
        _check_buffer("reduce_scatter", send)
        if recv is None:  # in place: the first block of send, free once the node reduce has read it
            recv = send[:send.size // self.size]
        _check_buffer("reduce_scatter", recv)
        if send.size != recv.size * self.size or send.dtype != recv.dtype:
            raise ValueError(f"reduce_scatter: send has {send.size} {send.dtype} elements, expected "
                             f"{self.size} x {recv.size} {recv.dtype}")
        with self._inside("reduce_scatter"):
            node_sum = self._buffer("node_sum", send.size, send.dtype) if self.is_leader else None
            self.node.reduce(send, node_sum, root=0)
            node_share = self._buffer("node_share", recv.size * self.node.size, recv.dtype) if self.is_leader else None
            if self.is_leader:
                self.leaders.reduce_scatter(node_sum, node_share)
            self.node.scatter(node_share, recv, root=0)
        return recv

    def allgather(self, buffer):
        if not self.blocked:
            return self.world.allgather(buffer)
        _check_buffer("allgather", buffer)
        if buffer.size % self.size:
            raise ValueError(f"allgather: {buffer.size} elements do not split into {self.size} equal blocks")
        with self._inside("allgather"):
            share = buffer.size // self.size * self.node.size
            first = self.rank - self.node.rank  # this node's first world rank: its share starts there
            start = first * (buffer.size // self.size)
            self.node.gather(buffer[start:start + share], root=0)
            if self.is_leader:
                self.leaders.allgather(buffer)
            self.node.broadcast(buffer, root=0)
        return buffer

    def dup(self) -> "HierarchicalComm":
        """COLLECTIVE. The same three-phase communicator over a duplicate of the world (see Communicator.dup)."""
        return HierarchicalComm(self.world.dup())

    # --- everything else is the world's
    def broadcast(self, buffer, root=0):
        return self.world.broadcast(buffer, root)

    def alltoall(self, send, recv):
        # every pair of ranks exchanges its own block: nothing to combine within a node first
        return self.world.alltoall(send, recv)

    def barrier(self):
        self.world.barrier()

    def allgather_object(self, value):
        return self.world.allgather_object(value)

    def broadcast_object(self, value, root=0):
        return self.world.broadcast_object(value, root)

    def abort(self, code=1):
        self.world.abort(code)

    def node_topology(self):
        return self.world.node_topology()

    def library_version(self):
        return self.world.library_version() + " (hierarchical: node, leaders, node)"

    def _buffer(self, name: str, size: int, dtype) -> np.ndarray:
        """A scratch array reused across calls (one per name, size and dtype): no allocation per step."""
        key = (name, size, np.dtype(dtype).str)
        if key not in self._scratch:
            self._scratch[key] = np.empty(size, dtype)
        return self._scratch[key]
