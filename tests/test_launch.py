"""How disttrain starts: no MPI at import, a single process without mpiexec (even without mpi4py),
the N-singletons launch mistake refused with the command to use, and rank-aware printing."""

import os
import sys

import pytest

import launch

PROBE = ("from disttrain.distributed import init; comm = init(); "
         "print(type(comm).__name__, comm.rank, comm.size)")


def _python(code, **env):
    return launch.run([sys.executable, "-c", code], check=False, timeout=60, **env)


def test_importing_disttrain_does_not_start_mpi():
    proc = _python("import sys, disttrain, disttrain.distributed, disttrain.trainer, disttrain.cli, "
                   "disttrain.checkpoint; print('mpi4py.MPI' in sys.modules)")
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_plain_python_is_a_world_of_one():
    proc = _python(PROBE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[1:] == ["0", "1"]


def test_without_mpi4py_the_single_process_communicator_is_used():
    proc = _python("import sys; sys.modules['mpi4py'] = None; " + PROBE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["SingleProcessComm", "0", "1"]


@pytest.mark.parametrize("variable", ["SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_n_singletons_from_a_mismatched_launcher_are_refused_with_the_command_to_use(variable):
    proc = _python(PROBE, **{variable: "4"})
    assert proc.returncode != 0
    assert "LaunchError" in proc.stderr and f"{variable}=4" in proc.stderr
    assert "srun --mpi=pmi2" in proc.stderr and "mpiexec -n 4" in proc.stderr


def test_the_cli_reports_the_launch_mistake_as_one_clean_error(tmp_path):
    proc = launch.disttrain("train", os.path.join(launch.REPO, "examples", "digits_mlp.toml"),
                            "--run-dir", tmp_path, check=False, SLURM_NTASKS="2")
    assert proc.returncode == 1
    assert proc.stderr.count("disttrain: error:") == 1 and "srun --mpi=pmi2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rank_0_prints_alone_and_errors_carry_their_rank():
    code = ("from disttrain.distributed import init; comm = init(); comm.print('only once'); "
            "comm.print(f'from {comm.rank}', all_ranks=True); comm.error('trouble')")
    proc = launch.mpirun(3, ["-c", code], timeout=60)
    assert proc.stdout.count("only once") == 1
    for rank in range(3):
        assert f"[rank {rank}] from {rank}" in proc.stdout
        assert f"[rank {rank}] trouble" in proc.stderr


def test_an_uncaught_exception_on_one_rank_ends_the_job_with_its_traceback():
    code = ("import time; from disttrain.distributed import init; comm = init(); import numpy as np\n"
            "if comm.rank == 1: raise RuntimeError('boom on one rank')\n"
            "comm.allreduce(np.zeros(1, np.float32))")
    proc = launch.mpirun(2, ["-c", code], check=False, timeout=60)
    assert proc.returncode != 0
    assert "[rank 1] RuntimeError: boom on one rank" in proc.stderr
    assert "aborting all 2 ranks because rank 1 failed" in proc.stderr
