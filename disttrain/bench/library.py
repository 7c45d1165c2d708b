"""The disttrain systems, measured from the outside with the library's public API, unmodified.

Each step is timed with perf_counter around the calls a user makes: the forward pass and loss,
`loss.backward()`, `ddp.sync_gradients()`, `opt.step()` (update of the owned chunks + allgather) and
`opt.reset_grad()`. Each MPI collective is timed by replacing the communicator *instance's*
`allreduce` / `reduce_scatter` / `allgather` with a recording wrapper (the class and the library's
files are untouched; the wrapper costs two clock reads per call), so communication and waiting can be
told apart from the CPU work inside `sync_gradients()` and `opt.step()`.

For the cnn workload, `breakdown_step` also times each conv2d and max_pool2d call (forward, and the
backward of its output) by wrapping the two functions in `disttrain.ops` for that one step.

Variants:
  plain      1 process, no DataParallel: model + disttrain.optim.Adam (the simplest user program)
  zero1      DataParallel(strategy="reduce_scatter") + ShardedOptimizer(Adam, shard=True)  (ZeRO-1)
  allreduce  DataParallel(strategy="allreduce")      + ShardedOptimizer(Adam, shard=True)
  noshard    DataParallel(strategy="allreduce")      + ShardedOptimizer(Adam, shard=False) (classic DDP)
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from .workload import OP_CATEGORIES, Workload, initial_parameters

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
        self.model = build_model(workload)
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

    def breakdown_step(self, x, y) -> dict:
        """One training step with conv2d and max_pool2d timed: {category: seconds} for OP_CATEGORIES,
        plus "step" (the whole step, instrumented)."""
        import disttrain.ops as ops

        times = dict.fromkeys(OP_CATEGORIES, 0.0)
        with _timed(ops, "conv2d", times, "conv"), _timed(ops, "max_pool2d", times, "pool"):
            start = time.perf_counter()
            self.step(x, y)
            times["step"] = time.perf_counter() - start
        return times

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


def build_model(workload: Workload):
    """The workload's model from disttrain's public layers, holding its initial parameters: for the
    cnn, `disttrain.models.cnn` with no hidden layer (what examples/fashion_cnn.toml trains)."""
    import disttrain as dt
    from disttrain.models import cnn

    params = initial_parameters(workload)
    if workload.model == "cnn":
        model = cnn(workload.image, workload.layers[-1], channels=workload.channels, hidden=[])
    else:
        layers = []
        for weight, _ in params:
            layers += [dt.nn.Linear(weight.shape[1], weight.shape[0]), dt.nn.ReLU()]
        model = dt.nn.Sequential(*layers[:-1])
    flat_values = [value for pair in params for value in pair]
    for parameter, value in zip(model.parameters(), flat_values, strict=True):
        parameter.data[...] = value
    return model


@contextlib.contextmanager
def _timed(module, name: str, times: dict, kind: str):
    """Within the block, `module.name` adds its seconds to times[kind + " forward"] and the backward
    of each output it returns to times[kind + " backward"]."""
    original = getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        times[kind + " forward"] += time.perf_counter() - start
        backward = out._backward
        if backward is not None:
            def timed_backward(g):
                begin = time.perf_counter()
                grads = backward(g)
                times[kind + " backward"] += time.perf_counter() - begin
                return grads
            out._backward = timed_backward
        return out
    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, original)


def optimizer_backend() -> str:
    """Which path disttrain's fused optimizer updates took here ("numba" or "numpy"), if the library says."""
    try:
        from disttrain import fused
        return fused.backend()
    except (ImportError, AttributeError):
        return "numpy"


def make(variant: str, workload: Workload, rank: int, ranks: int, recorder, options: dict) -> DisttrainSystem:
    return DisttrainSystem(variant, workload, rank, ranks, recorder, bucket_mb=options.get("bucket_mb", 25.0))
