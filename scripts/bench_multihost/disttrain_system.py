"""One rank of a disttrain system, written as a new user writes it from the README's low-level API:

    comm = init(); ddp = DataParallel(model, comm, **options)
    opt = ShardedOptimizer(dt.optim.Adam, ddp.parameters(), comm, lr=1e-3)
    loss = dt.nn.SoftmaxLoss()(ddp(dt.Tensor(x_local)), y_local); loss.backward(); opt.step(); opt.reset_grad()

The system's options go to DataParallel unchanged, but for `shard` and `lazy_gather`, which go to
ShardedOptimizer. When this build rejects one (TypeError for an unknown
keyword, ValueError for an unknown value) the system is Unavailable, with the library's own message.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from systems import System, Unavailable


class DisttrainRun:
    """The model, DataParallel and ZeRO-1 Adam of one rank. COLLECTIVE to construct (every rank)."""

    def __init__(self, system: System, workload, initial: list):
        import disttrain as dt
        from disttrain.distributed import DataParallel, ShardedOptimizer, init

        self.dt = dt
        self.comm = init()
        self.rank, self.size = self.comm.rank, self.comm.size
        layers = []
        for index, (weight, bias) in enumerate(initial):
            linear = dt.nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data[...] = weight
            linear.bias.data[...] = bias
            layers += [linear] if index == len(initial) - 1 else [linear, dt.nn.ReLU()]
        model = dt.nn.Sequential(*layers)
        options = dict(system.options)
        optimizer_options = {key: options.pop(key) for key in ("shard", "lazy_gather") if key in options}
        try:
            self.ddp = DataParallel(model, self.comm, **options)
            self.optimizer = ShardedOptimizer(dt.optim.Adam, self.ddp.parameters(), self.comm, lr=workload.lr,
                                              **optimizer_options)
        except (TypeError, ValueError) as error:
            raise Unavailable(f"DataParallel/ShardedOptimizer reject {_options_text(system.options)}: "
                              f"{type(error).__name__}: {error}") from None
        self.loss_fn = dt.nn.SoftmaxLoss()

    def step(self, x: np.ndarray, y: np.ndarray) -> dict:
        """One training step on this rank's rows; {"loss" (this rank's mean), phase: seconds}.
        "step" (opt.step()) is split into "sync" (waiting for / running the gradient collectives),
        "update" (Adam on this rank's shard) and "gather" (parameter allgather) where the optimizer
        reports them."""
        t0 = time.perf_counter()
        loss = self.loss_fn(self.ddp(self.dt.Tensor(x)), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        t3 = time.perf_counter()
        self.optimizer.reset_grad()
        t4 = time.perf_counter()
        phases = {"loss": float(loss.data), "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                  "reset": t4 - t3}
        update = getattr(self.optimizer, "last_update_seconds", None)
        gather = getattr(self.optimizer, "last_gather_seconds", None)
        if update is not None and gather is not None:
            phases.update(update=update, gather=gather, sync=max(0.0, t3 - t2 - update - gather))
        return phases

    def eval_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """This rank's mean loss on (x, y) under the current parameters, without a gradient."""
        with self.dt.no_grad():
            return float(self.loss_fn(self.ddp(self.dt.Tensor(x)), y).data)

    def param_digest(self) -> str:
        """SHA-256 of every parameter's bytes, in order (equal on every rank when the replicas agree)."""
        digest = hashlib.sha256()
        for param in self.ddp.parameters():
            digest.update(np.ascontiguousarray(param.data).tobytes())
        return digest.hexdigest()

    def barrier(self) -> None:
        """COLLECTIVE."""
        self.comm.barrier()

    def gather(self, value) -> list:
        """COLLECTIVE. Every rank's `value`, in rank order (pickled; outside the measured steps)."""
        return self.comm.allgather_object(value)

    def describe(self) -> dict:
        """How the library set itself up: the resolved options it exposes, and the flat buffer's buckets."""
        layout = self.ddp.layout
        info = {"strategy": self.ddp.strategy, "overlap": getattr(self.ddp, "overlap", None),
                "flat_elements": int(layout.padded_total),
                "bucket_elements": [int(hi - lo) for lo, hi in layout.buckets],
                "param_elements": [int(p.data.size) for p in self.ddp.parameters()]}
        for name in ("hierarchical", "compression", "powersgd_rank"):
            value = getattr(self.ddp, name, None)
            if isinstance(value, (bool, int, float, str)) or value is None:
                info[name] = value
            else:
                info[name] = type(value).__name__
        return info

    def close(self) -> None:
        """Nothing to release: MPI ends with the process."""


def _options_text(options: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items()) or "its defaults"
