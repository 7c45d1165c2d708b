"""Fault injection for the fault-tolerance tests, driven by the DISTTRAIN_FAULT environment variable.

DISTTRAIN_FAULT is a comma-separated list of `point:rank:step[:argument]`, e.g. `forward:1:3` (raise in
the forward pass on rank 1 at step 3), `sleep:0:2:30` (sleep 30 s), `nan:1:4` (make the loss NaN),
`kill:1:5` (SIGKILL this process mid-step), `checkpoint:0:4:kill` (SIGKILL instead of raising at that
point: here, while writing a checkpoint). `step` may be `*` for any step. Points: data, forward,
backward, checkpoint, sleep, nan, kill. Unset (the normal case), every check is one attribute test.
"""

from __future__ import annotations

import os
import signal
import time


class InjectedFault(RuntimeError):
    """Raised on purpose by a DISTTRAIN_FAULT entry."""


class Faults:
    """The parsed DISTTRAIN_FAULT entries for this rank; `hit(point, step)` acts on a matching one."""

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("DISTTRAIN_FAULT", "") if spec is None else spec
        self.entries = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            fields = item.split(":")
            if len(fields) < 3:
                raise ValueError(f"DISTTRAIN_FAULT entry {item!r}: expected point:rank:step[:argument]")
            point, fault_rank, step = fields[0], int(fields[1]), fields[2]
            if fault_rank == rank:
                self.entries.append((point, None if step == "*" else int(step), fields[3] if len(fields) > 3 else None))
        self.active = bool(self.entries)

    def hit(self, point: str, step) -> bool:
        """Act on an entry for (point, step): raise, sleep, kill; returns True for 'nan' entries."""
        for entry_point, entry_step, argument in self.entries:
            if entry_point != point or (entry_step is not None and entry_step != step):
                continue
            if point == "sleep":
                time.sleep(float(argument or 3600))
            elif point == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif point == "nan":
                return True
            else:
                if argument == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise InjectedFault(f"injected fault in {point} at step {step} (DISTTRAIN_FAULT)")
        return False
