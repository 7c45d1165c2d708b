"""A watchdog thread that ends a job which can no longer make progress, saying why, instead of hanging.

MPI has no timeout on collectives: a rank waiting in Allreduce for a peer that died without ending the
job (`srun` without --kill-on-bad-exit), was stopped (SIGSTOP), or lost its network link, waits
forever, and a stop signal cannot help: Python runs its handler only when the collective returns. The
trainer calls `step_started()` / `step_finished()`; every `poll` seconds this thread checks, in order:

1. a second Ctrl-C (read from the signal wakeup pipe, so it is seen while the main thread waits):
   end the job now, exit 130;
2. heartbeats (liveness.py): a peer silent for `silence` seconds (3 s once a stop signal is pending)
   while this rank waits in a collective: that peer is dead, stopped or unreachable;
3. without heartbeats: a stop signal pending while this rank has waited in one collective for longer
   than a grace (10 s, or 3 median steps);
4. the step's time limit: `limit` seconds, or "auto": 600 s for the first steps, then
   max(60 s, 20 x the median step) (evaluations and checkpoints: at least 600 s).
Each ends the job with one line naming the step, the collective this rank waits in and, where it
knows them, the ranks that are not in it; then it aborts the communicator (exit code 1).
"""

from __future__ import annotations

import collections
import statistics
import threading
import time

from .comm import waiting_collectives

FIRST_STEPS_LIMIT = 600.0  # "auto" before the step time is known, and the floor for evaluation/checkpoints
WARMUP_STEPS = 5  # steps timed before "auto" adapts (the first ones compile, fill caches, allocate)
AUTO_FLOOR, AUTO_FACTOR = 60.0, 20.0
SILENCE_SECONDS = 10.0
SILENCE_WHEN_STOPPING = 3.0  # a launcher that signals while a peer is silent is tearing the job down
SIGNAL_GRACE = 10.0
QUIET_SECONDS = 1.0  # a peer unheard for this long (4 heartbeats) is named with the one that went silent


class StepLimit:
    """The time limit of a step: `setting` seconds, 0 (none), or "auto": FIRST_STEPS_LIMIT until
    WARMUP_STEPS training steps were timed, then max(AUTO_FLOOR, AUTO_FACTOR x their median, over the
    last 101), and at least FIRST_STEPS_LIMIT for evaluations and checkpoints (steps given by name)."""

    def __init__(self, setting="auto"):
        self.auto = setting == "auto"
        self.fixed = None if self.auto else float(setting)
        self.durations = collections.deque(maxlen=101)

    def record(self, seconds: float) -> None:
        """A training step took `seconds`."""
        self.durations.append(seconds)

    def median(self) -> float | None:
        return statistics.median(self.durations) if self.durations else None

    def seconds(self, step) -> float | None:
        """The limit of `step` (an int: a training step; a str: an evaluation or checkpoint); None: none."""
        if not self.auto:
            return self.fixed or None
        if len(self.durations) < WARMUP_STEPS:
            return FIRST_STEPS_LIMIT
        adaptive = max(AUTO_FLOOR, AUTO_FACTOR * self.median())
        return adaptive if isinstance(step, int) else max(FIRST_STEPS_LIMIT, adaptive)

    def describe(self) -> str:
        """Where the limit comes from, for the watchdog's message."""
        if not self.auto:
            return "training.watchdog_seconds"
        if len(self.durations) < WARMUP_STEPS:
            return f"training.watchdog_seconds = auto, before {WARMUP_STEPS} steps were timed"
        return (f"training.watchdog_seconds = auto: {AUTO_FACTOR:g}x the median step of {self.median():.3g} s, "
                f"at least {AUTO_FLOOR:g} s")


class Watchdog:
    """Ends the job when this rank cannot make progress (see the module docstring).

    `limit`: seconds per step, "auto" (adaptive), or 0 (off: no step limit and no heartbeats; stop
    signals are still watched). `signals`: an object with `arrivals()`, `pending()` and
    `second_interrupt()` (disttrain.training.signals), or None. `silence`: seconds of heartbeat silence
    that end the job (0: no heartbeats). COLLECTIVE to construct when heartbeats are possible (an MPI
    world of several ranks that allows threads, and neither limit nor silence 0).
    """

    def __init__(self, comm, limit="auto", signals=None, silence: float = SILENCE_SECONDS, poll: float = 0.25):
        self.comm, self.signals, self.poll = comm, signals, poll
        self.silence = 0.0 if limit == 0 else float(silence)
        self.limit = StepLimit(limit)
        self._step, self._since = None, 0.0
        self._interrupts, self._stop_since, self._stop_name = 0, None, None
        self.heartbeats = None
        if self.silence > 0 and comm.size > 1 and comm.is_mpi and comm.threads_ok:
            from .liveness import Heartbeats

            self.heartbeats = Heartbeats(comm)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="disttrain-watchdog", daemon=True)
        self._thread.start()

    # --- called by the trainer (main thread)
    def step_started(self, step) -> None:
        """Start timing `step` (a number: a training step; or a name like '8 (checkpoint)')."""
        self._since = time.monotonic()
        self._step = step

    def step_finished(self) -> None:
        if isinstance(self._step, int):
            self.limit.record(time.monotonic() - self._since)
        self._step = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.heartbeats is not None and not self._thread.is_alive():
            self.heartbeats.close()

    # --- the thread
    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            self._read_signals()
            if self._interrupts >= 2:
                self.signals.second_interrupt()
                return
            state = self.state()
            if self.heartbeats is not None:
                self.heartbeats.beat(state)
            problem = self._silent_peers() or self._stuck_after_signal() or self._over_limit()
            if problem:
                message, delay = problem
                self.comm.error(message)
                time.sleep(delay)  # let the other ranks' lines out before the job ends
                self.comm.abort(1)
                return

    def _read_signals(self) -> None:
        if self.signals is None:
            return
        for signum, when in self.signals.arrivals():
            if signum.name == "SIGINT":
                self._interrupts += 1
            if self._stop_since is None:
                self._stop_since, self._stop_name = when, signum.name
        if self._stop_since is None and self.signals.pending() is not None:
            # arrived before this watchdog started
            self._stop_since, self._stop_name = time.monotonic(), self.signals.pending().name

    def state(self) -> str:
        """This rank's state in words: the step, and the collective it waits in or 'computing'."""
        waiting = waiting_collectives()
        if waiting:
            name, seconds, thread = waiting[0]
            where = f"waiting in '{name}' for {seconds:.1f} s" + ("" if thread == "MainThread" else f" ({thread})")
        else:
            where = "computing" if self._step is not None else "between steps"
        return f"step {self._step}, {where}" if self._step is not None else where

    def _waited(self) -> float:
        """Seconds this rank has been inside its oldest collective (0 if in none)."""
        waiting = waiting_collectives()
        return waiting[0][1] if waiting else 0.0

    def _silent_peers(self):
        if self.heartbeats is None or self._waited() < self.poll:
            return None
        limit = SILENCE_WHEN_STOPPING if self._stop_since is not None else self.silence
        if not self.heartbeats.silent(limit):
            return None
        # name every peer gone quiet, not only the first past the limit (a link down silences several)
        silent = self.heartbeats.silent(min(limit, QUIET_SECONDS))
        names = "; ".join(f"rank {peer} silent for {seconds:.1f} s (last: {self.heartbeats.last_state(peer)})"
                          for peer, seconds in silent)
        received = f" after {self._stop_name}" if self._stop_name else ""
        return (f"liveness: {names}: dead, stopped or unreachable. This rank: {self.state()}{received}; "
                f"no checkpoint can be agreed. Aborting the job.", 0.5)

    def _stuck_after_signal(self):
        if self.heartbeats is not None or self._stop_since is None:
            return None
        grace = max(SIGNAL_GRACE, 3 * (self.limit.median() or 0.0))
        waited = min(self._waited(), time.monotonic() - self._stop_since)
        if waited <= grace:
            return None
        return (f"received {self._stop_name}, but this rank has waited in a collective for {waited:.1f} s since "
                f"({self.state()}): a peer is gone or stuck, so no checkpoint can be agreed. Aborting the job.", 0.5)

    def _over_limit(self):
        step = self._step
        limit = self.limit.seconds(step) if step is not None else None
        elapsed = time.monotonic() - self._since
        if limit is None or step is None or elapsed <= limit:
            return None
        waiting = waiting_collectives()
        where = (f"waiting in collective '{waiting[0][0]}' for {waiting[0][1]:.1f} s" if waiting else
                 "not inside a collective (local compute or I/O is this slow)")
        others = self._ranks_not_waiting()
        # rank 0 knows every rank's state: let its line be the last word, the others wait a little longer
        delay = 2 * self.poll + 0.5 + (0 if self.comm.rank == 0 else 2.0)
        return (f"watchdog: step {step} has run for {elapsed:.1f} s, over the limit of {limit:g} s "
                f"({self.limit.describe()}); {where}.{others} Aborting the job.", delay)

    def _ranks_not_waiting(self) -> str:
        """' Not in a collective: rank R (its state); ...' from the heartbeats this rank has."""
        if self.heartbeats is None:
            return ""
        outside = [peer for peer in self.heartbeats.peers if "waiting in" not in self.heartbeats.states[peer]]
        if not outside:
            return ""
        return " Not in a collective: " + "; ".join(
            f"rank {peer} ({self.heartbeats.last_state(peer)})" for peer in outside) + "."
