"""disttrain under Open MPI's `mpirun` (Debian's Open MPI 4.1, mpi4py built against it): one training,
a failing, killed and stopped rank, the signals mpirun forwards, and the progress display.

These run where a Python with an Open MPI mpi4py exists: `make test-openmpi` builds one in
.venv-openmpi (scripts/openmpi_venv.sh) and runs this file with DISTTRAIN_OPENMPI_PYTHON pointing at it.
Elsewhere they are skipped, saying so. Every job has a timeout; time bounds are loose (a shared 2-core
machine): they tell "within seconds" from "until a timeout".
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import launcher_faults  # noqa: E402  (scripts/ is not a package)

PYTHON = os.environ.get("DISTTRAIN_OPENMPI_PYTHON") or launcher_faults.default_openmpi_python()
QUICK = 30

pytestmark = pytest.mark.skipif(launcher_faults.available("mpirun", PYTHON) is not None,
                                reason=f"{launcher_faults.available('mpirun', PYTHON)}")


def run_case(fault, tmp_path, ranks=2, **options):
    outcome = launcher_faults.run_case("mpirun", fault, ranks, timeout=60, workdir=str(tmp_path),
                                       openmpi_python=PYTHON, **options)
    report = f"{outcome.summary()}\nstdout:\n{outcome.stdout[-2000:]}\nstderr:\n{outcome.stderr[-3000:]}"
    assert outcome.seconds is not None and not outcome.leftovers, report
    return outcome, report


def mpirun_train(tmp_path, *settings, ranks=2, timeout=300, **env):
    argv = [launcher_faults.openmpi_mpirun(), "--allow-run-as-root", "--oversubscribe", "--timeout", str(timeout),
            "-n", str(ranks), PYTHON, "-m", "disttrain", "train", os.path.join(REPO, "examples", "digits_mlp.toml"),
            "--run-dir", str(tmp_path / "run"), *(word for setting in settings for word in ("--set", setting))]
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **env)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, env=environ, cwd=REPO)


def test_training_under_mpirun_reaches_the_accuracy_and_logs_no_terminal_codes(tmp_path):
    # Open MPI gives every rank a pseudo-terminal even though its output goes to a pipe here
    proc = mpirun_train(tmp_path, "training.epochs=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2 " in proc.stdout and "Open MPI" not in proc.stderr
    done = [line for line in proc.stdout.splitlines() if line.startswith("done:")]
    assert done and float(done[0].rsplit("test_accuracy ", 1)[1]) > 0.9, proc.stdout[-2000:]
    assert "step 10/" in proc.stdout  # plain progress lines...
    assert "\r" not in proc.stdout and "\033[" not in proc.stdout  # ...and no live bar


def test_a_rank_that_fails_ends_the_job_with_one_message(tmp_path):
    proc = mpirun_train(tmp_path, "training.epochs=5", DISTTRAIN_FAULT="forward:1:3")
    assert proc.returncode != 0
    assert "disttrain: error: step 3 failed on rank 1: InjectedFault" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("fault", ["kill-rank", "stop-rank", "stop-rank0"])
def test_a_dead_or_stopped_rank_ends_the_job_within_seconds(tmp_path, fault):
    outcome, report = run_case(fault, tmp_path, start_step=10)
    assert outcome.exit_code != 0 and outcome.seconds < QUICK, report
    if fault.startswith("stop"):
        silent = 0 if fault == "stop-rank0" else 1
        assert f"liveness: rank {silent} silent for " in outcome.stderr, report


def test_usr1_to_mpirun_is_forwarded_and_every_rank_checkpoints_and_exits_zero(tmp_path):
    outcome, report = run_case("USR1", tmp_path)
    assert outcome.exit_code == 0 and outcome.checkpoint_step is not None, report
    assert "received SIGUSR1: saved checkpoint" in outcome.stdout, report


def test_sigterm_to_mpirun_reaches_the_ranks_as_sigterm_and_a_quick_checkpoint_is_saved(tmp_path):
    # mpirun 4.1 answers SIGTERM (and Ctrl-C) by sending the ranks SIGTERM and, ~1 s later, SIGKILL, and
    # exits 1: only a checkpoint that takes less than that is written (this one does)
    outcome, report = run_case("TERM", tmp_path)
    assert outcome.exit_code != 0 and outcome.seconds < QUICK, report
    assert "received SIGTERM: saved checkpoint" in outcome.stdout and outcome.checkpoint_step is not None, report
    assert "Traceback" not in outcome.stderr, report
