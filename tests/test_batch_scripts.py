"""scripts/run_local.sh, and scripts/pbs.qsub and scripts/lsf.bsub run the way their schedulers would run them.

PBS and LSF cannot be installed here, so each script is executed directly with the variables the scheduler
sets (a node/host file of `localhost` lines, the submit directory, the job id, the walltime) and the signal
it would send. That pins the scripts' own logic -- arguments, rank count, launch, checkpoint-before-the-limit,
requeue/resubmit -- not the schedulers' parsing of the #PBS/#BSUB lines.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
CONFIG = os.path.join(REPO, "examples", "digits_mlp.toml")
STANDIN = (f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(REPO, 'tests', 'slurm_standin.py'))}",
           os.path.join(REPO, "tests", "slurm_standin.toml"))
SHORT_RUN = "--set training.max_steps=5"
LONG_RUN = "--set training.max_steps=1000000 --set training.epochs=1000000"


@pytest.fixture
def job_env(tmp_path):
    """Environment of a scripted job: the venv, a hydra timeout, a marker to find leftover processes."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_", "SLURM_", "PBS_", "LSB_"))}
    env.update(DISTTRAIN_VENV=sys.prefix, MPIEXEC_TIMEOUT="120", OMP_NUM_THREADS="1",
               DISTTRAIN_TEST_MARKER=uuid.uuid4().hex)
    yield env
    leftovers = processes_with_marker(env["DISTTRAIN_TEST_MARKER"])
    assert not leftovers, f"processes left running by the script: {leftovers}"


def test_run_local_trains_on_two_ranks_and_writes_metrics_and_checkpoint(tmp_path, job_env):
    run_dir = tmp_path / "run"
    proc = run([os.path.join(SCRIPTS, "run_local.sh"), "2", CONFIG, "--set", f"training.run_dir={run_dir}",
                *SHORT_RUN.split()], job_env)
    assert proc.returncode == 0, proc.stdout
    assert "world 2" in proc.stdout, proc.stdout
    assert_metrics_and_checkpoint(run_dir)


def test_run_local_rejects_a_rank_count_that_is_not_a_positive_number(job_env):
    proc = run([os.path.join(SCRIPTS, "run_local.sh"), "two", CONFIG], job_env)
    assert proc.returncode == 2 and "usage: scripts/run_local.sh N CONFIG" in proc.stdout


def test_pbs_script_trains_with_one_rank_per_nodefile_line(tmp_path, job_env):
    run_dir = tmp_path / "run"
    env = pbs_env(tmp_path, job_env, CONFIG, f"--set training.run_dir={run_dir} {SHORT_RUN}", walltime=3600)
    proc = run(["bash", os.path.join(SCRIPTS, "pbs.qsub")], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "(2 ranks)" in proc.stdout and "world 2" in proc.stdout, proc.stdout
    assert_metrics_and_checkpoint(run_dir)


def test_pbs_script_checkpoints_before_the_walltime_and_submits_its_continuation(tmp_path, job_env):
    # the stand-in starts in a fraction of a second, so the script's own timer (walltime - warn seconds)
    # is sure to find the trainer running
    program, config = STANDIN
    run_dir = tmp_path / "run"
    env = pbs_env(tmp_path, job_env, config, f"--set training.run_dir={run_dir} {LONG_RUN}", walltime=4)
    env.update(DISTTRAIN_PROGRAM=program, DISTTRAIN_WARN_SECONDS="2")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "qsub").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/qsub.args\n')
    (fake_bin / "qsub").chmod(0o755)
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    proc = run(["bash", os.path.join(SCRIPTS, "pbs.qsub")], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "checkpoint written before the walltime" in proc.stdout, proc.stdout
    assert_metrics_and_checkpoint(run_dir)
    qsub_args = (tmp_path / "qsub.args").read_text().splitlines()
    assert "depend=afterany:1234.pbs-test" in qsub_args and qsub_args[-1] == os.path.join(SCRIPTS, "pbs.qsub")
    assert f"CONFIG={config},DISTTRAIN_ARGS=--set training.run_dir={run_dir} {LONG_RUN},DISTTRAIN_VENV={sys.prefix}" \
        in qsub_args, qsub_args


def test_lsf_script_trains_with_one_rank_per_slot(tmp_path, job_env):
    run_dir = tmp_path / "run"
    env = lsf_env(tmp_path, job_env, CONFIG, f"--set training.run_dir={run_dir} {SHORT_RUN}")
    proc = run(["bash", os.path.join(SCRIPTS, "lsf.bsub")], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "(2 ranks)" in proc.stdout and "world 2" in proc.stdout, proc.stdout
    assert_metrics_and_checkpoint(run_dir)


def test_lsf_warning_signal_checkpoints_and_exits_99_so_lsf_requeues(tmp_path, job_env):
    run_dir = tmp_path / "run"
    env = lsf_env(tmp_path, job_env, CONFIG, f"--set training.run_dir={run_dir} {LONG_RUN}")
    log = tmp_path / "job.out"
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", os.path.join(SCRIPTS, "lsf.bsub")], env=env, cwd=tmp_path, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3):
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGUSR1)  # `-wa USR1`: LSF signals the job's processes
        assert job.wait(timeout=60) == 99, log.read_text()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=10)
    assert "exiting 99 so LSF requeues" in log.read_text()
    assert_metrics_and_checkpoint(run_dir)


def pbs_env(tmp_path, env, config, args, walltime):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    return dict(env, PBS_O_WORKDIR=REPO, PBS_NODEFILE=str(nodefile), PBS_JOBID="1234.pbs-test",
                PBS_WALLTIME=str(walltime), CONFIG=config, DISTTRAIN_ARGS=args)


def lsf_env(tmp_path, env, config, args):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost\nlocalhost\n")
    return dict(env, LS_SUBCWD=REPO, LSB_DJOB_HOSTFILE=str(hostfile), LSB_DJOB_NUMPROC="2", LSB_JOBID="42",
                CONFIG=config, DISTTRAIN_ARGS=args)


def run(argv, env, cwd=None, timeout=120):
    return subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def assert_metrics_and_checkpoint(run_dir):
    metrics = run_dir / "metrics.jsonl"
    assert metrics.exists() and metrics.read_text().strip(), f"no metrics in {metrics}"
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file() and (run_dir / "checkpoints" / latest.read_text().strip()).is_dir()


def processes_with_marker(marker):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if marker.encode() not in handle.read():
                    continue
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid} {command}")
        except OSError:
            continue
    return found
