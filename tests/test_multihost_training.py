"""The `disttrain` CLI across fake hosts (scripts/fakehosts): training whose gradients cross a network.

2 hosts x 2 ranks train the default example (examples/digits_mlp.toml) and must match one plain process
with the same global batch, within the tolerance of tests/test_equivalence.py (losses rtol 1e-5;
parameters rtol 1e-4, atol 2e-5); the hosts' eth0 counters must show the gradient traffic. Then the
topology report, and the failures a cluster has: a host that dies, a link that goes down, and the
resume on what is left. Each test sets up its own hosts and tears them down, pass or fail; all skip,
with the reason, where network namespaces are not allowed.
"""

import json
import os
import sys
import time

import numpy as np
import pytest

import launch
from fakehosts_fixture import fake_hosts, make_fake_hosts  # noqa: F401

from disttrain import checkpoint

CONFIG = os.path.join(launch.REPO, "examples", "digits_mlp.toml")
# 4 epochs of 23 steps (1438 samples, global batch 64: the last batch of 30 splits 8/8/7/7 on 4 ranks)
SETTINGS = ["--set", "training.epochs=4", "--set", "training.log_every=1", "--set", "checkpoint.every_steps=20",
            "--set", 'training.progress="none"']
TOTAL_STEPS = 92
# let disttrain choose BLAS threads per node (cores / ranks on the node), as on a cluster: an empty
# variable counts as unset for disttrain and OpenBLAS
THREADS_UNSET = {"OMP_NUM_THREADS": "", "OPENBLAS_NUM_THREADS": "", "MKL_NUM_THREADS": "", "BLIS_NUM_THREADS": ""}
OUTER_TIMEOUT = (124, 137)  # exit codes of `timeout` itself: the job had to be killed from outside


def train_argv(run_dir, *extra) -> list:
    """`python -m disttrain train examples/digits_mlp.toml` with SETTINGS, writing to run_dir."""
    return [sys.executable, "-m", "disttrain", "train", CONFIG, *SETTINGS, "--run-dir", str(run_dir), *extra]


def train_losses(run_dir) -> list:
    """[(step, loss)] of the train records in run_dir/metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [(r["step"], r["loss"]) for r in map(json.loads, handle) if r["kind"] == "train"]


def final_parameters(run_dir) -> tuple:
    """({name: array}, step) of the newest checkpoint of run_dir."""
    params, manifest, _ = checkpoint.read_model(str(run_dir))
    return params, manifest["step"]


def assert_same_training(run_dir, reference_dir) -> None:
    """run_dir trained like reference_dir: the same loss at every step, the same final parameters."""
    reference, distributed = train_losses(reference_dir), train_losses(run_dir)
    assert [s for s, _ in distributed] == [s for s, _ in reference] == list(range(1, TOTAL_STEPS + 1))
    np.testing.assert_allclose([l for _, l in distributed], [l for _, l in reference], rtol=1e-5)
    (params, step), (expected, expected_step) = final_parameters(run_dir), final_parameters(reference_dir)
    assert step == expected_step == TOTAL_STEPS and sorted(params) == sorted(expected)
    for name in expected:
        assert params[name].dtype == np.float32
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-4, atol=2e-5, err_msg=name)


def wait_for(job, path: str, timeout: float) -> None:
    """Wait until `path` exists while `job` runs; fail the test if the job ends or `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if job.poll() is not None:
            pytest.fail(f"the job ended (exit {job.returncode}) before {path} appeared:\n"
                        f"{job.stdout.read().decode(errors='replace')}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run directory of the same training in one plain process (no mpiexec), trained once."""
    run_dir = tmp_path_factory.mktemp("multihost") / "one-process"
    launch.disttrain("train", CONFIG, *SETTINGS, "--run-dir", run_dir, timeout=120, cwd=launch.REPO)
    return run_dir


def test_two_hosts_of_two_ranks_train_like_one_process_and_the_gradients_cross_each_hosts_veth(
        fake_hosts, reference, tmp_path):
    before = fake_hosts.bytes_crossed()
    job = fake_hosts.mpiexec(train_argv(tmp_path / "run"), ranks_per_host=2, timeout=120, env=THREADS_UNSET,
                             cwd=launch.REPO, check=True)
    after = fake_hosts.bytes_crossed()

    assert "world 4 (2 node(s) x 2 ranks on this node)" in job.stdout, job.stdout
    # topology-aware by default: several nodes with two ranks each -> hierarchical bucket collectives
    assert "hierarchical (node, leaders, node)" in job.stdout, job.stdout
    assert_same_training(tmp_path / "run", reference)
    # Per step each host's two ranks own half of the flat buffer (2 of 4 equal chunks): the reduce-scatter
    # must bring it the other host's partial sums of that half, the allgather the other half's new
    # parameters. So each host receives (and sends) at least the whole gradient every step; MPI sends
    # padded float32 buffers, so the unpadded parameter count gives a lower bound.
    params, _ = final_parameters(tmp_path / "run")
    gradient_bytes = 4 * sum(p.size for p in params.values())
    payload = TOTAL_STEPS * gradient_bytes
    for host, start, end in zip(fake_hosts.hosts, before, after):
        received, sent = end.rx - start.rx, end.tx - start.tx
        print(f"{host.name}: received {received:,} B, sent {sent:,} B; gradient payload {TOTAL_STEPS} steps x "
              f"{gradient_bytes:,} B = {payload:,} B")
        assert received >= payload, f"{host.name} received {received} < {payload} bytes"
        assert sent >= payload, f"{host.name} sent {sent} < {payload} bytes"


def test_hierarchical_option_trains_like_one_process_and_each_host_receives_one_share_per_step(
        fake_hosts, reference, tmp_path):
    before = fake_hosts.bytes_crossed()
    job = fake_hosts.mpiexec(train_argv(tmp_path / "run", "--set", "optimizer.hierarchical=true"), ranks_per_host=2,
                             timeout=120, env=THREADS_UNSET, cwd=launch.REPO, check=True)
    after = fake_hosts.bytes_crossed()

    assert "ZeRO-1 reduce_scatter, hierarchical (node, leaders, node)" in job.stdout, job.stdout
    assert_same_training(tmp_path / "run", reference)
    # Only node leaders talk across hosts, each once per collective: a host receives the other host's
    # partial sums of its half and the other half's parameters - one gradient per step, where flat
    # ZeRO-1 with 2 ranks per host receives ~1.75 (reduce-scatter 1.0 + ring allgather 0.75).
    params, _ = final_parameters(tmp_path / "run")
    payload = TOTAL_STEPS * 4 * sum(p.size for p in params.values())
    for host, start, end in zip(fake_hosts.hosts, before, after):
        received = end.rx - start.rx
        print(f"{host.name}: received {received:,} B with hierarchical synchronisation; payload {payload:,} B")
        assert payload <= received < 1.5 * payload, f"{host.name} received {received} for a payload of {payload}"


def test_hierarchical_collectives_are_exact_with_blocked_and_uneven_placement(fake_hosts):
    program = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mh_hierarchical.py")
    for ranks_per_host, blocked in (([2, 2], True), ([1, 2], False)):
        job = fake_hosts.mpiexec([sys.executable, program], ranks_per_host=ranks_per_host, timeout=60,
                                 env={"OMP_NUM_THREADS": 1}, cwd=launch.REPO, check=True)
        report = json.loads(next(line for line in job.stdout.splitlines() if line.startswith("{")))
        assert report["world_size"] == sum(ranks_per_host) and report["leaders"] == 2, report
        assert report["blocked"] is blocked, report  # uneven nodes: reduce_scatter/allgather fall back to flat
        assert all(report["correct"].values()), report


def test_info_and_training_log_show_nodes_ranks_per_node_and_blas_threads_chosen_per_node(fake_hosts, tmp_path):
    cores = len(os.sched_getaffinity(0))
    even = fake_hosts.mpiexec([sys.executable, "-m", "disttrain", "info"], ranks_per_host=2, timeout=60,
                              env=THREADS_UNSET, cwd=launch.REPO, check=True).stdout
    names = [host.name for host in fake_hosts.hosts]
    threads = max(1, cores // 2)
    assert f"world size: 4; nodes: 2 ({', '.join(names)}); ranks on this node: 2" in even, even
    assert f"BLAS threads per rank: {threads} ({cores} cores / 2 ranks on this node)" in even, even
    for rank in range(4):
        assert f"rank {rank}: node {rank // 2}, {threads} BLAS thread(s)" in even, even

    # one rank on host 0, two on host 1: each node divides its own cores among its own ranks
    uneven = fake_hosts.mpiexec([sys.executable, "-m", "disttrain", "info"], ranks_per_host=[1, 2], timeout=60,
                                env=THREADS_UNSET, cwd=launch.REPO, check=True).stdout
    assert f"world size: 3; nodes: 2 ({', '.join(names)}); ranks on this node: 1" in uneven, uneven
    assert f"rank 0: node 0, {cores} BLAS thread(s)" in uneven, uneven
    for rank in (1, 2):
        assert f"rank {rank}: node 1, {threads} BLAS thread(s)" in uneven, uneven

    log = fake_hosts.mpiexec(train_argv(tmp_path / "run", "--set", "training.max_steps=2"), ranks_per_host=2,
                             timeout=60, env=THREADS_UNSET, cwd=launch.REPO, check=True).stdout
    assert (f"world 4 (2 node(s) x 2 ranks on this node), {threads} BLAS thread(s) per rank "
            f"({cores} cores / 2 ranks on this node)") in log, log


def test_sigkill_of_one_host_ends_training_within_seconds_and_resume_on_the_other_host_matches_one_process(
        fake_hosts, reference, tmp_path):
    run_dir = tmp_path / "run"
    # rank 0 stalls at step 50, so the host dies mid-run, after the step-40 checkpoint and before step 60's
    job = fake_hosts.start_mpiexec(train_argv(run_dir), ranks_per_host=2, timeout=90, cwd=launch.REPO,
                                   env={**THREADS_UNSET, "DISTTRAIN_FAULT": "sleep:0:50:80"})
    wait_for(job, str(run_dir / "checkpoints" / "step-00000040"), timeout=60)
    killed_at = time.monotonic()
    assert fake_hosts.kill_host(1) >= 3  # at least its proxy and two ranks
    output = job.communicate(timeout=30)[0].decode(errors="replace")
    ended_after = time.monotonic() - killed_at

    host = fake_hosts.hosts[1]
    assert job.returncode != 0 and job.returncode not in OUTER_TIMEOUT, output
    assert ended_after < 10, f"the job took {ended_after:.1f} s to end after host 1 died:\n{output}"
    assert f"connection to {host.address} ({host.name}) closed: every process on it was killed" in output, output

    # the surviving configuration: host 0 alone, 2 ranks, continues the 4-rank checkpoint (resharded)
    resumed = fake_hosts.mpiexec(train_argv(run_dir, "--resume"), ranks_per_host=2, hosts=[0], timeout=120,
                                 env=THREADS_UNSET, cwd=launch.REPO, check=True).stdout
    assert "world 2 (1 node(s) x 2 ranks on this node)" in resumed, resumed
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000040'} at step 40" in resumed, resumed
    assert_same_training(run_dir, reference)


def test_a_link_taken_down_ends_training_through_the_watchdog_before_mpiexec_timeout(fake_hosts, tmp_path):
    run_dir = tmp_path / "run"
    started_at = time.monotonic()
    job = fake_hosts.start_mpiexec(train_argv(run_dir, "--set", "training.epochs=400",
                                              "--set", "training.watchdog_seconds=8"),
                                   ranks_per_host=2, timeout=70, mpiexec_timeout=45, cwd=launch.REPO,
                                   env=THREADS_UNSET)
    wait_for(job, str(run_dir / "checkpoints" / "step-00000020"), timeout=40)
    cut_at = time.monotonic()
    fake_hosts.link_down(1)
    output = job.communicate(timeout=70)[0].decode(errors="replace")
    ended_after, total = time.monotonic() - cut_at, time.monotonic() - started_at

    assert job.returncode != 0 and job.returncode not in OUTER_TIMEOUT, output
    # the ranks of host 0 report the step and the collective they were stuck in, then abort the job
    assert "over the limit of 8 s (training.watchdog_seconds); waiting in collective" in output, output
    assert "TIMED OUT" not in output, output  # hydra's MPIEXEC_TIMEOUT (45 s) did not have to fire
    assert ended_after < 20 and total < 40, f"ended {ended_after:.1f} s after the cut:\n{output}"

    # Cut off, host 1's proxy and ranks cannot learn that the job ended (as on a real cluster, where they
    # would wait for TCP to give up); once the link is back they hear of it and end by themselves.
    assert fake_hosts.processes(1), "host 1's ranks ended although nothing could reach them"
    fake_hosts.link_up(1)
    deadline = time.monotonic() + 20
    while fake_hosts.processes(1) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not fake_hosts.processes(1), "host 1's ranks outlived the job by 20 s after the link came back"
