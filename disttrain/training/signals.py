"""Stop signals: SIGTERM (batch systems' warning, `kill`) and SIGUSR1 (SLURM's --signal, Open MPI's
forwarded signal) ask a run to checkpoint and end at the next step boundary, agreed by every rank.

The handler only records the signal; the loop reads `pending()` into its per-step allreduce, so all
ranks stop after the same step even if the signal reached only some of them.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_pending = None  # the last stop signal received by this process and not yet acted on


def catch_stop_signals() -> dict:
    """Record SIGTERM/SIGUSR1 instead of dying, from now on; returns the handlers they replace (for
    `restore`). The CLI calls it first, so a signal that comes while the data loads still ends in a
    checkpoint at the first step boundary."""
    return {sig: signal.signal(sig, _record) for sig in STOP_SIGNALS}


def restore(handlers: dict) -> None:
    """Put back the handlers `catch_stop_signals` returned."""
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def ignore_stop_signals() -> None:
    """Ignore stop signals from now on (the work is saved: one arriving during exit is moot)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def pending():
    """The stop signal received and not yet acted on (a signal.Signals), or None."""
    return _pending


def forget() -> None:
    """Mark the pending stop signal as acted on."""
    global _pending
    _pending = None


def _record(signum, frame) -> None:
    global _pending
    _pending = signal.Signals(signum)
