"""Process handling for the fault tests: start a tagged `disttrain` job, find its ranks, check for leftovers.

Every process of a job started here (mpiexec, hydra's proxy, the ranks) inherits DISTTRAIN_TEST_TAG in its
environment, so the ranks can be found - and stray processes detected - by reading /proc, without
relying on command lines (hydra's proxy does not carry the job's arguments).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts"))
import launch  # noqa: E402
from tagged_processes import TAG, tagged_processes  # noqa: E402,F401

def new_tag() -> str:
    return uuid.uuid4().hex


def rank_pids(tag: str) -> dict:
    """{rank: pid} of the MPI ranks of job `tag` (hydra gives each rank PMI_RANK)."""
    return {int(env["PMI_RANK"]): pid for pid, env in tagged_processes(tag).items() if "PMI_RANK" in env}


def assert_no_leftovers(tag: str, grace: float = 5.0) -> None:
    """Fail if any process of job `tag` is still alive `grace` seconds from now."""
    deadline = time.monotonic() + grace
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"processes left behind by the job: {sorted(left)}"


class Job:
    """`python ARGS` under `mpiexec -n ranks` (or plain for ranks=0), running in the background; ARGS
    are those of the `disttrain` CLI, or a script and its arguments when `script` is given.

    stdout/stderr go to files next to `log_prefix`; `finish()` waits with a timeout and returns
    (returncode, stdout, stderr, seconds since `mark()` or since the start).
    """

    def __init__(self, args, ranks: int, log_prefix: str, cwd=None, script=None, **extra_env):
        self.tag = new_tag()
        env = launch.env(**{TAG: self.tag, **extra_env})
        argv = [sys.executable, *([script] if script else ["-m", "disttrain"]), *map(str, args)]
        if ranks:
            argv = [launch.MPIEXEC, "-n", str(ranks), *argv]
        self.out_path, self.err_path = log_prefix + ".out", log_prefix + ".err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(argv, env=env, stdout=self._out, stderr=self._err, cwd=cwd or launch.REPO,
                                        start_new_session=True)

    def mark(self) -> None:
        """Start the clock that `finish()` reports (e.g. at the moment a fault is injected)."""
        self.started = time.monotonic()

    def finish(self, timeout: float = 120):
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"job did not end within {timeout} s\nstdout:\n{self.stdout()}\n"
                                 f"stderr:\n{self.stderr()}") from None
        seconds = time.monotonic() - self.started
        self._out.close()
        self._err.close()
        return code, self.stdout(), self.stderr(), seconds

    def stdout(self) -> str:
        with open(self.out_path) as handle:
            return handle.read()

    def stderr(self) -> str:
        with open(self.err_path) as handle:
            return handle.read()

    def stop(self) -> None:
        """SIGKILL everything of this job (clean-up after a failed test)."""
        for pid in tagged_processes(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
