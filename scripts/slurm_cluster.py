"""A throw-away single-node SLURM on this machine, for testing batch scripts for real.

    with SlurmCluster() as cluster:            # munged + slurmctld + slurmd, all under one temp dir
        job_id = cluster.submit(["scripts/slurm.sbatch", "examples/digits_mlp.toml"], "-n", "2")
        state = cluster.wait(job_id, timeout=60)   # scontrol's fields for the job, e.g. state["JobState"]

Contract:
- Needs root and Debian's packages (`ensure_installed()` apt-installs them when missing). Nothing outside
  the temp dir is written or read: munged gets its own key and socket, the daemons their own free ports,
  so a system SLURM/munge (if any) and other clusters started by this module are left alone.
- Clients must run with `cluster.env()` (it sets SLURM_CONF); `cluster.run()` does that for you.
- `stop()` cancels the jobs still running and waits for them, ends the daemons this object started (by
  their recorded PIDs: TERM, then KILL), and kills any process still tied to this cluster (found by its
  directory: see leftover_processes()), so no job step outlives the cluster.
- Job ids start at a random number: MPICH names shared memory after the PMI2 job id, and a job killed in
  an earlier cluster with the same id leaves a segment that makes the new job's MPI_Init fail or hang.
- There is no accounting daemon, so `sacct` does not work; the controller remembers finished jobs for
  MinJobAge seconds, which is set high so `scontrol show job` still answers after a job ends.

Run it by hand: `python scripts/slurm_cluster.py` starts a cluster, prints the `export SLURM_CONF=...`
line to use in another shell, and stops it on Ctrl-C.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "localhost"  # the machine's hostname is something else: slurmd is told its name with -N


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (None when it can, possibly after an apt install)."""
    if os.geteuid() != 0:
        return "SLURM test needs root (to apt-install and run slurmctld/slurmd/munged)"
    if all(shutil.which(name) for name in DAEMONS):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    return None


def ensure_installed(timeout: float = 300) -> float:
    """apt-get install Debian's SLURM + munge if any daemon is missing; returns the seconds it took."""
    if all(shutil.which(name) for name in DAEMONS + ("sbatch",)):
        return 0.0
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # another process may hold the dpkg lock (a parallel install): wait for it rather than fail
    argv = ["apt-get", "-o", "DPkg::Lock::Timeout=120", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        # a stale package list is the usual cause on a fresh machine
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout)
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"installing {' '.join(PACKAGES)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.monotonic() - start


class SlurmCluster:
    """munged + slurmctld + slurmd for one node named `localhost`, with every file under `root`.

    `root` defaults to a fresh temp dir under /tmp (removed by stop() unless keep=True). munged insists
    that its socket's directory be traversable by everyone, so a given `root` must not lie under a
    private (0700) directory such as pytest's tmp_path; `root` itself is set to mode 0755.
    """

    def __init__(self, root: str | None = None, cpus: int | None = None, keep: bool = False):
        self.owns_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="disttrain-slurm-")
        os.chmod(self.root, 0o755)
        self.cpus = cpus or os.cpu_count() or 1
        self.keep = keep
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, object] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> "SlurmCluster":
        """Start the three daemons and return once the node is idle; on failure stop them and raise."""
        try:
            self._write_files()
            self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}",
                                   f"--key-file={self._path('munge', 'munge.key')}",
                                   f"--pid-file={self._path('munge', 'munged.pid')}",
                                   f"--seed-file={self._path('munge', 'munged.seed')}"])
            self._wait_for(lambda: os.path.exists(self.munge_socket), "munged socket", timeout)
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
            self._wait_for(self._controller_up, "slurmctld to answer `scontrol ping`", timeout)
            self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", self.conf])
            self._wait_for(self._node_idle, "the node to become idle", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15) -> None:
        """Cancel leftover jobs, then TERM (later KILL) the daemons we started, slurmd first.

        Job steps are separate processes (slurmstepd and its tasks) that outlive slurmd, so running jobs
        are cancelled and waited for first; whatever of this cluster is still alive at the end is killed.
        """
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run(["scancel", "--user=root"], timeout=10, check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.run(["squeue", "-h"], timeout=10, check=False).stdout.strip():
                time.sleep(0.2)
        for name in reversed(DAEMONS):
            proc = self.processes.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            self.logs.pop(name).close()
        for entry in self.leftover_processes():
            try:
                os.kill(int(entry.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.owns_root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------------

    def env(self, **extra) -> dict:
        """The environment for SLURM client commands (sbatch, srun, scontrol, ...)."""
        env = dict(os.environ, SLURM_CONF=self.conf)
        for key in [key for key in env if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "PMI_", "PMIX_", "HYDRA_"))]:
            if key != "SLURM_CONF":
                del env[key]  # never inherit an enclosing job's settings (or an enclosing MPI launch's)
        env.update({key: str(value) for key, value in extra.items()})
        return env

    def run(self, argv, timeout: float = 30, check: bool = True, cwd=None, **extra_env):
        """Run a client command against this cluster; raise with its output if it fails (check=True)."""
        proc = subprocess.run(list(map(str, argv)), env=self.env(**extra_env), capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}\n"
                               f"{proc.stderr}\n{self.daemon_logs()}")
        return proc

    def submit(self, script_and_args, *sbatch_options, cwd=None, **extra_env) -> str:
        """`sbatch [options] script [args]`; returns the job id."""
        proc = self.run(["sbatch", "--parsable", *sbatch_options, *script_and_args], cwd=cwd, **extra_env)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict of its Key=Value fields ({} if the job is unknown)."""
        proc = self.run(["scontrol", "show", "job", "--oneliner", job_id], check=False, timeout=10)
        fields = {}
        for token in proc.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float = 60, poll: float = 0.25, release_requeued: bool = True) -> dict:
        """Poll until the job leaves PENDING/RUNNING/COMPLETING; return its final fields.

        With release_requeued, a requeued job is started again at once (see release_requeued()).
        """
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            state = fields.get("JobState")
            if state not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"):
                return fields
            if release_requeued:
                self.release_requeued(job_id, fields)
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False, timeout=10)
                raise TimeoutError(f"job {job_id} still {state} after {timeout}s\n{self.daemon_logs()}")
            time.sleep(poll)

    def release_requeued(self, job_id: str, fields: dict | None = None) -> bool:
        """Start a requeued job now instead of ~2 minutes later; True if it was waiting.

        SLURM holds a requeued batch job until its old job credential expires; on this single node
        nothing can still hold that credential, so skipping the wait is safe.
        """
        fields = fields if fields is not None else self.job(job_id)
        if fields.get("JobState") == "PENDING" and fields.get("Restarts", "0") != "0" \
                and fields.get("Reason") == "BeginTime":
            self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False, timeout=10)
            return True
        return False

    def daemon_logs(self, tail: int = 3000) -> str:
        """The end of each daemon's log, for error messages."""
        parts = []
        for name in DAEMONS:
            path = self._path("log", f"{name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as log:
                    parts.append(f"--- {name}.log ---\n{log.read()[-tail:]}")
        return "\n".join(parts)

    def pids(self) -> dict:
        """{daemon name: PID} of the daemons this object started and that are still running."""
        return {name: proc.pid for name, proc in self.processes.items() if proc.poll() is None}

    def leftover_processes(self) -> list:
        """'PID command' of every process still tied to this cluster: its daemons, job steps and tasks.

        Found through /proc: each of them has this cluster's directory in its command line or its
        environment (SLURM_CONF), so processes of other clusters or of a system SLURM are not counted.
        """
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    cmdline = handle.read()
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    environ = handle.read()
                with open(f"/proc/{pid}/stat") as handle:
                    zombie = handle.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue  # exited meanwhile
            if not zombie and int(pid) != os.getpid() and self.root.encode() in cmdline + environ:
                command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
                found.append(f"{pid} {command}")
        return found

    # -- internals ---------------------------------------------------------------------------------

    def _path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def _write_files(self) -> None:
        for sub in ("munge", "log", "state", "spool"):
            os.makedirs(self._path(sub), exist_ok=True)
        os.chmod(self._path("munge"), 0o755)  # munged: the socket's directory must be traversable by all
        key = self._path("munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
            handle.write(os.urandom(1024))
        ctld_port, slurmd_port = _free_ports(2)
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        settings = {
            "ClusterName": "disttrain-test",
            "SlurmctldHost": NODE,
            "SlurmctldPort": ctld_port,
            "SlurmdPort": slurmd_port,
            "SlurmUser": "root",
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "CredType": "cred/munge",
            "ProctrackType": "proctrack/linuxproc",  # no cgroups in a container
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "MpiDefault": "none",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "MinJobAge": 3600,  # no sacct: keep finished jobs visible to `scontrol show job`
            "FirstJobId": random.randrange(1_000_000, 60_000_000),  # see the module docstring
            "ReturnToService": 2,
            "SchedulerType": "sched/builtin",
            "StateSaveLocation": self._path("state"),
            "SlurmdSpoolDir": self._path("spool"),
            "SlurmctldPidFile": self._path("slurmctld.pid"),
            "SlurmdPidFile": self._path("slurmd.pid"),
            "SlurmctldLogFile": self._path("log", "slurmctld.log"),
            "SlurmdLogFile": self._path("log", "slurmd.log"),
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines.append(f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory_mb} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={NODE} Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list) -> None:
        log = open(self._path("log", f"{name}.stdout"), "wb")
        self.logs[name] = log
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env(), cwd=self.root,
                                                start_new_session=True)

    def _controller_up(self) -> bool:
        proc = self.run(["scontrol", "ping"], check=False, timeout=10)
        return "UP" in proc.stdout

    def _node_idle(self) -> bool:
        proc = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False, timeout=10)
        return proc.stdout.strip() == "idle"

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                       f"{self._startup_output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self._startup_output()}")
            time.sleep(0.1)

    def _startup_output(self) -> str:
        parts = [self.daemon_logs()]
        for name in self.processes:
            path = self._path("log", f"{name}.stdout")
            with open(path, errors="replace") as log:
                parts.append(f"--- {name} stdout/stderr ---\n{log.read()[-3000:]}")
        return "\n".join(parts)


def _free_ports(count: int) -> list:
    """Ports nobody listens on right now (bound together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def main() -> int:
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    ensure_installed()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops the cluster like Ctrl-C
    with SlurmCluster() as cluster:
        print(f"SLURM is up (daemon PIDs {cluster.pids()}). In another shell:\n"
              f"    export SLURM_CONF={cluster.conf}\nCtrl-C stops it.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
