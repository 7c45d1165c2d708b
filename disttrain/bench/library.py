"""The disttrain systems, measured from the outside with the library's public API, unmodified.

Each step is timed with perf_counter around the calls a user makes: the forward pass and loss,
`loss.backward()`, `ddp.sync_gradients()`, `opt.step()` (update of the owned chunks + allgather) and
`opt.reset_grad()`. Each MPI collective is timed by replacing the communicator *instance's*
`allreduce` / `reduce_scatter` / `allgather` with a recording wrapper (the class and the library's
files are untouched; the wrapper costs two clock reads per call), so communication and waiting can be
told apart from the CPU work inside `sync_gradients()` and `opt.step()`.

Variants:
  plain      1 process, no DataParallel: model + disttrain.optim.Adam (the simplest user program)
  zero1      DataParallel(strategy="reduce_scatter") + ShardedOptimizer(Adam, shard=True)  (ZeRO-1)
  allreduce  DataParallel(strategy="allreduce")      + ShardedOptimizer(Adam, shard=True)
  noshard    DataParallel(strategy="allreduce")      + ShardedOptimizer(Adam, shard=False) (classic DDP)
"""

from __future__ import annotations

import numpy as np

from .workload import Workload, initial_parameters

VARIANTS = {"plain": None, "zero1": ("reduce_scatter", True), "allreduce": ("allreduce", True),
            "noshard": ("allreduce", False)}


class DisttrainSystem:
    """One rank of a disttrain variant; `step(x, y)` runs and records one training step."""

    def __init__(self, variant: str, workload: Workload, rank: int, ranks: int, recorder, bucket_mb: float = 25.0):
        import disttrain as dt
        from disttrain.distributed import DataParallel, ShardedOptimizer, init

        if variant not in VARIANTS:
            raise ValueError(f"disttrain variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        self.variant, self.recorder, self.ranks = variant, recorder, ranks
        self.comm = init()
        if self.comm.size != ranks or self.comm.rank != rank:
            raise RuntimeError(f"disttrain sees rank {self.comm.rank} of {self.comm.size}, launcher said "
                               f"{rank} of {ranks}")
        layers = []
        params = initial_parameters(workload)
        for i, (weight, bias) in enumerate(params):
            linear = dt.nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data[...] = weight
            linear.bias.data[...] = bias
            layers.append(linear)
            if i < len(params) - 1:
                layers.append(dt.nn.ReLU())
        self.model = dt.nn.Sequential(*layers)
        self.loss_fn = dt.nn.SoftmaxLoss()
        self.Tensor = dt.Tensor
        adam = dict(lr=workload.lr, beta1=workload.beta1, beta2=workload.beta2, eps=workload.eps)
        if variant == "plain":
            if ranks != 1:
                raise ValueError("the 'plain' disttrain variant runs on one process only")
            self.ddp = None
            self.forward_module = self.model
            self.optimizer = dt.optim.Adam(self.model.parameters(), **adam)
        else:
            strategy, shard = VARIANTS[variant]
            self.ddp = DataParallel(self.model, self.comm, strategy=strategy, bucket_mb=bucket_mb)
            self.forward_module = self.ddp
            self.optimizer = ShardedOptimizer(dt.optim.Adam, self.ddp.parameters(), self.comm, shard=shard,
                                              bucket_mb=bucket_mb, **adam)
        self.share = np.float32(1.0 / self.comm.size)  # equal per-rank batches in the benchmark
        for method in ("allreduce", "reduce_scatter", "allgather"):
            recorder.wrap(self.comm, method)
        recorder.phases = ["forward", "backward", "sync", "optimizer", "reset"]

    def step(self, x, y) -> float:
        rec = self.recorder
        loss = self.loss_fn(self.forward_module(self.Tensor.wrap(x)), y)
        rec.mark()
        if self.ddp is None:
            loss.backward()
        else:  # as the Trainer does: the backward seed carries this rank's share, no extra scaling pass
            loss.backward(self.share)
        rec.mark()
        if self.ddp is not None:
            self.ddp.sync_gradients(grad_scale=1.0)
        rec.mark()
        self.optimizer.step()
        rec.mark()
        self.optimizer.reset_grad()
        rec.mark()
        return float(loss.data)

    def state_bytes(self) -> int:
        return int(self.optimizer.state_bytes())

    def barrier(self) -> None:
        self.comm.barrier()

    def raw_collectives(self) -> dict | None:
        if self.ranks == 1 or not getattr(self.comm, "is_mpi", False):
            return None
        from .collectives import raw_mpi_collectives
        return raw_mpi_collectives(self.comm, self.ddp.layout.padded_total)

    def describe(self) -> dict:
        info = {"communicator": type(self.comm).__name__, "optimizer_backend": optimizer_backend()}
        if self.ddp is not None:
            layout = self.ddp.layout
            info.update({"strategy": self.ddp.strategy, "shard": self.optimizer.shard,
                         "flat_elements": layout.padded_total, "buckets": len(layout.buckets)})
        return info


def optimizer_backend() -> str:
    """Which path disttrain's fused optimizer updates took here ("numba" or "numpy"), if the library says."""
    try:
        from disttrain import fused
        return fused.backend()
    except (ImportError, AttributeError):
        return "numpy"


def make(variant: str, workload: Workload, rank: int, ranks: int, recorder, options: dict) -> DisttrainSystem:
    return DisttrainSystem(variant, workload, rank, ranks, recorder, bucket_mb=options.get("bucket_mb", 25.0))
