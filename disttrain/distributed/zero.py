"""ShardedOptimizer: ZeRO stage 1. Any Optimizer runs, unchanged, over the chunks of the flat
parameter buffer this rank owns; the full parameters are then shared again with an allgather.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..optim import Optimizer, scale_grads, squared_norm
from ..tensor import Gradient, Tensor
from .comm import Communicator
from .parallel import DEFAULT_BUCKET_MB, DataParallel


class ShardedOptimizer:
    """`ShardedOptimizer(optim.Adam, params, comm, lr=..., ...)`: ZeRO-1 around any Optimizer class.

    `params` are a DataParallel's parameters (its flat buffers and strategy are used) or plain
    parameters (a DataParallel is made for them: COLLECTIVE, and rank 0's values are broadcast).
    With `shard=True` rank r keeps optimizer state only for the chunks it owns (state bytes per rank =
    total / size); with `shard=False` every rank keeps full state and updates everything after an
    allreduce. The wrapped optimizer sees one Tensor per owned flat range: it does not know it is
    sharded. A parameter without a gradient on a rank takes part as zeros (it is still updated, as
    every element of the flat buffer is). `step()`, `reset_grad()` and `clip_grad_norm()` are COLLECTIVE.
    """

    def __init__(self, optimizer_class, params, comm: Communicator, *, shard: bool = True,
                 strategy: str | None = None, bucket_mb: float = DEFAULT_BUCKET_MB, **hyperparameters):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(f"optimizer_class must be a subclass of disttrain.optim.Optimizer, got {optimizer_class!r}")
        params = list(params)
        if not params:
            raise ValueError("ShardedOptimizer got an empty parameter list")
        owner = params[0]._flat.data_parallel if getattr(params[0], "_flat", None) is not None else None
        if owner is None or [id(p) for p in owner.flat.params] != [id(p) for p in params]:
            owner = DataParallel(params, comm, strategy=strategy or ("reduce_scatter" if shard else "allreduce"),
                                 bucket_mb=bucket_mb)
        elif strategy is not None and strategy != owner.strategy and owner.strategy != "auto":
            raise ValueError(f"strategy {strategy!r} differs from the DataParallel's {owner.strategy!r}")
        if owner.strategy == "auto":  # the DataParallel left it to us: the cheapest that works
            owner.strategy = strategy or ("reduce_scatter" if shard else "allreduce")
        if not shard and owner.strategy != "allreduce":
            raise ValueError("shard=False needs the 'allreduce' strategy (every rank updates everything)")
        self.ddp, self.comm, self.shard = owner, comm, shard
        self.params = params
        flat = owner.flat
        ranges = owner.owned_ranges if shard else [(0, flat.layout.padded_total)]
        self.ranges = ranges
        self._views = [flat.flat_params[lo:hi] for lo, hi in ranges]
        self.shard_params = [Tensor.wrap(view, requires_grad=True) for view in self._views]
        self.optimizer = optimizer_class(self.shard_params, **hyperparameters)
        self.last_update_seconds = self.last_gather_seconds = 0.0

    # --- what schedulers and trainers read
    @property
    def lr(self) -> float:
        return self.optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.lr = value

    @property
    def state(self) -> list:
        return self.optimizer.state

    def state_bytes(self) -> int:
        """Bytes of optimizer-state arrays held by this rank."""
        return self.optimizer.state_bytes()

    # --- the step
    def sync(self) -> None:
        """COLLECTIVE. Combine gradients now (step() does it if this was not called)."""
        if not self.ddp.synced:
            self.ddp.sync_gradients()

    def _grads(self) -> list:
        return self.ddp.owned_grads() if self.shard else [self.ddp.flat.flat_grads]

    def local_grad_sumsq(self) -> float:
        """Sum of squares (float64) of the combined gradient over the ranges this rank updates."""
        self.sync()
        return squared_norm(self._grads())

    def first_nonfinite_index(self) -> int | None:
        """Flat index of the first NaN/inf in the combined gradient this rank updates (None: all finite)."""
        for (lo, _), grad in zip(self.ranges, self._grads()):
            bad = np.flatnonzero(~np.isfinite(grad))
            if bad.size:
                return lo + int(bad[0])
        return None

    def clip_grad_norm(self, max_norm: float) -> float:
        """COLLECTIVE. Scale the combined gradient so its global L2 norm is <= max_norm; return the norm.

        The norm is the square root of the sum over ranks of each rank's float64 sum of squares of its
        own chunks (one scalar allreduce), equal to the single-process norm up to rounding.
        """
        total = np.array([self.local_grad_sumsq()])
        if self.shard:
            self.comm.allreduce(total, "sum")
        norm = math.sqrt(total[0])
        scale_grads(self._grads(), norm, float(max_norm))
        return norm

    def step(self) -> None:
        """COLLECTIVE. Combine gradients (unless done), update the owned chunks, allgather the parameters."""
        self.sync()
        for tensor, grad in zip(self.shard_params, self._grads()):
            tensor.grad = grad.view(Gradient)  # reads like a Tensor for a user optimizer (grad.data)
        started = time.perf_counter()
        frozen = self._freeze_absent()
        self.optimizer.step()
        self._keep_views()
        self._thaw(frozen)
        updated = time.perf_counter()
        if self.shard and self.comm.size > 1:
            self.ddp.gather_parameters()
        self.last_update_seconds, self.last_gather_seconds = updated - started, time.perf_counter() - updated
        self.ddp.synced = False

    def _freeze_absent(self) -> list:
        """(values view, saved values, state, offset, saved state) for every piece of this rank's
        ranges that belongs to a parameter with no gradient on any rank: the update must leave those
        as they were (a single process's optimizer skips a parameter whose grad is None; the flat
        update would move it through momentum and weight decay)."""
        frozen = []
        for index in self.ddp.absent:
            _, offset, shape = self.ddp.layout.entries[index]
            end = offset + int(np.prod(shape))
            for (lo, hi), view, state in zip(self.ranges, self._views, self.optimizer.state):
                a, b = max(lo, offset), min(hi, end)
                if a < b:
                    saved = {key: value[a - lo:b - lo].copy() for key, value in state.items()
                             if isinstance(value, np.ndarray) and value.shape == view.shape}
                    frozen.append((view[a - lo:b - lo], view[a - lo:b - lo].copy(), state, a - lo, saved))
        return frozen

    @staticmethod
    def _thaw(frozen: list) -> None:
        """Undo the update on what _freeze_absent saved; state created by this step starts at zero there."""
        for values, saved_values, state, start, saved in frozen:
            values[:] = saved_values
            for key, value in state.items():
                if isinstance(value, np.ndarray) and value.ndim == 1 and len(value) >= start + len(values):
                    piece = value[start:start + len(values)]
                    piece[:] = saved[key] if key in saved else 0

    def _keep_views(self) -> None:
        """A wrapped optimizer that replaced `p.data` (p.data = p.data - ...) instead of updating it in
        place: copy the result into the flat buffer and make the view its data again."""
        for tensor, view in zip(self.shard_params, self._views):
            if tensor.data is not view:
                np.copyto(view, tensor.data, casting="same_kind")
                tensor.data = view

    def reset_grad(self) -> None:
        """Clear every parameter's gradient (and the wrapped optimizer's views)."""
        for param in self.params:
            param.grad = None
        self.optimizer.reset_grad()
        self.ddp.synced = False

    zero_grad = reset_grad

    # --- state
    def partition(self) -> dict:
        """The layout this rank's state refers to: world size, rank, owned flat ranges, parameters."""
        layout = self.ddp.layout
        return {"world_size": self.comm.size, "rank": self.comm.rank, "shard": self.shard,
                "ranges": [list(r) for r in self.ranges], "padded_total": layout.padded_total,
                "entries": [[name, offset, list(shape)] for name, offset, shape in layout.entries]}

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state plus the partition it refers to."""
        return {"partition": self.partition(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict() written with the same world size and model (see checkpoint for resharding)."""
        mine, theirs = self.partition(), state_dict["partition"]
        for key in ("world_size", "rank", "ranges", "entries", "shard"):
            if mine[key] != theirs[key]:
                raise ValueError(f"optimizer state was written for a different partition ({key}: "
                                 f"{theirs[key]!r}, here {mine[key]!r}); load it through disttrain.checkpoint to reshard")
        self.optimizer.load_state_dict(state_dict["optimizer"])

    def consolidate_state_dict(self) -> dict | None:
        """COLLECTIVE. The full optimizer state on rank 0 as {state key: {param name: array}} plus
        scalars under "scalars"; None on other ranks."""
        layout = self.ddp.layout
        keys = sorted({key for state in self.optimizer.state for key, value in state.items()
                       if isinstance(value, np.ndarray)})
        full = {}
        for key in keys:
            buffer = np.zeros(layout.padded_total, np.float32)
            for (lo, hi), state in zip(self.ranges, self.optimizer.state):
                buffer[lo:hi] = state[key]
            if self.shard:
                for lo, hi in layout.buckets:
                    self.comm.allgather(buffer[lo:hi])
            full[key] = {name: buffer[offset:offset + int(np.prod(shape))].reshape(shape).copy()
                         for name, offset, shape in layout.entries}
        if self.comm.rank != 0:
            return None
        scalars = {key: value for key, value in self.optimizer.state[0].items()
                   if not isinstance(value, np.ndarray)} if self.optimizer.state else {}
        return {"state": full, "scalars": scalars, "hyperparameters": self.optimizer.hyperparameters()}
