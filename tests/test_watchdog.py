"""The watchdog's parts: the adaptive step limit, the record of which collective each thread waits in,
the signal wakeup pipe, the terminal check of the progress display, and (under mpiexec) heartbeats.

What the watchdog does to whole jobs under each launcher is pinned in tests/test_launcher_faults.py
(mpiexec), tests/test_slurm.py (srun) and tests/test_openmpi.py (mpirun).
"""

import io
import os
import signal
import threading
import time

import numpy as np
import pytest

from disttrain.distributed.comm import SingleProcessComm, waiting_collectives
from disttrain.distributed.watchdog import StepLimit
from disttrain.progress import Progress, writes_to_terminal
from disttrain.training import signals


# ------------------------------------------------------------------------------------ step limit
def test_auto_limit_is_600_s_until_five_steps_are_timed():
    limit = StepLimit("auto")
    assert limit.seconds(1) == 600
    for _ in range(4):
        limit.record(0.01)
    assert limit.seconds(5) == 600
    assert "before 5 steps were timed" in limit.describe()


def test_auto_limit_adapts_to_20x_the_median_step_but_never_below_60_s():
    fast, slow = StepLimit("auto"), StepLimit("auto")
    for seconds in (0.01, 0.02, 0.05, 0.03, 0.04):
        fast.record(seconds)
    for seconds in (5.0, 4.0, 100.0, 6.0, 5.5):  # one outlier: the median ignores it
        slow.record(seconds)
    assert fast.seconds(6) == 60
    assert slow.seconds(6) == pytest.approx(20 * 5.5)
    assert "20x the median step of 5.5 s" in slow.describe()


def test_auto_limit_of_evaluation_and_checkpoint_is_at_least_600_s():
    limit = StepLimit("auto")
    for _ in range(5):
        limit.record(0.01)
    assert limit.seconds("5 (evaluation)") == 600
    for _ in range(10):
        limit.record(40.0)
    assert limit.seconds("15 (checkpoint)") == 800


@pytest.mark.parametrize("setting, expected", [(30.0, 30.0), (600, 600.0), (0, None), (0.0, None)])
def test_an_explicit_limit_wins_over_the_measured_steps_and_zero_means_none(setting, expected):
    limit = StepLimit(setting)
    for _ in range(10):
        limit.record(100.0)
    assert limit.seconds(11) == expected
    assert limit.seconds("11 (checkpoint)") == expected


# ----------------------------------------------------------------------- collectives being waited in
def test_a_collective_on_another_thread_is_listed_with_its_thread_until_it_ends():
    comm = SingleProcessComm()
    entered, release = threading.Event(), threading.Event()

    def gradient_thread():
        with comm._inside("reduce_scatter"):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=gradient_thread, name="disttrain-comm")
    thread.start()
    try:
        assert entered.wait(10)
        with comm._inside("gradient buckets"):
            with comm._inside("allreduce"):  # nested: the outermost one is what the rank waits in
                time.sleep(0.05)
                listed = waiting_collectives()
    finally:
        release.set()
        thread.join(10)
    assert [(name, thread_name) for name, _, thread_name in listed] == \
        [("reduce_scatter", "disttrain-comm"), ("gradient buckets", "MainThread")]
    assert listed[0][1] >= listed[1][1] > 0.04
    assert waiting_collectives() == []


# ---------------------------------------------------------------------------- the wakeup pipe
def test_signals_reach_the_wakeup_pipe_and_the_first_stop_signal_is_pending():
    handlers = signals.catch_stop_signals()
    try:
        signals.arrivals()  # drop anything from before
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handlers run at the next bytecode boundary
        names = [sig.name for sig, _ in signals.arrivals()]
        assert names == ["SIGUSR1", "SIGTERM"]
        assert signals.pending() == signal.SIGUSR1
        assert signals.arrivals() == []
    finally:
        signals.forget()
        signals.restore(handlers)


def test_a_second_interrupt_ends_the_process_through_the_given_abort(monkeypatch):
    ended = []
    handlers = signals.catch_stop_signals(abort=ended.append)
    monkeypatch.setattr(signals, "_ending", threading.Lock())
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert signals.pending() == signal.SIGINT and ended == []  # the first only asks for a checkpoint
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert ended == [130]
    finally:
        signals.forget()
        signals.restore(handlers)
        monkeypatch.setattr(signals, "_abort", signals._end_now)


# -------------------------------------------------------------------------- terminal or log
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_auto_progress_draws_the_bar_on_a_real_terminal_only():
    assert writes_to_terminal(FakeTerminal(), environ={})
    assert not writes_to_terminal(io.StringIO(), environ={})
    # Open MPI gives every rank a pseudo-terminal, even when mpirun writes to a file
    assert not writes_to_terminal(FakeTerminal(), environ={"OMPI_COMM_WORLD_SIZE": "2"})


def test_lines_mode_writes_no_carriage_return_or_escape_code():
    stream = io.StringIO()
    progress = Progress(10, True, "lines", stream=stream)
    for step in range(1, 11):
        progress.step(step, 0, 0.5, 100.0, 0.01)
    assert "\r" not in stream.getvalue() and "\033" not in stream.getvalue()
    assert stream.getvalue().count("\n") == 10


# ------------------------------------------------------------------------------- heartbeats
@pytest.mark.mpi(min_size=2)
def test_heartbeats_carry_each_rank_state_to_rank_0_and_rank_0_state_to_every_rank():
    from disttrain.distributed import init
    from disttrain.distributed.watchdog import Watchdog

    comm = init()
    if not comm.threads_ok:
        pytest.skip("this MPI library gives no MPI_THREAD_MULTIPLE: no heartbeats")
    watchdog = Watchdog(comm, "auto", poll=0.05)
    try:
        watchdog.step_started(7)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(not watchdog.heartbeats.states[peer].startswith("step 7")
                                                  for peer in watchdog.heartbeats.peers):
            time.sleep(0.05)
        states = {peer: watchdog.heartbeats.states[peer] for peer in watchdog.heartbeats.peers}
        silent = watchdog.heartbeats.silent(5.0)
        comm.barrier()  # still in step 7: a peer that is slower to hear must still hear "step 7"
        watchdog.step_finished()
    finally:
        watchdog.close()
    assert sorted(states) == (list(range(1, comm.size)) if comm.rank == 0 else [0])
    # "step 7, computing" or, from a rank that got there first, "step 7, waiting in 'barrier' ..."
    assert all(state.startswith("step 7, ") for state in states.values()), states
    assert silent == []
    assert np.isfinite(comm.allreduce(np.ones(1)))[0]  # the world still works after close


def test_restoring_the_handlers_gives_back_a_wakeup_fd_set_before():
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    before = signal.set_wakeup_fd(write_end)
    try:
        handlers = signals.catch_stop_signals()
        ours = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(ours)
        assert ours not in (-1, write_end)
        signals.restore(handlers)
        assert signal.set_wakeup_fd(write_end) == write_end
    finally:
        signal.set_wakeup_fd(before)
        os.close(read_end)
        os.close(write_end)
