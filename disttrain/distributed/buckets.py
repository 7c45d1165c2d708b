"""Gradient buckets: which buckets of the flat gradient buffer backward has completed, and combining
each across ranks — in the background as soon as it is complete (overlap), or all at sync time.

Backward produces gradients from the last layer to the first, and parameters lie in the flat buffer
in forward order, so buckets are combined from the last to the first: every rank launches them in
that one order (MPI matches collectives by order), whatever order its own gradients arrive in. A
bucket is complete when every parameter overlapping it has had its gradient for this step; a
parameter this rank did not use holds its bucket (and the ones after it) until sync time, when it is
zero-filled. The same reduction runs either way, only earlier: overlap on and off give the same bits.
"""

from __future__ import annotations

from .background import BackgroundThread


class LateGradientError(RuntimeError):
    """A parameter received a gradient after its bucket had been sent to the other ranks."""


class GradientBuckets:
    """Tracks bucket completion over one step and runs `reduce(bucket_index)` for each bucket.

    `flat` is the FlatParameters whose slots report to `param_ready`; `reduce(b)` is COLLECTIVE over
    the communicator it was built with (a dup of the world's when `background` is True: it then runs
    on a BackgroundThread). `arm()` starts a step whose backward may launch buckets; `finish()`
    launches whatever is left and waits for all of them. `on_first_launch()` is called when a step's
    first bucket is launched (DataParallel queues its end-of-backward completion there).
    """

    def __init__(self, flat, reduce, background: bool, on_first_launch=None):
        layout = flat.layout
        self.flat, self.reduce, self.on_first_launch = flat, reduce, on_first_launch
        self.params_in = [[index for index, _ in layout.indexed_segments(lo, hi)] for lo, hi in layout.buckets]
        self.buckets_of = [[] for _ in flat.params]
        for bucket, indices in enumerate(self.params_in):
            for index in indices:
                self.buckets_of[index].append(bucket)
        self.order = list(reversed(range(len(layout.buckets))))
        self.thread = BackgroundThread() if background else None
        self.armed = False
        self.sealed = False  # set while a step's buckets are combined but not yet consumed
        self._reset()
        for slot in flat.slots:
            slot.listener = self.param_ready

    def _reset(self) -> None:
        self.ready = [False] * len(self.flat.params)
        self.missing = [len(indices) for indices in self.params_in]
        self.launched, self.jobs = 0, []

    @property
    def in_flight(self) -> bool:
        """True while some bucket of this step has been launched and not yet finished."""
        return self.launched > 0

    def arm(self) -> None:
        """Let the coming backward launch buckets as they complete (a no-op while buckets are in flight,
        or without a background thread)."""
        if self.thread is not None and not self.in_flight:
            self._reset()
            self.armed = True

    def param_ready(self, index: int) -> None:
        """Backward has finished parameter `index`'s gradient (its FlatGradSlot's listener)."""
        if self.sealed:
            raise LateGradientError(
                f"parameter '{self.flat.names[index]}' received a gradient after this step's gradients were "
                f"combined across ranks (at the end of the previous backward): accumulate micro-batches inside "
                f"DataParallel.no_sync() and let only the last backward combine, or turn overlap off")
        if not self.armed:
            return
        if self.ready[index]:
            if any(self._launched(bucket) for bucket in self.buckets_of[index]):
                raise LateGradientError(
                    f"parameter '{self.flat.names[index]}' received a gradient after its bucket was sent to the "
                    f"other ranks: call backward once per step (accumulate micro-batches inside "
                    f"DataParallel.no_sync()), or turn overlap off")
            return
        self.ready[index] = True
        for bucket in self.buckets_of[index]:
            self.missing[bucket] -= 1
        while self.launched < len(self.order) and self.missing[self.order[self.launched]] == 0:
            bucket = self.order[self.launched]
            if self.launched == 0 and self.on_first_launch is not None:
                self.on_first_launch()
            self.launched += 1
            self.jobs.append(self.thread.submit(lambda b=bucket: self.reduce(b), name=f"bucket {bucket}"))

    def _launched(self, bucket: int) -> bool:
        return bucket in self.order[:self.launched]

    def finish(self) -> None:
        """COLLECTIVE (through the buckets' communicator). Zero the gradient of every parameter that had
        none, combine every bucket not launched yet (in launch order), and wait for all of them."""
        self.flat.fill_missing_grads()
        remaining = self.order[self.launched:]
        if self.thread is None:
            for bucket in remaining:
                self.reduce(bucket)
        else:
            self.jobs += [self.thread.submit(lambda b=bucket: self.reduce(b), name=f"bucket {bucket}")
                          for bucket in remaining]
            for job in self.jobs:
                job.wait()
        self.armed = False
        self._reset()
