"""Measure disttrain's scaling model on fake hosts with shaped links, fit it, predict, plot: the whole thing.

    .venv/bin/python scripts/scaling/run.py       # as root (namespaces); ~6 min on a quiet 2-core machine

1. Two fake hosts (scripts/fakehosts), each host's eth0 limited to --rate (default 1 Gbit/s, tc tbf).
2. Collective times over message sizes 4 KB-32 MB (measure_collectives.py) at 2 hosts x 1 rank and 2 hosts
   x 2 ranks (flat, and hierarchical at 2 ranks per host), and the bytes one call of each puts on the wire.
3. Training step times (train_steps.py: ZeRO-1 reduce-scatter, Adam, global batch 512, 1 BLAS thread per
   rank) for the benchmark MLP 784-1024-1024-10 and a 5.4x larger 784-2048-2048-2048-10, at 2x1 and 2x2
   (flat and hierarchical), --rounds times, interleaved; each figure is the median of the rounds' medians.
4. fit_model.py: alpha-beta fits, predicted vs measured step, extrapolation to 8-64 hosts at 1/10/100 Gbit/s.
5. Saves --out (docs/scaling.json), prints the markdown tables, draws --png (docs/scaling.png) with
   plot_scaling.py when matplotlib is installed (says so and goes on when it is not).
All hosts share this machine's cores, so every timing is disturbed by whatever else runs: before each
measurement it waits (up to --max-wait s) until fewer than --quiet other tasks are runnable, and records
the figure it saw. 2 hosts x 2 ranks oversubscribes a 2-core machine: its compute and intra-node phases
are slower than on real nodes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "scripts", "fakehosts"))
sys.path.insert(0, HERE)

import fakehosts  # noqa: E402
import fit_model  # noqa: E402
import plot_scaling  # noqa: E402

MODELS = {"benchmark MLP 784-1024-1024-10": ("1024,1024", 30),
          "large MLP 784-2048-2048-2048-10": ("2048,2048,2048", 16)}
CONFIGS = [(1, "flat"), (2, "flat"), (2, "hierarchical")]  # (ranks per host, synchronisation) at 2 hosts
ONE_THREAD = {"OMP_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1, "MKL_NUM_THREADS": 1}
TRAFFIC_BYTES = 16 << 20
TRAFFIC_CALLS = 4  # measure_collectives.py --repeat 3: one checked warm-up call + 3 timed


def runnable_others(seconds: float = 3.0) -> float:
    """Mean number of runnable tasks on this machine besides this one, sampled from /proc/loadavg."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open("/proc/loadavg") as handle:
            samples.append(int(handle.read().split()[3].split("/")[0]) - 1)
        time.sleep(0.1)
    return sum(samples) / len(samples)


def wait_for_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until fewer than `limit` other tasks are runnable on average: every timing
    here shares the machine's cores with whatever else runs. Returns the last figure (recorded)."""
    deadline = time.monotonic() + max_wait
    others = runnable_others()
    while others >= limit and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: {others:.1f} other runnable tasks (want < {limit:g})", flush=True)
        time.sleep(20)
        others = runnable_others()
    return others


def run_json(hosts, argv: list, ranks_per_host: int, timeout: float) -> dict:
    """Run argv on both hosts and return the JSON line its rank 0 printed (raise with the output on failure)."""
    job = hosts.mpiexec(argv, ranks_per_host=ranks_per_host, timeout=timeout, env=ONE_THREAD, cwd=REPO, check=True)
    return next(json.loads(line) for line in job.stdout.splitlines() if line.startswith("{"))


def measure_collectives(hosts, ranks_per_host: int, impls: str, workdir: str) -> dict:
    """measure_collectives.py over the default sizes on both hosts; its JSON."""
    out = os.path.join(workdir, f"collectives-{ranks_per_host}.json")
    hosts.mpiexec([sys.executable, os.path.join(HERE, "measure_collectives.py"), "--impl", impls, "--out", out],
                  ranks_per_host=ranks_per_host, timeout=1800, env=ONE_THREAD, cwd=REPO, check=True)
    with open(out) as handle:
        return json.load(handle)


def measure_traffic(hosts, ranks_per_host: int, impl: str, collective: str) -> dict:
    """Bytes each host received per call of one collective of TRAFFIC_BYTES (eth0 counters)."""
    before = hosts.bytes_crossed()
    hosts.mpiexec([sys.executable, os.path.join(HERE, "measure_collectives.py"), "--impl", impl, "--collectives",
                   collective, "--sizes", str(TRAFFIC_BYTES), "--repeat", str(TRAFFIC_CALLS - 1)],
                  ranks_per_host=ranks_per_host, timeout=600, env=ONE_THREAD, cwd=REPO, check=True)
    after = hosts.bytes_crossed()
    received = [(a.rx - b.rx) / TRAFFIC_CALLS for a, b in zip(after, before)]
    return {"config": f"2x{ranks_per_host}", "impl": impl, "collective": collective, "bytes": TRAFFIC_BYTES,
            "received_per_host_per_call": received, "ratio_to_buffer": max(received) / TRAFFIC_BYTES}


def train(hosts, ranks_per_host: int, impl: str, hidden: str, steps: int, workdir: str) -> dict:
    """train_steps.py on both hosts; its summary plus the bytes each host received and sent per step."""
    run_dir = tempfile.mkdtemp(dir=workdir)
    argv = [sys.executable, os.path.join(HERE, "train_steps.py"), "--hidden", hidden, "--steps", steps,
            "--run-dir", run_dir] + (["--hierarchical"] if impl == "hierarchical" else [])
    before = hosts.bytes_crossed()
    summary = run_json(hosts, argv, ranks_per_host, timeout=1800)
    after = hosts.bytes_crossed()
    summary["received_per_host"] = [a.rx - b.rx for a, b in zip(after, before)]
    summary["sent_per_host"] = [a.tx - b.tx for a, b in zip(after, before)]
    return summary


def median_of_rounds(rounds: list) -> dict:
    """One record from several rounds of the same run: each timing field the median of the rounds' (one
    round disturbed by another program does not move it), every round's value kept."""
    merged = dict(rounds[0])
    for field in ("step_s", "compute_s", "comm_s", "optimizer_s", "slowest_compute_s", "least_comm_s",
                  "other_runnable_tasks"):
        merged[field] = statistics.median(r[field] for r in rounds)
        merged[f"{field}_rounds"] = [r[field] for r in rounds]
    return merged


def main(argv=None) -> int:
    """Run every measurement, analyse, save, print, plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate of each host's link")
    parser.add_argument("--rounds", type=int, default=3, help="training runs per configuration")
    parser.add_argument("--quiet", type=float, default=1.0,
                        help="before each measurement wait until fewer other tasks than this are runnable")
    parser.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for quiet, each time")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "scaling.json"))
    parser.add_argument("--png", default=os.path.join(REPO, "docs", "scaling.png"))
    args = parser.parse_args(argv)

    reason = fakehosts.preflight(install=True)
    if reason:
        print(f"scaling: cannot run fake hosts here: {reason}", file=sys.stderr)
        return 1
    started = datetime.datetime.now(datetime.timezone.utc)
    measured = {"collectives": {}, "traffic": [], "training": []}
    quiet = lambda: wait_for_quiet(args.quiet, args.max_wait)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="disttrain-scaling-") as workdir, fakehosts.FakeHosts(2) as hosts:
        hosts.shape(rate=args.rate, burst="256kb", latency="50ms")
        for ranks_per_host in (1, 2):
            impls = "flat" if ranks_per_host == 1 else "flat,hierarchical"
            others = quiet()
            print(f"collectives, 2 hosts x {ranks_per_host} rank(s): {impls}", flush=True)
            result = measure_collectives(hosts, ranks_per_host, impls, workdir)
            measured["collectives"][f"2x{ranks_per_host}"] = {**result, "other_runnable_tasks": others}
        for ranks_per_host, impl in CONFIGS:
            for collective in ("allreduce", "reduce_scatter", "allgather"):
                measured["traffic"].append(measure_traffic(hosts, ranks_per_host, impl, collective))
        rounds = {}
        for round_index in range(args.rounds):
            for model, (hidden, steps) in MODELS.items():
                # flat and hierarchical take turns going first, so a slow spell does not favour one
                for ranks_per_host, impl in CONFIGS if round_index % 2 == 0 else [CONFIGS[0], CONFIGS[2], CONFIGS[1]]:
                    others = quiet()
                    print(f"training round {round_index + 1}/{args.rounds}: {model}, 2 hosts x {ranks_per_host}, "
                          f"{impl}", flush=True)
                    summary = train(hosts, ranks_per_host, impl, hidden, steps, workdir)
                    rounds.setdefault((model, ranks_per_host, impl), []).append(
                        {"model": model, **summary, "other_runnable_tasks": others})
        measured["training"] = [median_of_rounds(r) for r in rounds.values()]
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            timeout=30).stdout.strip()
    data = {"generated": started.isoformat(timespec="seconds"), "source_commit": commit,
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "link": {"rate": args.rate, "burst": "256kb", "latency": "50ms", "shaper": "tc tbf on each host's eth0"},
            "measured": measured}
    data["analysis"] = fit_model.analyse(measured)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(data, handle, indent=1)
    print(f"wrote {args.out}\n")
    print(fit_model.markdown(measured, data["analysis"]))
    for row in measured["traffic"]:
        print(f"traffic {row['config']} {row['impl']:>12} {row['collective']:>14}: "
              f"{row['ratio_to_buffer']:.2f} x the buffer received per host per call")
    status = plot_scaling.main([args.out, "-o", args.png])
    if status:
        print(f"scaling: no plot (see above); the measurements are in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
