"""StepRecorder: what one rank writes down about each training step, for the report to analyse.

Per step: the time of each phase boundary (start, end of forward, end of backward, ...) and, for each
collective call, the time this rank entered and left it. Times come from `time.perf_counter`, which on
Linux is CLOCK_MONOTONIC: one clock for all processes of a machine, so the report can compare the
moments different ranks entered the same collective (that is how waiting for the slowest rank is
measured, without adding any barrier to the step). Recording costs two clock reads per boundary.
"""

from __future__ import annotations

import time

clock = time.perf_counter


class StepRecorder:
    """Phase boundaries and collective calls of each step on this rank.

    `phases` names the phases of a step in order; a system calls `start()`, then `mark()` at the end of
    each phase (len(phases) marks), then `end()`. Collective calls made through `call()` or a wrapped
    method are recorded as (label, enter, leave). `clear()` forgets the warm-up steps.
    """

    def __init__(self, phases):
        self.phases = list(phases)
        self.steps = []  # [{"t": [start, end of phase 0, ...], "coll": [[label, enter, leave], ...]}]
        self._times = None
        self._collectives = None

    def start(self) -> None:
        self._collectives = []
        self._times = [clock()]

    def mark(self) -> None:
        self._times.append(clock())

    def end(self) -> None:
        if len(self._times) != len(self.phases) + 1:
            raise RuntimeError(f"step recorded {len(self._times) - 1} phase ends, expected {len(self.phases)} "
                               f"({self.phases})")
        self.steps.append({"t": self._times, "coll": self._collectives})
        self._times = self._collectives = None

    def clear(self) -> None:
        self.steps = []

    def call(self, label: str, function, *args, **kwargs):
        """Call a collective and record when this rank entered and left it."""
        enter = clock()
        result = function(*args, **kwargs)
        leave = clock()
        if self._collectives is not None:
            self._collectives.append([label, enter, leave])
        return result

    def wrap(self, owner, method: str, label: str | None = None) -> None:
        """Replace `owner.method` on this instance only by a recording wrapper (the class is untouched)."""
        original = getattr(owner, method)
        label = label or method

        def recorded(*args, **kwargs):
            return self.call(label, original, *args, **kwargs)
        setattr(owner, method, recorded)

    def to_dict(self) -> dict:
        return {"phases": self.phases, "steps": self.steps,
                "clock": time.get_clock_info("perf_counter").implementation}
