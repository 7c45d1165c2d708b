"""Sharing the updated parameters again after a sharded update: one allgather per bucket, first bucket
first, and — when asked to be lazy — left running while the next forward starts: each layer waits
only for the buckets that hold its own parameters (a pre-forward hook), so the allgather of the later
layers hides behind the forward of the earlier ones.

Lazy gathering leaves parameters in flight after the optimizer step: anything that reads them outside
a forward (checkpoints, replica checks, a user's own code) calls `wait()` first. The Trainer does.
"""

from __future__ import annotations

import atexit

from ..nn import Module


class ParameterGather:
    """The allgathers of one DataParallel (`ddp`): `start(lazy)` launches them, `wait(buckets)` waits."""

    def __init__(self, ddp):
        self.ddp = ddp
        self.pending = {}  # bucket index -> Job of its allgather still in flight
        self.waits_at_exit = False
        self.hooked = isinstance(ddp.module, Module)
        if self.hooked:
            layout = ddp.layout
            index_of = {id(param): index for index, param in enumerate(ddp.flat.params)}
            for module in ddp.module.modules():
                own = [index_of[id(value)] for _, value in _own_parameters(module) if id(value) in index_of]
                buckets = sorted({b for b, (lo, hi) in enumerate(layout.buckets) for index in own
                                  if _overlaps(layout.entries[index], lo, hi)})
                if buckets:
                    module.register_pre_forward_hook(lambda _, wanted=tuple(buckets): self.wait(wanted))

    def start(self, lazy: bool) -> None:
        """COLLECTIVE over the DataParallel's bucket communicator. Allgather every bucket of the flat
        parameter buffer, first bucket first: in the background if the DataParallel has a background
        thread (then, unless `lazy`, wait for all before returning), else here and now."""
        ddp = self.ddp
        thread = ddp.buckets.thread
        for bucket, (lo, hi) in enumerate(ddp.layout.buckets):
            view = ddp.flat.flat_params[lo:hi]
            if thread is None:
                ddp.bucket_comm.allgather(view)
            else:
                self.pending[bucket] = thread.submit(lambda v=view: ddp.bucket_comm.allgather(v),
                                                     name=f"allgather {bucket}")
        if not lazy or not self.hooked:
            self.wait()
        elif not self.waits_at_exit:  # MPI must not finalize with an allgather in flight
            atexit.register(self.wait)
            self.waits_at_exit = True

    def wait(self, buckets=None) -> None:
        """Wait for the allgathers of `buckets` (default: all) still in flight."""
        for bucket in list(self.pending) if buckets is None else buckets:
            job = self.pending.pop(bucket, None)
            if job is not None:
                job.wait()


def _own_parameters(module: Module):
    """(name, Parameter) held by `module` itself, not by its submodules."""
    from ..nn import Parameter, _members

    return [(name, value) for name, value in _members(module) if isinstance(value, Parameter)]


def _overlaps(entry, lo: int, hi: int) -> bool:
    _, offset, shape = entry
    size = 1
    for n in shape:
        size *= n
    return offset < hi and lo < offset + size
