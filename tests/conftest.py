"""Test-wide set-up: a failure on one MPI rank aborts the whole job instead of hanging it."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/launch.py for every test module


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    under_mpi = item.config.getoption("--with-mpi", default=False) or item.config.getoption("--only-mpi", default=False)
    if report.failed and under_mpi:
        from mpi4py import MPI

        if MPI.COMM_WORLD.size > 1:
            # the other ranks are (or will be) waiting in a collective: end the job now, loudly
            sys.stderr.write(f"\n[rank {MPI.COMM_WORLD.rank}] test {item.nodeid} failed:\n{report.longreprtext}\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)
