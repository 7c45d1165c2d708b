#!/usr/bin/env python3
"""What each launcher does with each fault, measured: a dead or stopped rank, a signal to the launcher.

    python scripts/launcher_faults.py                        # every launcher x fault it can run here
    python scripts/launcher_faults.py --launcher srun-K --fault kill-rank --ranks 3
    python scripts/launcher_faults.py --help

A case starts `disttrain train` (a small synthetic run that never ends by itself, no periodic
checkpoints, rank 0 sleeping 50 ms a step so the others wait in a collective) under a launcher, waits
until step 3 is logged, injects the fault, and measures how long the launcher takes to exit, with which
exit code, whether a checkpoint was written, and whether any process of the job was left behind.

Launchers: `none` (one process), `mpiexec` (the venv's MPICH hydra), `srun` / `srun-K` (`srun --mpi=pmi2`,
without / with --kill-on-bad-exit, on a throw-away SLURM from scripts/slurm_cluster.py), `mpirun`
(Open MPI's, with a Python whose mpi4py is built against it: --openmpi-python, default .venv-openmpi).
Faults: `kill-rank` / `stop-rank` (SIGKILL / SIGSTOP the last rank), `stop-rank0` (SIGSTOP rank 0),
`stop-rank-TERM` (SIGSTOP the last rank, then SIGTERM to the others: a stop signal while a peer is
silent), `TERM` / `USR1` / `INT` (that signal
to the launcher process), `INT-group` (SIGINT to the launcher's whole process group, as Ctrl-C in a
terminal does), `INT-twice` (that, twice, 0.5 s apart), `INT-ranks-twice` (SIGINT to every rank itself,
twice, 0.5 s apart: what the ranks do with a second interrupt, whatever the launcher does). For the
double Ctrl-C cases rank 0 sleeps 5 s a step, and the fault comes at step 1, so that the second
interrupt lands before the first one's checkpoint.

Tests import `run_case` (tests/test_launcher_faults.py, tests/test_slurm.py, tests/test_openmpi.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from tagged_processes import TAG, tagged_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ("none", "mpiexec", "srun", "srun-K", "mpirun")
FAULTS = ("kill-rank", "stop-rank", "stop-rank0", "stop-rank-TERM", "TERM", "USR1", "INT", "INT-group", "INT-twice",
          "INT-ranks-twice")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")

CONFIG = """
[model]
name = "mlp"
hidden = [32]

[data]
name = "synthetic"
samples = 2000
features = 16
classes = 4

[optimizer]
name = "adam"
lr = 0.01

[training]
epochs = 100000
batch_size = 64
log_every = 1
progress = "{progress}"

[checkpoint]
every_steps = 0
every_epochs = 0
"""


@dataclasses.dataclass
class Outcome:
    """What one case did. `seconds`: from the fault (its last signal, for a double one) to the launcher's
    exit (None: still running after the timeout, then killed); `checkpoint_step`: the step of the
    checkpoint the job wrote (None: none)."""

    launcher: str
    fault: str
    ranks: int
    seconds: float | None
    exit_code: int | None
    checkpoint_step: int | None
    stdout: str
    stderr: str
    leftovers: list

    def summary(self) -> str:
        ended = f"ended in {self.seconds:.1f} s, exit {self.exit_code}" if self.seconds is not None \
            else "still running at the timeout (killed)"
        saved = f"checkpoint at step {self.checkpoint_step}" if self.checkpoint_step is not None else "no checkpoint"
        left = f", {len(self.leftovers)} process(es) left behind" if self.leftovers else ""
        return f"{self.launcher} {self.fault} ({self.ranks} ranks): {ended}, {saved}{left}"


def launch_argv(launcher: str, ranks: int, program: list, openmpi_python: str | None = None) -> list:
    """The command line that runs `program` (a list starting with the Python) under `launcher`."""
    bin_dir = os.path.dirname(sys.executable)
    if launcher == "none":
        return program
    if launcher == "mpiexec":
        return [os.path.join(bin_dir, "mpiexec"), "-n", str(ranks), *program]
    if launcher in ("srun", "srun-K"):
        kill = ["--kill-on-bad-exit=1"] if launcher == "srun-K" else []
        return ["srun", "--mpi=pmi2", "--overcommit", "-n", str(ranks), *kill, *program]
    if launcher == "mpirun":
        python = openmpi_python or default_openmpi_python()
        return [openmpi_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), python, *program[1:]]
    raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")


def openmpi_mpirun() -> str:
    """Open MPI's mpirun (Debian names it mpirun.openmpi; a venv's `mpirun` may be MPICH's)."""
    return shutil.which("mpirun.openmpi") or "/usr/bin/mpirun.openmpi"


def default_openmpi_python() -> str:
    return os.path.join(REPO, ".venv-openmpi", "bin", "python")


def rank_pids(tag: str) -> dict:
    """{rank: pid} of the training processes of job `tag` (each launcher names the rank differently)."""
    ranks = {}
    for pid, env in tagged_processes(tag).items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"disttrain" not in handle.read():
                    continue
        except OSError:
            continue
        for name in RANK_VARIABLES:
            if env.get(name, "").isdigit():
                ranks[int(env[name])] = pid
                break
        else:
            if "PMI_RANK" not in env and not any(name in env for name in RANK_VARIABLES):
                ranks.setdefault(0, pid)  # a plain single process
    return ranks


def logged_step(run_dir: str) -> int:
    """The highest step in RUN_DIR/metrics.jsonl so far (0 before there is one)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    best = 0
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                if line.endswith("\n"):
                    try:
                        best = max(best, json.loads(line).get("step", 0))
                    except ValueError:
                        pass
    return best


def checkpoint_step(run_dir: str) -> int | None:
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as handle:
        return int(handle.read().strip().split("-")[1])


def _send(pid: int, sig, group: bool = False) -> None:
    """Signal `pid` (its process group with `group`); one that has already exited is no error: a job
    may end between the two signals of a double Ctrl-C."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass


def inject(fault: str, process: subprocess.Popen, ranks: dict) -> None:
    """Do `fault` to the running job (its launcher `process`, its {rank: pid})."""
    last = ranks[max(ranks)]
    if fault == "kill-rank":
        _send(last, signal.SIGKILL)
    elif fault == "stop-rank":
        _send(last, signal.SIGSTOP)
    elif fault == "stop-rank0":
        _send(ranks[0], signal.SIGSTOP)
    elif fault == "stop-rank-TERM":
        _send(last, signal.SIGSTOP)
        time.sleep(0.5)
        for rank, pid in ranks.items():
            if pid != last:
                _send(pid, signal.SIGTERM)
    elif fault in ("TERM", "USR1", "INT"):
        _send(process.pid, getattr(signal, "SIG" + fault))
    elif fault in ("INT-group", "INT-twice"):
        _send(process.pid, signal.SIGINT, group=True)
        if fault == "INT-twice":
            time.sleep(0.5)
            _send(process.pid, signal.SIGINT, group=True)
    elif fault == "INT-ranks-twice":
        for _ in range(2):
            for pid in ranks.values():
                _send(pid, signal.SIGINT)
            time.sleep(0.5)
    else:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")


def run_case(launcher: str, fault: str, ranks: int = 2, timeout: float = 60, workdir: str | None = None,
             cluster=None, openmpi_python: str | None = None, settings=(), start_timeout: float = 120,
             progress: str = "lines", start_step: int = 3, **extra_env) -> Outcome:
    """Start the job, inject `fault` once step `start_step` is logged, wait up to `timeout` s for the launcher to
    exit; then kill whatever is left (reported in `leftovers`). `cluster`: a started SlurmCluster (srun
    launchers). `settings`: extra `--set` arguments; `extra_env` overrides the environment (e.g.
    DISTTRAIN_FAULT, by default rank 0 sleeping 50 ms a step). Raises RuntimeError if the job does not
    reach step `start_step` within `start_timeout` s."""
    workdir = workdir or tempfile.mkdtemp(prefix="launcher-faults-")
    os.makedirs(workdir, exist_ok=True)
    config, run_dir = os.path.join(workdir, "config.toml"), os.path.join(workdir, "run")
    with open(config, "w") as handle:
        handle.write(CONFIG.format(progress=progress))
    program = [sys.executable, "-m", "disttrain", "train", config, "--run-dir", run_dir,
               *(word for setting in settings for word in ("--set", setting))]
    argv = launch_argv(launcher, 1 if launcher == "none" else ranks, program, openmpi_python)
    tag = uuid.uuid4().hex
    env = cluster.env() if cluster is not None else dict(os.environ)
    env.update({TAG: tag, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MPIEXEC_TIMEOUT": "600",
                "DISTTRAIN_FAULT": "sleep:0:*:0.05", "PYTHONPATH": REPO,
                "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")})
    for key in ("PMI_SIZE", "PMI_RANK", "PMI_FD", "PMI_PORT", "PMI_ID", "OMPI_COMM_WORLD_SIZE"):
        env.pop(key, None)
    env.update({key: str(value) for key, value in extra_env.items()})
    out_path, err_path = os.path.join(workdir, "job.out"), os.path.join(workdir, "job.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO,
                                   start_new_session=True)
    try:
        seconds, code = _inject_and_wait(process, tag, fault, launcher, ranks, run_dir, timeout, start_timeout,
                                         start_step)
        leftovers = _leftovers(tag)
    finally:
        _kill_all(process, tag)
        if cluster is not None:
            _cancel_jobs(cluster)
    with open(out_path) as out, open(err_path) as err:
        stdout, stderr = out.read(), err.read()
    return Outcome(launcher, fault, 1 if launcher == "none" else ranks, seconds, code, checkpoint_step(run_dir),
                   stdout, stderr, leftovers)


def _inject_and_wait(process, tag, fault, launcher, ranks, run_dir, timeout, start_timeout, start_step):
    expected = 1 if launcher == "none" else ranks
    deadline = time.monotonic() + start_timeout
    while logged_step(run_dir) < start_step or len(rank_pids(tag)) < expected:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{launcher}: the job did not reach step {start_step} (exit {process.poll()}); see "
                               f"{os.path.dirname(run_dir)}/job.err")
        time.sleep(0.05)
    inject(fault, process, rank_pids(tag))
    started = time.monotonic()
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, None
    return time.monotonic() - started, code


def _leftovers(tag: str, grace: float = 5.0) -> list:
    deadline = time.monotonic() + grace
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return sorted(tagged_processes(tag))


def _kill_all(process, tag) -> None:
    for pid in tagged_processes(tag):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def _cancel_jobs(cluster, timeout: float = 30) -> None:
    """Cancel every job of the (throw-away) cluster and wait until none is left: an allocation whose srun
    was killed would otherwise hold the node and queue the next case."""
    cluster.run(["scancel", "--user=root"], check=False, timeout=10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cluster.run(["squeue", "-h"], check=False, timeout=10).stdout.strip():
        time.sleep(0.2)


def available(launcher: str, openmpi_python: str | None = None) -> str | None:
    """Why `launcher` cannot run here (None when it can)."""
    if launcher in ("srun", "srun-K"):
        import slurm_cluster

        return slurm_cluster.unavailable_reason()
    if launcher == "mpirun":
        python = openmpi_python or default_openmpi_python()
        if not os.path.exists(openmpi_mpirun()) or not os.path.exists(python):
            return f"Open MPI's mpirun or {python} is missing (make test-openmpi builds it)"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launcher", action="append", choices=LAUNCHERS, help="(repeatable; default: all)")
    parser.add_argument("--fault", action="append", choices=FAULTS, help="(repeatable; default: all)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for the job to end")
    parser.add_argument("--openmpi-python", default=None)
    parser.add_argument("--set", action="append", default=[], help="extra `disttrain train --set` settings")
    parser.add_argument("--verbose", action="store_true", help="print each job's output")
    args = parser.parse_args(argv)
    launchers, faults = args.launcher or list(LAUNCHERS), args.fault or list(FAULTS)
    cluster = None
    if any(name.startswith("srun") for name in launchers) and available("srun") is None:
        import slurm_cluster

        slurm_cluster.ensure_installed()
        cluster = slurm_cluster.SlurmCluster().start()
    try:
        print("| launcher | fault | ranks | ended after | exit | checkpoint | left behind |")
        print("|---|---|---|---|---|---|---|")
        for launcher in launchers:
            reason = available(launcher, args.openmpi_python)
            if reason or (launcher.startswith("srun") and cluster is None):
                print(f"| {launcher} | (skipped: {reason or 'no SLURM'}) | | | | | |")
                continue
            for fault in faults:
                if launcher == "none" and fault.startswith(("kill-rank", "stop-rank")):
                    continue
                # a double Ctrl-C must land inside a step: rank 0 sleeps 5 s a step there
                slow = {"start_step": 1, "DISTTRAIN_FAULT": "sleep:0:*:5"} if fault.endswith("twice") else {}
                outcome = run_case(launcher, fault, args.ranks, args.timeout, cluster=cluster,
                                   openmpi_python=args.openmpi_python, settings=args.set, **slow)
                ended = f"{outcome.seconds:.1f} s" if outcome.seconds is not None else f"> {args.timeout:g} s"
                print(f"| {launcher} | {fault} | {outcome.ranks} | {ended} | {outcome.exit_code} | "
                      f"{outcome.checkpoint_step if outcome.checkpoint_step is not None else 'none'} | "
                      f"{len(outcome.leftovers) or ''} |", flush=True)
                if args.verbose:
                    print(f"--- stdout\n{outcome.stdout[-3000:]}\n--- stderr\n{outcome.stderr[-3000:]}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
