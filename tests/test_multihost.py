"""MPI across fake hosts (scripts/fakehosts): traffic really crosses a network, and failures end the job.

Each test sets up its own hosts (network namespaces on a private bridge, ~0.2 s) and tears them down
after, pass or fail. Skipped, with the reason, where network namespaces are not allowed (not root...).
"""

import json
import os
import subprocess
import sys
import time

from fakehosts_fixture import fake_hosts, fakehosts, json_line, make_fake_hosts, read_until  # noqa: F401

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mh_allreduce.py")
ONE_BLAS_THREAD = {"OMP_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}
OUTER_TIMEOUT = (124, 137)  # exit codes of `timeout` itself: the job had to be killed from outside


def allreduce(hosts, ranks_per_host: int, elements: int, repeat: int) -> dict:
    """Run mh_allreduce.py on every host and return rank 0's report."""
    job = hosts.mpiexec([sys.executable, PROGRAM, "--elements", elements, "--repeat", repeat],
                        ranks_per_host=ranks_per_host, timeout=60, env=ONE_BLAS_THREAD, check=True)
    return json_line(job.stdout)


def test_allreduce_across_two_hosts_is_exact_and_its_bytes_cross_each_hosts_veth(fake_hosts):
    before = fake_hosts.bytes_crossed()
    report = allreduce(fake_hosts, ranks_per_host=2, elements=1 << 20, repeat=3)
    after = fake_hosts.bytes_crossed()

    assert report["correct"] and report["world_size"] == 4
    assert report["processor_names"] == [host.name for host in fake_hosts.hosts for _ in range(2)]
    assert report["shared_sizes"] == [2, 2, 2, 2]
    # Each host must receive the other host's partial sum of every element, in every Allreduce (warm-up
    # included), and send its own: at least one buffer per call each way. Shared memory would give ~0.
    payload = (report["repeat"] + 1) * report["nbytes"]
    for host, start, end in zip(fake_hosts.hosts, before, after):
        assert end.rx - start.rx >= payload, f"{host.name} received {end.rx - start.rx} < {payload} bytes"
        assert end.tx - start.tx >= payload, f"{host.name} sent {end.tx - start.tx} < {payload} bytes"


def test_sigkill_of_every_process_of_one_host_ends_the_job_within_seconds(fake_hosts):
    job = fake_hosts.start_mpiexec([sys.executable, PROGRAM, "--elements", 1 << 16, "--loop"], ranks_per_host=2,
                                   timeout=60, env=ONE_BLAS_THREAD)
    read_until(job, "looping", timeout=30)
    killed_at = time.monotonic()
    assert fake_hosts.kill_host(1) >= 3  # at least its proxy and two ranks
    output = job.communicate(timeout=30)[0].decode(errors="replace")
    ended_after = time.monotonic() - killed_at

    assert job.returncode != 0 and job.returncode not in OUTER_TIMEOUT, output
    assert ended_after < 15, f"the job took {ended_after:.1f} s to end after host 1 died"


def test_link_down_ends_the_job_through_mpiexec_timeout_instead_of_hanging(fake_hosts):
    started_at = time.monotonic()
    job = fake_hosts.start_mpiexec([sys.executable, PROGRAM, "--elements", 1 << 16, "--loop"], ranks_per_host=2,
                                   timeout=60, mpiexec_timeout=10, env=ONE_BLAS_THREAD)
    read_until(job, "looping", timeout=8)
    fake_hosts.link_down(1)
    output = job.communicate(timeout=40)[0].decode(errors="replace")
    ended_after = time.monotonic() - started_at

    assert job.returncode != 0 and job.returncode not in OUTER_TIMEOUT, output
    assert "TIMED OUT" in output, output
    assert ended_after < 25, f"ended {ended_after:.1f} s after start, MPIEXEC_TIMEOUT was 10 s"


def test_allreduce_on_a_link_shaped_to_1gbit_is_slower_and_no_faster_than_the_rate(fake_hosts):
    unshaped = allreduce(fake_hosts, ranks_per_host=1, elements=1 << 20, repeat=5)
    fake_hosts.shape(rate="1gbit", burst="256kb")
    shaped = allreduce(fake_hosts, ranks_per_host=1, elements=1 << 20, repeat=5)

    # Each host must receive the whole buffer per call; only the bucket's 256 KiB burst goes unmetered.
    fastest_possible = (shaped["nbytes"] - 256 * 1024) * 8 / 1e9
    assert shaped["correct"] and unshaped["correct"]
    assert shaped["seconds_per_allreduce"] > unshaped["seconds_per_allreduce"]
    assert shaped["seconds_per_allreduce"] >= 0.95 * fastest_possible, (shaped, fastest_possible)


def test_hosts_have_no_route_off_their_subnet_and_the_bridge_has_no_address(fake_hosts):
    for netns in [fake_hosts.login_netns, *(host.netns for host in fake_hosts.hosts)]:
        routes = json.loads(subprocess.run(["ip", "-n", netns, "-j", "route", "show"], capture_output=True,
                                           text=True, timeout=10, check=True).stdout)
        assert [route["dst"] for route in routes] == ["10.77.0.0/24"], (netns, routes)
    bridge = json.loads(subprocess.run(["ip", "-j", "addr", "show", "dev", fake_hosts.bridge], capture_output=True,
                                       text=True, timeout=10, check=True).stdout)
    assert bridge[0]["addr_info"] == []


def test_each_host_has_its_own_hostname_and_private_dev_shm(fake_hosts):
    marker = f"dtfh-test-{os.getpid()}"
    fake_hosts.run_on(0, ["sh", "-c", f"touch /dev/shm/{marker}"], timeout=10, check=True)
    seen = [fake_hosts.run_on(i, ["sh", "-c", "hostname; ls /dev/shm"], timeout=10, check=True).stdout.split()
            for i in range(2)]

    assert seen[0] == [fake_hosts.hosts[0].name, marker]
    assert seen[1] == [fake_hosts.hosts[1].name]
    assert not os.path.exists(f"/dev/shm/{marker}")


def test_close_leaves_nothing_behind_even_when_the_test_body_raises(make_fake_hosts):
    hosts = make_fake_hosts(3)
    try:
        with hosts:
            hosts.start_mpiexec([sys.executable, PROGRAM, "--elements", 1 << 10, "--loop"], timeout=30)
            raise KeyError("a failing test")
    except KeyError:
        pass

    assert fakehosts.leftovers(hosts.tag) == []
    assert not any(running(host.init_pid) for host in hosts.hosts)


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
