"""`disttrain bench`: disttrain side by side with a hand-written numpy + MPI baseline and PyTorch DDP.

One invocation of the runner launches every system in turn under the venv's `mpiexec`, round after
round (A, B, C, ..., A, B, C, ...), so that noise from the machine falls on all systems alike; each
launch is one `worker` process per rank that trains the same MLP on the same synthetic data and
writes what it measured; `report` turns that into a table on stdout and a JSON file.

    python -m disttrain.bench [--preset default|small] [--layers 784,1024,1024,10] [--batch 512] ...

Modules: workload (model, initial parameters, data), recorder (per-step timestamps), library (the
disttrain systems), handwritten (the numpy reference), torch_ddp (the PyTorch peers), collectives (raw
MPI times), worker (one measured run on one rank), runner (the entry point), report (analysis, table, JSON).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class System:
    """A benchmarked system: which module runs it, its variant there, and the rank counts it runs at."""

    name: str
    module: str          # "library", "handwritten" or "torch_ddp"
    variant: str | None
    min_ranks: int
    max_ranks: int | None
    description: str

    @property
    def needs_torch(self) -> bool:
        return self.module == "torch_ddp"

    @property
    def comm_measured(self) -> bool:
        """Whether its collectives are timed one by one (not so for DDP: they run inside backward)."""
        return not (self.needs_torch and self.variant != "plain")

    def runs_at(self, ranks: int) -> bool:
        return ranks >= self.min_ranks and (self.max_ranks is None or ranks <= self.max_ranks)


SYSTEMS = {s.name: s for s in (
    System("disttrain-plain", "library", "plain", 1, 1, "disttrain model + optim.Adam, no DataParallel"),
    System("disttrain-zero1", "library", "zero1", 1, None,
           "disttrain DataParallel(reduce_scatter) + ShardedOptimizer(Adam), ZeRO-1"),
    System("disttrain-allreduce", "library", "allreduce", 2, None,
           "disttrain DataParallel(allreduce) + ShardedOptimizer(Adam, shard=True)"),
    System("disttrain-noshard", "library", "noshard", 2, None,
           "disttrain DataParallel(allreduce) + ShardedOptimizer(Adam, shard=False)"),
    System("numpy", "handwritten", None, 1, None,
           "hand-written numpy MLP: Reduce_scatter + Adam on the slice + Allgather (plain Adam at 1 rank)"),
    System("torch", "torch_ddp", "plain", 1, 1, "PyTorch, one process, no DDP, torch.optim.Adam"),
    System("torch-ddp", "torch_ddp", "ddp", 1, None, "PyTorch DistributedDataParallel (gloo) + Adam"),
    System("torch-ddp-zero", "torch_ddp", "ddp-zero", 2, None,
           "PyTorch DDP (gloo) + ZeroRedundancyOptimizer(Adam)"),
)}

__all__ = ["System", "SYSTEMS"]
