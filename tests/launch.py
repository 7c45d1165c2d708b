"""Run programs under the venv's mpiexec with a timeout, for tests that compare N ranks with 1."""

from __future__ import annotations

import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)
MPIEXEC = os.path.join(BIN, "mpiexec")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(**extra) -> dict:
    """The environment for a child: the venv's bin first on PATH, a hydra timeout, one BLAS thread."""
    result = dict(os.environ)
    result["PATH"] = BIN + os.pathsep + result.get("PATH", "")
    result.setdefault("MPIEXEC_TIMEOUT", "300")
    result.setdefault("OMP_NUM_THREADS", "1")
    result.setdefault("OPENBLAS_NUM_THREADS", "1")
    for key in ("PMI_SIZE", "PMI_RANK", "PMI_FD", "PMI_PORT", "PMI_ID", "OMPI_COMM_WORLD_SIZE"):
        result.pop(key, None)  # a child must not think it belongs to the test runner's own MPI job
    result.update({key: str(value) for key, value in extra.items()})
    return result


def run(argv, timeout: float = 300, check: bool = True, cwd=None, **extra_env) -> subprocess.CompletedProcess:
    """Run argv (a list) with env(**extra_env); fail the test with its output on error or timeout."""
    try:
        proc = subprocess.run(argv, env=env(**extra_env), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, argv))}\n"
                             f"stdout:\n{error.stdout}\nstderr:\n{error.stderr}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}: {' '.join(map(str, argv))}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def mpirun(n: int, argv, timeout: float = 300, check: bool = True, cwd=None,
           **extra_env) -> subprocess.CompletedProcess:
    """`mpiexec -n n python argv...` (argv starting with a script or '-m', 'module')."""
    return run([MPIEXEC, "-n", str(n), sys.executable, *argv], timeout=timeout, check=check, cwd=cwd, **extra_env)


def disttrain(*args, ranks: int = 0, timeout: float = 300, check: bool = True, cwd=None, **extra_env):
    """The `disttrain` CLI: plain (ranks=0) or under `mpiexec -n ranks`."""
    argv = ["-m", "disttrain", *map(str, args)]
    if ranks:
        return mpirun(ranks, argv, timeout=timeout, check=check, cwd=cwd, **extra_env)
    return run([sys.executable, *argv], timeout=timeout, check=check, cwd=cwd, **extra_env)
