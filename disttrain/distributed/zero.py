"""ShardedOptimizer: ZeRO stage 1. Any Optimizer runs, unchanged, over the pieces of the flat parameter
buffer this rank owns; the full parameters are then shared again with an allgather.

The wrapped optimizer is handed one Tensor per segment: the intersection of an owned flat range with
one parameter. It therefore keeps state per parameter piece (Adam's step count included) and skips a
piece whose parameter had no gradient on any rank, exactly as one process's optimizer skips a
parameter whose grad is None. Its state is saved and restored by parameter name and element range
(shard_state.py), so it loads onto any world size.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..optim import Optimizer, first_nonfinite, scale_grads, squared_norm
from ..tensor import Gradient, Tensor
from . import shard_state
from .comm import Communicator
from .parallel import DEFAULT_BUCKET_MB, DataParallel


class ShardedOptimizer:
    """`ShardedOptimizer(optim.Adam, params, comm, lr=..., ...)`: ZeRO-1 around any Optimizer class.

    `params` are a DataParallel's parameters (that DataParallel's flat buffers are used; pass it as
    `data_parallel=` or let it be found from the parameters) or plain parameters (a DataParallel is made
    for them: COLLECTIVE, and rank 0's values are broadcast). With `shard=True` rank r keeps optimizer
    state only for the pieces it owns (state bytes per rank ~ total / size); with `shard=False` every
    rank keeps full state and updates everything after an allreduce. `segments[i]` = (parameter index,
    name, start, stop, flat_lo, flat_hi) describes `shard_params[i]`, the Tensor the wrapped optimizer
    updates: elements [start, stop) of that parameter, at [flat_lo, flat_hi) of the flat buffer.
    `step()`, `reset_grad()`, `clip_grad_norm()` and `consolidate_state_dict()` are COLLECTIVE.
    With `lazy_gather`, step() returns while the parameters' allgather is still running: each layer
    of the next forward waits for its own (gathering.py); anything else must call
    `ddp.wait_for_parameters()` before reading parameters.
    """

    def __init__(self, optimizer_class, params, comm: Communicator, *, shard: bool = True,
                 strategy: str | None = None, bucket_mb: float = DEFAULT_BUCKET_MB,
                 data_parallel: DataParallel | None = None, lazy_gather: bool = False, **hyperparameters):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(f"optimizer_class must be a subclass of disttrain.optim.Optimizer, got {optimizer_class!r}")
        params = list(params)
        if not params:
            raise ValueError("ShardedOptimizer got an empty parameter list")
        owner = data_parallel or DataParallel.owning(params)
        if owner is None:
            owner = DataParallel(params, comm, strategy=strategy or ("reduce_scatter" if shard else "allreduce"),
                                 bucket_mb=bucket_mb)
        owner.adopt(shard, strategy)
        self.ddp, self.comm, self.shard, self.params = owner, comm, shard, params
        layout = owner.layout
        self.ranges = owner.owned_ranges if shard else [(0, layout.padded_total)]
        self.segments = [(index, name, start, stop, flat_lo, flat_hi)
                         for lo, hi in self.ranges
                         for index, (name, start, stop, flat_lo, flat_hi) in layout.indexed_segments(lo, hi)]
        flat_params = owner.flat.flat_params
        self._views = [flat_params[flat_lo:flat_hi] for *_, flat_lo, flat_hi in self.segments]
        if not self._views:  # this rank owns only padding: a zero-length piece keeps the optimizer valid
            self._views = [flat_params[layout.padded_total:]]
        self.shard_params = [Tensor.wrap(view, requires_grad=True) for view in self._views]
        self.optimizer = optimizer_class(self.shard_params, **hyperparameters)
        self.lazy_gather = bool(lazy_gather)
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
        """The wrapped optimizer's state: one dict per segment, in `segments` order."""
        return self.optimizer.state

    def state_bytes(self) -> int:
        """Bytes of optimizer-state arrays held by this rank."""
        return self.optimizer.state_bytes()

    # --- the step
    def sync(self) -> None:
        """COLLECTIVE. Combine gradients now (step() does it if this was not called)."""
        if not self.ddp.synced:
            self.ddp.sync_gradients()

    def range_grads(self) -> list:
        """Views of the combined gradient over each range this rank updates (valid after sync())."""
        return self.ddp.owned_grads() if self.shard else [self.ddp.flat.flat_grads]

    def segment_grads(self) -> list:
        """Views of the combined gradient of each segment, in `segments` order (valid after sync())."""
        by_range = dict(zip(self.ranges, self.range_grads()))
        grads = []
        for *_, flat_lo, flat_hi in self.segments:
            lo, hi = next(r for r in self.ranges if r[0] <= flat_lo and flat_hi <= r[1])
            grads.append(by_range[(lo, hi)][flat_lo - lo:flat_hi - lo])
        return grads

    def local_grad_sumsq(self) -> float:
        """Sum of squares (float64) of the combined gradient over the ranges this rank updates."""
        self.sync()
        return squared_norm(self.range_grads())

    def first_nonfinite_index(self) -> int | None:
        """Flat index of the first NaN/inf in the combined gradient this rank updates (None: all finite)."""
        for (lo, _), grad in zip(self.ranges, self.range_grads()):
            index = first_nonfinite(grad)
            if index is not None:
                return lo + index
        return None

    def clip_grad_norm(self, max_norm: float) -> float:
        """COLLECTIVE. Scale the combined gradient so its global L2 norm is <= max_norm; return the norm.

        The norm is the square root of the sum over ranks of each rank's float64 sum of squares of its
        own ranges (one scalar allreduce), equal to the single-process norm up to rounding.
        """
        total = np.array([self.local_grad_sumsq()])
        if self.shard:
            self.comm.allreduce(total, "sum")
        norm = math.sqrt(total[0])
        scale_grads(self.range_grads(), norm, float(max_norm))
        return norm

    def step(self) -> None:
        """COLLECTIVE. Combine gradients (unless done), update the owned pieces of every parameter that
        had a gradient on some rank, allgather the parameters."""
        self.ddp.wait_for_parameters()
        self.sync()
        absent = set(self.ddp.absent)
        for tensor, segment, grad in zip(self.shard_params, self.segments, self.segment_grads()):
            tensor.grad = None if segment[0] in absent else grad.view(Gradient)
        started = time.perf_counter()
        self.optimizer.step()
        self._keep_views()
        updated = time.perf_counter()
        if self.shard and self.comm.size > 1:
            self.ddp.gather_parameters(lazy=self.lazy_gather)
        self.last_update_seconds, self.last_gather_seconds = updated - started, time.perf_counter() - updated
        self.ddp.new_step()

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
        self.ddp.new_step()

    zero_grad = reset_grad

    # --- state
    def state_dict(self, copy: bool = True) -> dict:
        """This rank's optimizer state, keyed by parameter name and element range (see shard_state):
        {"class", "hyperparameters", "sharded", "world_size", "stateful", "segments": [{"param", "start",
        "stop", "arrays": {key: float32 array}, "scalars": {key: number}}]}; pieces without state are
        left out. Arrays are copies unless copy=False (views of the live state)."""
        return shard_state.state_dict(self, copy)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state saved by any world size: each of this rank's pieces is assembled from the saved
        segments of its parameter that overlap it (arrays may be loaded lazily, on first access).
        Raises ValueError naming the parameter when saved state covers a piece only in part."""
        shard_state.load_state_dict(self, state_dict)

    def consolidate_state_dict(self) -> dict | None:
        """COLLECTIVE. The full optimizer state on rank 0 as {"state": {key: {param name: array}},
        "scalars": the first parameter's scalars, "parameter_scalars": {name: scalars},
        "hyperparameters"}; None on other ranks. Parameters without state hold zeros."""
        return shard_state.consolidate(self)
