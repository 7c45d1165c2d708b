"""Stop signals: SIGTERM (batch systems' warning, `kill`), SIGUSR1 (SLURM's --signal, the signal Open
MPI's mpirun forwards) and SIGINT (Ctrl-C) ask a run to checkpoint and end at the next step boundary,
agreed by every rank. A second SIGINT ends the process at once, without a checkpoint (exit 130).

The handler only records the signal; the loop reads `pending()` into its per-step allreduce, so all
ranks stop after the same step even if the signal reached only some of them. Python runs a handler
only when the main thread is back in the interpreter: a rank blocked in a collective whose peer is
gone would never run it. So every delivery is also written to a wakeup pipe (signal.set_wakeup_fd, in
C, at once), which the watchdog thread reads with `arrivals()` to act on it while the main thread waits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a job ended by Ctrl-C

_pending = None  # the first stop signal received by this process and not yet acted on
_wakeup = None  # (read end, write end) of the pipe the C-level handler writes each signal number to
_other_wakeup = -1  # the wakeup fd that was set before ours
_ending = threading.Lock()  # taken by the one thread that ends the job on a second interrupt


def _end_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_abort = _end_now  # how a second Ctrl-C ends this process (the Trainer gives its communicator's abort)


def catch_stop_signals(abort=None) -> dict:
    """Record stop signals instead of dying, from now on; returns the handlers they replace (for
    `restore`). `abort(code)` ends the job on a second SIGINT (default: this process exits 130; pass
    the communicator's abort so that every rank ends). The CLI calls it first, so a signal that comes
    while the data loads still ends in a checkpoint at the first step boundary. Main thread only."""
    global _abort, _wakeup
    if abort is not None:
        _abort = abort
    if _wakeup is None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        _wakeup = (read_end, write_end)
    previous = {sig: signal.signal(sig, _record) for sig in STOP_SIGNALS}
    replaced = signal.set_wakeup_fd(_wakeup[1], warn_on_full_buffer=False)
    if replaced != _wakeup[1]:
        global _other_wakeup
        _other_wakeup = replaced  # someone else's (an asyncio loop's, say): given back by restore()
    return previous


def restore(handlers: dict) -> None:
    """Put back the handlers `catch_stop_signals` returned (and stop writing to the wakeup pipe once
    none of ours is left). Main thread only."""
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if not any(signal.getsignal(sig) is _record for sig in STOP_SIGNALS):
        signal.set_wakeup_fd(_other_wakeup)


def ignore_stop_signals() -> None:
    """Ignore stop signals from now on (the work is saved: one arriving during exit is moot)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)


def pending():
    """The stop signal received and not yet acted on (a signal.Signals), or None."""
    return _pending


def forget() -> None:
    """Mark the pending stop signal as acted on."""
    global _pending
    _pending = None


def arrivals() -> list:
    """[(signal.Signals, time.monotonic() when read)] of every signal delivered since the last call, read
    from the wakeup pipe: safe from any thread, and it does not wait for the main thread. For the
    watchdog thread (one reader)."""
    if _wakeup is None:
        return []
    try:
        data = os.read(_wakeup[0], 512)
    except (BlockingIOError, OSError):
        return []
    now = time.monotonic()
    return [(signal.Signals(number), now) for number in data if number in {int(s) for s in STOP_SIGNALS}]


def second_interrupt() -> None:
    """End the job at once: the user pressed Ctrl-C again while the first one was being handled."""
    if not _ending.acquire(blocking=False):
        return  # another thread is already ending it
    print("disttrain: second interrupt: ending now, without a checkpoint", file=sys.stderr, flush=True)
    _abort(INTERRUPT_EXIT_CODE)


def _record(signum, frame) -> None:
    global _pending
    signum = signal.Signals(signum)
    if signum == signal.SIGINT and _pending == signal.SIGINT:
        second_interrupt()
    if _pending is None or signum == signal.SIGINT:
        _pending = signum
