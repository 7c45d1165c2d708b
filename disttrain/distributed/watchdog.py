"""A watchdog thread that aborts the job when one step takes too long, instead of hanging forever.

MPI has no timeout on collectives: a rank stuck in Allreduce (a peer that died without aborting, a
network link that went down) waits forever. The trainer calls `step_started()` / `step_finished()`;
if a step runs past `timeout` seconds, this thread prints which step and which collective the rank was
waiting in, then aborts the communicator. mpi4py releases the GIL inside MPI calls, so the thread runs.
"""

from __future__ import annotations

import threading
import time


class Watchdog:
    """Aborts `comm` if a step lasts longer than `timeout` seconds (timeout 0 disables it)."""

    def __init__(self, comm, timeout: float, poll: float | None = None):
        self.comm, self.timeout = comm, float(timeout)
        self.poll = poll if poll is not None else min(1.0, max(self.timeout / 20, 0.05))
        self._step, self._since = None, 0.0
        self._stop = threading.Event()
        self._thread = None
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="disttrain-watchdog", daemon=True)
            self._thread.start()

    def step_started(self, step) -> None:
        """Start timing `step` (a number or a name like 'checkpoint')."""
        self._since = time.monotonic()
        self._step = step

    def step_finished(self) -> None:
        self._step = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            step = self._step
            if step is None:
                continue
            elapsed = time.monotonic() - self._since
            if elapsed <= self.timeout:
                continue
            collective = self.comm.current_collective
            where = (f"waiting in collective '{collective}' for "
                     f"{time.monotonic() - self.comm.collective_since:.1f} s") if collective else \
                "not inside a collective (local compute or I/O is this slow)"
            self.comm.error(f"watchdog: step {step} has run for {elapsed:.1f} s, over the limit of "
                            f"{self.timeout:g} s (training.watchdog_seconds); {where}. Aborting the job.")
            # the other ranks' watchdogs fire within a poll or two of this one: let them say where they
            # wait, so the report names both the slow rank and the collective the others are stuck in
            time.sleep(2 * self.poll + 0.5)
            self.comm.abort(1)
            return
