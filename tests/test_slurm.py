"""scripts/slurm.sbatch under a real single-node SLURM (Debian's packages, started by scripts/slurm_cluster.py).

Skipped only where SLURM cannot be installed or started (not root, or neither SLURM nor apt-get present).
The first run apt-installs SLURM (~11 s); then the daemons start in ~0.3 s and each job takes a few seconds.
Everything lives in a temp dir; the daemons are stopped, and checked gone, even when a test fails.
"""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import launcher_faults  # noqa: E402
import slurm_cluster  # noqa: E402  (scripts/ is not a package)

SBATCH = os.path.join(REPO, "scripts", "slurm.sbatch")
STANDIN = os.path.join(REPO, "tests", "slurm_standin.py")
# What the batch script trains: (program, config); a program of None is the script's default, the venv's
# `disttrain`. To check the scheduler plumbing without the trainer, swap in the stand-in with the same CLI:
# TRAIN = (f"{shlex.quote(sys.executable)} {shlex.quote(STANDIN)}", os.path.join(REPO, "tests", "slurm_standin.toml"))
TRAIN = (None, os.path.join(REPO, "examples", "digits_mlp.toml"))
# keys both the stand-in and `disttrain train` understand
SHORT_RUN = ["--set", "training.max_steps=5"]
LONG_RUN = ["--set", "training.max_steps=1000000", "--set", "training.epochs=1000000"]
FAILED_STATES = ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        slurm_cluster.ensure_installed(timeout=300)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:  # no package mirror reachable, say
        pytest.skip(f"SLURM cannot be installed here: {str(error).strip().splitlines()[-1][:300]}")
    instance = slurm_cluster.SlurmCluster().start(timeout=30)
    try:
        yield instance
    finally:
        instance.stop()
        leftovers = instance.leftover_processes()
        assert not leftovers, f"processes left running after stopping SLURM: {leftovers}"


def submit_training(cluster, tmp_path, extra_args, *sbatch_options, **env):
    """sbatch the script on TRAIN with 2 tasks; returns (job id, run dir, log path)."""
    program, config = TRAIN
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    if program:
        env["DISTTRAIN_PROGRAM"] = program
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(REPO, ".venv")):
        env["DISTTRAIN_VENV"] = sys.prefix  # the script's default is the submit dir's .venv
    args = [SBATCH, config, "--set", f"training.run_dir={run_dir}", *extra_args]
    job_id = cluster.submit(args, "-n", "2", f"--output={log}", *sbatch_options, cwd=REPO,
                            MPIEXEC_TIMEOUT=120, **env)
    return job_id, run_dir, log


def metrics_steps(run_dir):
    """The `step` of every complete line of RUN_DIR/metrics.jsonl so far ([] before it exists)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.endswith("\n")]
    return [record["step"] for record in records if "step" in record]


def assert_checkpoint_written(run_dir):
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file(), f"no {latest}"
    name = latest.read_text().strip()
    assert name.startswith("step-") and (run_dir / "checkpoints" / name).is_dir(), f"latest -> {name!r}"


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_sbatch_script_trains_to_completion_and_writes_metrics_and_checkpoint(cluster, tmp_path, launcher):
    job_id, run_dir, log = submit_training(cluster, tmp_path, SHORT_RUN, DISTTRAIN_LAUNCHER=launcher)
    job = cluster.wait(job_id, timeout=60)
    output = log.read_text() if log.exists() else "(no job output)"
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{output}"
    assert metrics_steps(run_dir), f"no steps in metrics.jsonl\n{output}"
    assert_checkpoint_written(run_dir)


def test_srun_pmi2_inside_the_allocation_gives_a_world_of_two(cluster, tmp_path):
    log = tmp_path / "srun.out"
    code = "from mpi4py import MPI; print('world', MPI.COMM_WORLD.size, 'rank', MPI.COMM_WORLD.rank)"
    wrapped = f"srun --mpi=pmi2 -n 2 {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    job = cluster.wait(cluster.submit(["--wrap", wrapped], "-n", "2", f"--output={log}"), timeout=60)
    output = log.read_text() if log.exists() else "(no job output)"
    assert job["JobState"] == "COMPLETED", f"{job}\n{output}"
    assert sorted(line for line in output.splitlines() if line.startswith("world")) == \
        ["world 2 rank 0", "world 2 rank 1"], output


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes(cluster, tmp_path):
    job_id, run_dir, log = submit_training(cluster, tmp_path, LONG_RUN)
    wait_until(lambda: len(metrics_steps(run_dir)) >= 3, 60, cluster, job_id, log)
    # what `--signal=B:USR1@120` does 120 s before the time limit, without waiting for one
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    wait_until(lambda: cluster.job(job_id).get("Restarts") == "1", 30, cluster, job_id, log)
    steps_before = metrics_steps(run_dir)

    def resumed_and_progressed():
        cluster.release_requeued(job_id)  # else SLURM holds the requeued job for ~2 minutes
        return len(metrics_steps(run_dir)) >= len(steps_before) + 3

    # the requeued run: let it make progress, then stop it for good (SIGTERM to the script: no requeue)
    wait_until(resumed_and_progressed, 60, cluster, job_id, log)
    cluster.run(["scancel", "--batch", "--signal=TERM", job_id])
    job = cluster.wait(job_id, timeout=60, release_requeued=False)
    output = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", \
        f"{job}\n{output}"
    assert "requeueing" in output and "(restart 1)" in output, output
    steps = metrics_steps(run_dir)
    assert steps == sorted(steps) and steps[-1] > steps_before[-1], \
        f"the requeued run did not continue from the checkpoint: steps {steps_before} then {steps}"
    assert_checkpoint_written(run_dir)
    assert int((run_dir / "checkpoints" / "latest").read_text().strip()[len("step-"):]) >= steps[-1]


# ------------------------------------------------------------- dead and stopped ranks under srun
@pytest.mark.parametrize("launcher, fault, within", [
    ("srun", "kill-rank", 25),  # srun alone never ends such a job: rank 0 hears no heartbeat for 10 s
    ("srun", "stop-rank", 25),
    ("srun-K", "kill-rank", 20),  # srun -K SIGTERMs rank 0, which waited; before: KillWait, 30 s
])
def test_a_dead_or_stopped_rank_ends_an_srun_job_within_seconds_and_is_named(cluster, tmp_path, launcher, fault,
                                                                             within):
    outcome = launcher_faults.run_case(launcher, fault, 2, timeout=90, workdir=str(tmp_path), cluster=cluster,
                                       start_step=10)
    report = f"{outcome.summary()}\nstdout:\n{outcome.stdout[-2000:]}\nstderr:\n{outcome.stderr[-3000:]}"
    assert outcome.seconds is not None and outcome.seconds < within, report
    assert outcome.exit_code != 0 and not outcome.leftovers, report
    assert "[rank 0] liveness: rank 1 silent for " in outcome.stderr, report
    if launcher == "srun-K":
        assert "after SIGTERM" in outcome.stderr, report


def test_usr1_to_srun_is_forwarded_to_every_rank_which_checkpoint_and_exit_zero(cluster, tmp_path):
    outcome = launcher_faults.run_case("srun", "USR1", 2, timeout=60, workdir=str(tmp_path), cluster=cluster)
    assert outcome.exit_code == 0 and outcome.checkpoint_step is not None, outcome.summary()
    assert "received SIGUSR1: saved checkpoint" in outcome.stdout


def wait_until(condition, timeout, cluster, job_id, log):
    """Poll condition(); fail with the job's state and output on timeout or once the job has failed."""
    deadline = time.monotonic() + timeout
    while not condition():
        job = cluster.job(job_id)
        if time.monotonic() > deadline or job.get("JobState") in FAILED_STATES:
            output = log.read_text() if log.exists() else "(no job output)"
            pytest.fail(f"not reached within {timeout}s; job {job}\n{output}")
        time.sleep(0.1)
