#!/usr/bin/env python3
"""Fake hosts on one machine for multi-host MPI tests: network namespaces on a private bridge.

Each fake host is a network namespace whose eth0 (one end of a veth pair; the other end sits on a bridge
of its own) has an address of a private /24, plus its own UTS, IPC, PID and mount namespaces with a
private /dev/shm, held open by a small init process. Without those extra namespaces MPICH's UCX notices
that the "hosts" share a kernel and talks over shared memory: right results, no network.

mpiexec runs on a "login node" (one more network namespace, address .254, in the root PID namespace):
a process cannot enter a sibling PID namespace, so the launcher that starts hydra's proxies inside each
host (ssh-netns, next to this file) must be a child of a process in the root PID namespace. Every
resource is named `dtfh<tag>...` (tag: 4 hex digits per instance) and state lives in /run/dtfh/<tag>/.

Python:
    with FakeHosts(n_hosts=2) as hosts:
        job = hosts.mpiexec([sys.executable, "prog.py"], ranks_per_host=2, timeout=60)
        print(job.returncode, job.stdout, hosts.bytes_crossed())
Shell:
    fakehosts.py preflight | up N | list | teardown TAG | teardown --all
Needs root, iproute2 (`ip`, `tc`), util-linux (`unshare`, `nsenter`, `mount`) and coreutils (`timeout`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "dtfh"
HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "ssh-netns"
STATE_ROOT = Path("/run") / PREFIX
NETNS_ETC = Path("/etc/netns")
REQUIRED_COMMANDS = ("ip", "tc", "unshare", "nsenter", "timeout", "mount")
LOGIN_OCTET = 254
KILL_GRACE = 2  # seconds between timeout's SIGTERM and its SIGKILL
INIT_MARK = f"{PREFIX}-init"
# pid 1 of each host's PID namespace: reaps orphans (as a real init does) and otherwise sleeps
INIT_CODE = "import os, time\nwhile True:\n    try:\n        os.wait()\n    except ChildProcessError:\n        time.sleep(1)\n"
HOST_ENV_DROP = ("PMI_SIZE", "PMI_RANK", "PMI_FD", "PMI_PORT", "PMI_ID", "OMPI_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class Host:
    """One fake host: index (0-based), host name, address, network namespace, and the PID (as seen from
    the root PID namespace) of the init of its PID namespace, through which its namespaces are entered."""

    index: int
    name: str
    address: str
    netns: str
    init_pid: int


@dataclass(frozen=True)
class LinkBytes:
    """Bytes received and sent by a host's eth0 since the host was set up."""

    rx: int
    tx: int


@dataclass
class JobResult:
    """A finished command: argv, exit code (124/137 when the outer `timeout` fired), output, seconds."""

    argv: list
    returncode: int
    stdout: str
    stderr: str
    elapsed: float


class FakeHosts:
    """n_hosts fake hosts on a bridge of their own, addresses subnet[1..n_hosts], login node subnet[254].

    Set up in the constructor, torn down by close() (or leaving the `with` block), which kills every
    process the hosts run and removes every namespace, link and file it made, also after failures.
    Needs root; call preflight() first to learn whether this machine allows it.
    """

    def __init__(self, n_hosts: int = 2, subnet: str = "10.77.0.0/24", mpiexec: str | None = None):
        network = ipaddress.ip_network(subnet)
        if network.version != 4 or network.prefixlen != 24 or not network.is_private:
            raise ValueError(f"subnet must be a private IPv4 /24 (e.g. 10.77.0.0/24), got {subnet!r}")
        if not 1 <= n_hosts < LOGIN_OCTET - 1:
            raise ValueError(f"n_hosts must be in 1..{LOGIN_OCTET - 2}, got {n_hosts}")
        self.tag = _new_tag()
        self.name = PREFIX + self.tag  # every resource of this instance starts with it
        self.bridge = f"{self.name}br"
        self.state_dir = STATE_ROOT / self.tag
        self.hosts_file = self.state_dir / "hosts"
        self.login_netns = f"{self.name}-login"
        self.login_address = str(network[LOGIN_OCTET])
        self.mpiexec_path = mpiexec or _default_mpiexec()
        self.hosts: list[Host] = []
        self._holders: list[subprocess.Popen] = []
        self._jobs: list[subprocess.Popen] = []
        self._closed = False
        try:
            self._set_up(n_hosts, network)
        except BaseException:
            self.close()
            raise

    # ---- set-up ------------------------------------------------------------------------------------

    def _set_up(self, n_hosts: int, network) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "addrgenmode", "none")  # no IPv6 link-local: the bridge stays addressless
        _ip("link", "set", self.bridge, "up")
        names = [(str(network[i + 1]), f"{self.name}-h{i}", f"{self.name}-h{i}") for i in range(n_hosts)]
        etc_hosts = "127.0.0.1 localhost\n" + "".join(f"{address} {name}\n" for address, name, _ in names)
        etc_hosts += f"{self.login_address} {self.login_netns}\n"
        self._add_node(self.login_netns, f"{self.name}vl", self.login_address, etc_hosts)
        for index, (address, name, netns) in enumerate(names):
            self._add_node(netns, f"{self.name}v{index}", address, etc_hosts)
            self.hosts.append(Host(index, name, address, netns, self._start_init(netns, name)))
        self.hosts_file.write_text("".join(f"{h.address} {h.name} {h.netns} {h.init_pid}\n" for h in self.hosts))
        self._check_isolated(network)

    def _add_node(self, netns: str, veth: str, address: str, etc_hosts: str) -> None:
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "addrgenmode", "none")
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", netns, "link", "set", "eth0", "addrgenmode", "none")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "link", "set", "eth0", "up")
        # `ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts: host names resolve on every node
        (NETNS_ETC / netns).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / netns / "hosts").write_text(etc_hosts)

    def _start_init(self, netns: str, hostname: str) -> int:
        script = (f"mount -t tmpfs -o mode=1777 {PREFIX}-shm /dev/shm && echo {hostname} > /proc/sys/kernel/hostname"
                  f' && exec "$1" -c "$2" {INIT_MARK}')
        log_path = self.state_dir / f"{hostname}.log"
        with open(log_path, "wb") as log:
            holder = subprocess.Popen(
                ["ip", "netns", "exec", netns, "unshare", "--uts", "--ipc", "--pid", "--fork", "--kill-child",
                 "--mount-proc", "sh", "-c", script, "sh", sys.executable, INIT_CODE],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._holders.append(holder)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if holder.poll() is not None:
                raise RuntimeError(f"fake host {hostname} did not start: {log_path.read_text()}")
            init_pid = _child_pid(holder.pid)
            if init_pid and _cmdline(init_pid)[-1:] == [INIT_MARK]:
                return init_pid
            time.sleep(0.02)
        raise RuntimeError(f"fake host {hostname} not ready after 15 s: {log_path.read_text()}")

    def _check_isolated(self, network) -> None:
        """Refuse to run unless no node has a route off the /24 and the bridge has no address."""
        for netns in [self.login_netns, *(h.netns for h in self.hosts)]:
            for route in json.loads(_ip("-n", netns, "-j", "route", "show")):
                if route.get("dst") == "default" or not ipaddress.ip_network(route["dst"]).subnet_of(network):
                    raise RuntimeError(f"{netns} has a route off the fake network: {route}")
        if json.loads(_ip("-j", "addr", "show", "dev", self.bridge))[0].get("addr_info"):
            raise RuntimeError(f"bridge {self.bridge} has an address")

    # ---- running things on the hosts ---------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        """The hosts' addresses, host 0 first."""
        return [h.address for h in self.hosts]

    def environment(self, env: dict | None = None, mpiexec_timeout: float | None = None) -> dict:
        """The environment of a job: ours minus any enclosing MPI job's PMI variables, mpiexec's directory
        first on PATH, DTFH_HOSTS for the launcher, MPIEXEC_TIMEOUT if given, then `env` on top."""
        result = {k: v for k, v in os.environ.items() if k not in HOST_ENV_DROP}
        result["PATH"] = os.path.dirname(self.mpiexec_path) + os.pathsep + result.get("PATH", "")
        result["DTFH_HOSTS"] = str(self.hosts_file)
        if mpiexec_timeout is not None:
            result["MPIEXEC_TIMEOUT"] = str(max(1, int(mpiexec_timeout)))
        result.update({k: str(v) for k, v in (env or {}).items()})
        return result

    def mpiexec_argv(self, argv: list, ranks_per_host: int | list[int] = 1,
                     hosts: list[int] | None = None) -> list[str]:
        """The command that runs `argv` as ranks_per_host ranks on each of `hosts` (indices, default all),
        ranks in host order (host 0 gets ranks 0..ranks_per_host-1), mpiexec on the login node.
        A list gives each chosen host its own count (e.g. [1, 2]: rank 0 on the first, 1-2 on the second)."""
        chosen = [self.hosts[i] for i in (range(len(self.hosts)) if hosts is None else hosts)]
        launch = ["ip", "netns", "exec", self.login_netns, self.mpiexec_path,
                  "-launcher", "ssh", "-launcher-exec", str(LAUNCHER), "-localhost", self.login_address]
        if isinstance(ranks_per_host, int):
            return [*launch, "-hosts", ",".join(h.address for h in chosen),
                    "-ppn", str(ranks_per_host), "-n", str(ranks_per_host * len(chosen)), *map(str, argv)]
        if len(ranks_per_host) != len(chosen) or min(ranks_per_host) < 1:
            raise ValueError(f"ranks_per_host must give a positive count for each of the {len(chosen)} hosts, "
                             f"got {ranks_per_host}")
        return [*launch, "-hosts", ",".join(f"{h.address}:{count}" for h, count in zip(chosen, ranks_per_host)),
                "-n", str(sum(ranks_per_host)), *map(str, argv)]

    def start_mpiexec(self, argv: list, ranks_per_host: int | list[int] = 1, hosts: list[int] | None = None,
                      timeout: float = 120, env: dict | None = None, mpiexec_timeout: float | None = None,
                      cwd: str | None = None) -> subprocess.Popen:
        """Start mpiexec_argv(...) and return at once: a Popen (bytes; stderr merged into stdout) in a
        process group of its own. MPIEXEC_TIMEOUT defaults to timeout - 2 s; `timeout -k` kills the job
        after `timeout` s whatever happens. close() or reap() kills whatever it leaves behind."""
        command, job_env = self._job(argv, ranks_per_host, hosts, timeout, env, mpiexec_timeout)
        job = subprocess.Popen(command, env=job_env, cwd=cwd,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
        self._jobs.append(job)
        return job

    def mpiexec(self, argv: list, ranks_per_host: int | list[int] = 1, hosts: list[int] | None = None,
                timeout: float = 120, env: dict | None = None, mpiexec_timeout: float | None = None,
                cwd: str | None = None, check: bool = False) -> JobResult:
        """Run mpiexec_argv(...) to the end (see start_mpiexec for the timeouts) and return its result;
        with check=True raise RuntimeError (with the output) on a non-zero exit code."""
        command, job_env = self._job(argv, ranks_per_host, hosts, timeout, env, mpiexec_timeout)
        return self._run_to_end(command, timeout, job_env, cwd, check)

    def _job(self, argv, ranks_per_host, hosts, timeout, env, mpiexec_timeout) -> tuple[list, dict]:
        if mpiexec_timeout is None:
            mpiexec_timeout = max(1, timeout - KILL_GRACE)  # hydra ends the job (and says so) before `timeout`
        command = ["timeout", "-k", str(KILL_GRACE), str(timeout), *self.mpiexec_argv(argv, ranks_per_host, hosts)]
        return command, self.environment(env, mpiexec_timeout)

    def run_on(self, index: int, argv: list, timeout: float = 60, env: dict | None = None, cwd: str | None = None,
               check: bool = False) -> JobResult:
        """Run argv inside every namespace of host `index` (like `ssh host argv`) and return its result."""
        host = self.hosts[index]
        command = ["nsenter", "--target", str(host.init_pid), "--net", "--uts", "--ipc", "--pid", "--mount",
                   f"--wd={cwd or os.getcwd()}", "--", "timeout", "-k", str(KILL_GRACE), str(timeout), *map(str, argv)]
        return self._run_to_end(command, timeout, self.environment(env), None, check)

    def _run_to_end(self, command: list, timeout: float, env: dict, cwd: str | None, check: bool) -> JobResult:
        start = time.monotonic()
        job = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        self._jobs.append(job)
        try:
            stdout, stderr = job.communicate(timeout=timeout + 3 * KILL_GRACE)
        except subprocess.TimeoutExpired:
            _kill_group(job)
            stdout, stderr = job.communicate()
            raise TimeoutError(f"still running {timeout + 3 * KILL_GRACE} s after start: {command}\n{stdout}\n{stderr}")
        result = JobResult(command, job.returncode, stdout, stderr, time.monotonic() - start)
        if check and result.returncode != 0:
            raise RuntimeError(f"exit code {result.returncode}: {command}\nstdout:\n{stdout}\nstderr:\n{stderr}")
        return result

    # ---- observing and breaking the network --------------------------------------------------------

    def bytes_crossed(self) -> list[LinkBytes]:
        """Per host (host 0 first), the bytes its eth0 received and sent since set-up: every byte between
        hosts crossed these counters; shared-memory traffic does not."""
        counters = []
        for host in self.hosts:
            stats = json.loads(_ip("-n", host.netns, "-s", "-j", "link", "show", "eth0"))[0]["stats64"]
            counters.append(LinkBytes(rx=stats["rx"]["bytes"], tx=stats["tx"]["bytes"]))
        return counters

    def processes(self, index: int) -> list[int]:
        """PIDs (root PID namespace) of every process of host `index` but its init: its jobs' proxies and ranks."""
        host = self.hosts[index]
        pids = {int(pid) for pid in _ip("netns", "pids", host.netns, check=False).split()}
        return sorted(pids - {host.init_pid, self._holders[index].pid})

    def kill_host(self, index: int) -> int:
        """SIGKILL every process of host `index` but its init, as if its jobs crashed at once; return how
        many were killed. The host stays usable for the next job."""
        host = self.hosts[index]
        return _kill_netns_processes(host.netns, spare={host.init_pid, self._holders[index].pid})

    def link_down(self, index: int) -> None:
        """Take host `index`'s eth0 down: its packets stop, its processes and sockets live on."""
        _ip("-n", self.hosts[index].netns, "link", "set", "eth0", "down")

    def link_up(self, index: int) -> None:
        """Bring host `index`'s eth0 back up."""
        _ip("-n", self.hosts[index].netns, "link", "set", "eth0", "up")

    def shape(self, rate: str = "1gbit", burst: str = "256kb", latency: str = "50ms",
              hosts: list[int] | None = None) -> None:
        """Limit what each of `hosts` (default all) sends to `rate` with a token bucket (tc tbf): with every
        host shaped, every link is shaped both ways. No delay or loss (netem is missing in this kernel)."""
        for index in range(len(self.hosts)) if hosts is None else hosts:
            _tc("-n", self.hosts[index].netns, "qdisc", "replace", "dev", "eth0", "root", "tbf",
                "rate", rate, "burst", burst, "latency", latency)

    def unshape(self, hosts: list[int] | None = None) -> None:
        """Remove shape()'s limit from each of `hosts` (default all)."""
        for index in range(len(self.hosts)) if hosts is None else hosts:
            _tc("-n", self.hosts[index].netns, "qdisc", "del", "dev", "eth0", "root", check=False)

    # ---- tear-down ---------------------------------------------------------------------------------

    def reap(self) -> None:
        """Kill every job this instance started and every process on the login node and the hosts but their
        inits, e.g. the ranks a dead link left behind; the hosts stay usable."""
        for job in self._jobs:
            _kill_group(job)
        self._jobs.clear()
        _kill_netns_processes(self.login_netns)
        for index in range(len(self.hosts)):
            self.kill_host(index)

    def close(self) -> None:
        """Kill everything the hosts run and remove every namespace, link and file of this instance.
        Idempotent; raises RuntimeError naming anything that could not be removed."""
        if self._closed:
            return
        self._closed = True
        for job in self._jobs:
            _kill_group(job)
        remaining = teardown(self.tag)
        for process in [*self._jobs, *self._holders]:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                remaining.append(f"process {process.pid}")
        if remaining:
            raise RuntimeError(f"fake hosts {self.name}: could not remove {remaining}")

    def __enter__(self) -> "FakeHosts":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---- machine checks and clean-up of leftovers ------------------------------------------------------

def preflight(install: bool = False) -> str | None:
    """None when this machine can run fake hosts, else a one-line reason why not. With install=True, as
    root, missing tools are installed with apt-get (iproute2, util-linux) before giving up."""
    if not sys.platform.startswith("linux"):
        return "fake hosts need Linux network namespaces"
    if os.geteuid() != 0:
        return "fake hosts need root (network namespaces, veth, tc)"
    missing = [command for command in REQUIRED_COMMANDS if not shutil.which(command)]
    if missing and install and shutil.which("apt-get"):
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "iproute2", "util-linux"]):
            subprocess.run(argv, capture_output=True, timeout=600,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        missing = [command for command in REQUIRED_COMMANDS if not shutil.which(command)]
    if missing:
        return f"fake hosts need {', '.join(missing)} (apt-get install iproute2 util-linux coreutils)"
    probe_tag = f"pb{os.getpid() % 100000}"
    probe = PREFIX + probe_tag
    try:
        _ip("netns", "add", probe)
        _ip("link", "add", probe + "b", "type", "bridge")
        _run(["ip", "netns", "exec", probe, "unshare", "--uts", "--ipc", "--pid", "--fork", "--kill-child",
              "--mount-proc", "true"])
    except RuntimeError as error:
        return f"network namespaces are not allowed here: {str(error).splitlines()[-1]}"
    finally:
        teardown(probe_tag)
    return None


def leftovers(tag: str = "") -> list[str]:
    """Everything still present of instance `tag` (default: of every instance): network namespaces and
    links named dtfh<tag>*, /etc/netns directories, state directories under /run/dtfh."""
    prefix = PREFIX + tag
    found = [f"netns {name}" for name in _netns_names() if name.startswith(prefix)]
    found += [f"link {link['ifname']}" for link in json.loads(_ip("-j", "link", "show"))
              if link["ifname"].startswith(prefix)]
    if NETNS_ETC.is_dir():
        found += [f"file {path}" for path in NETNS_ETC.iterdir() if path.name.startswith(prefix)]
    if STATE_ROOT.is_dir():
        found += [f"file {path}" for path in STATE_ROOT.iterdir() if path.name.startswith(tag)]
    return found


def teardown(tag: str = "") -> list[str]:
    """Kill the processes of, and remove, everything of instance `tag` (default: of every instance, e.g.
    leftovers of killed runs; do not use it while another run uses fake hosts). Returns what could not be
    removed (normally nothing)."""
    prefix = PREFIX + tag
    namespaces = [name for name in _netns_names() if name.startswith(prefix)]
    for netns in namespaces:
        _kill_netns_processes(netns)
    for link in json.loads(_ip("-j", "link", "show")):
        if link["ifname"].startswith(prefix):
            _ip("link", "del", link["ifname"], check=False)
    for netns in namespaces:
        _ip("netns", "del", netns, check=False)
    if NETNS_ETC.is_dir():
        for path in NETNS_ETC.iterdir():
            if path.name.startswith(prefix):
                shutil.rmtree(path, ignore_errors=True)
        if not any(NETNS_ETC.iterdir()):
            NETNS_ETC.rmdir()
    if STATE_ROOT.is_dir():
        for path in STATE_ROOT.iterdir():
            if path.name.startswith(tag):
                shutil.rmtree(path, ignore_errors=True)
        if not any(STATE_ROOT.iterdir()):
            STATE_ROOT.rmdir()
    deadline = time.monotonic() + 10  # the kernel deletes a namespace's end of a veth asynchronously
    while (remaining := leftovers(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return remaining


# ---- small wrappers ---------------------------------------------------------------------------------

def _run(argv: list, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _ip(*args: str, check: bool = True) -> str:
    return _run(["ip", *args], check=check)


def _tc(*args: str, check: bool = True) -> str:
    return _run(["tc", *args], check=check)


def _netns_names() -> list[str]:
    return [entry["name"] for entry in json.loads(_ip("-j", "netns", "list") or "[]")]


def _kill_netns_processes(netns: str, spare: set = frozenset()) -> int:
    """SIGKILL every process in network namespace `netns` except `spare`, until none is left (a dying
    parent may fork once more); return how many were killed."""
    killed = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = {int(pid) for pid in _ip("netns", "pids", netns, check=False).split()} - set(spare)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    return len(killed)


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _child_pid(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _new_tag() -> str:
    taken = set(_netns_names())
    while True:
        tag = secrets.token_hex(2)
        if not any(name.startswith(PREFIX + tag) for name in taken):
            return tag


def _default_mpiexec() -> str:
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside_python if os.access(beside_python, os.X_OK) else (shutil.which("mpiexec") or "mpiexec")


# ---- command line -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`fakehosts.py preflight [--install] | up N [--subnet S] | list | teardown (TAG | --all)`."""
    parser = argparse.ArgumentParser(description="Fake hosts (network namespaces) for multi-host MPI tests.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("preflight", help="say whether this machine can run fake hosts")
    check.add_argument("--install", action="store_true", help="apt-get install missing tools (root)")
    up = commands.add_parser("up", help="set up N hosts and leave them running; prints how to use them")
    up.add_argument("n_hosts", type=int)
    up.add_argument("--subnet", default="10.77.0.0/24")
    commands.add_parser("list", help=f"list everything named {PREFIX}*")
    down = commands.add_parser("teardown", help="kill and remove one instance (TAG) or everything (--all)")
    which = down.add_mutually_exclusive_group(required=True)
    which.add_argument("tag", nargs="?")
    which.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "preflight":
        reason = preflight(install=args.install)
        print(reason or "ok: this machine can run fake hosts")
        return 1 if reason else 0
    if args.command == "up":
        hosts = FakeHosts(args.n_hosts, subnet=args.subnet)
        for host in hosts.hosts:
            print(f"host {host.index}: {host.name} {host.address} netns {host.netns} init pid {host.init_pid}")
        example = hosts.mpiexec_argv(["python", "prog.py"], ranks_per_host=2)
        print(f"run:      DTFH_HOSTS={hosts.hosts_file} MPIEXEC_TIMEOUT=60 {' '.join(example)}")
        print(f"shell:    nsenter -t {hosts.hosts[0].init_pid} -n -u -i -p -m --wd=$PWD bash")
        print(f"teardown: {sys.argv[0]} teardown {hosts.tag}")
        return 0
    if args.command == "list":
        print("\n".join(leftovers()) or "nothing")
        return 0
    remaining = teardown("" if args.all else args.tag)
    print("\n".join(f"left: {item}" for item in remaining) or "removed")
    return 1 if remaining else 0


if __name__ == "__main__":
    sys.exit(main())
