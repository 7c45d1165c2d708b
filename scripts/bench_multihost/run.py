"""Side by side across fake hosts with shaped links: disttrain (exact with and without overlap, each
compression mode) against PyTorch DDP (plain, fp16_compress_hook, PowerSGD hook).

    make bench-multihost                                  # as root; ARGS="..." passes options
    .venv/bin/python scripts/bench_multihost/run.py --rates 1gbit,10gbit   # the systems at 10 Gbit/s too

1. Two fake hosts (scripts/fakehosts: network namespaces on a private bridge, each with its own
   /dev/shm, so MPI really uses TCP between them). What one TCP stream reaches through each host's
   link shaped by `tc tbf` to each --link-rates rate (and unshaped) is measured (link_rate.py).
2. For each --rates rate and each --configs configuration (hosts x ranks per host), --rounds rounds,
   each running every system once in turn (A B C ... A B C ...), one mpiexec job per system
   (worker.py): the same MLP, initial weights, global batches and Adam for all, 1 BLAS thread per rank.
   A system that crashed (or hung past --job-timeout) is reported with its message and not run again
   at that rate and configuration.
3. With --fit, disttrain's collectives are timed on the same links (scripts/scaling) and the alpha-beta
   model's step prediction, overlap included, is set against the measured disttrain steps.
4. Writes --out (JSON: settings, every job, every summary, link rates, load) and prints the markdown
   table (also written next to --out as .md). Exits 1, saying why, when a system's hosts sent fewer
   bytes than its gradients need (traffic that did not cross the links) or the exact disttrain run
   failed; exits 2 with a one-line reason where fake hosts cannot run (not root, namespaces refused).
All hosts share this machine's cores (and tc's shaping costs CPU too): the load is recorded before
every job (--quiet N waits before each round until fewer than N other tasks are runnable); compare
ratios from one invocation, not absolute times across invocations.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "scripts", "fakehosts"))
sys.path.insert(0, HERE)

import fakehosts  # noqa: E402
import prediction  # noqa: E402
import report  # noqa: E402
from systems import EXACT, parse_systems  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1, "MKL_NUM_THREADS": 1}
FIT_SIZES = [4 << 10, 16 << 10, 64 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="2x1,2x2", help="hosts x ranks per host, comma-separated")
    parser.add_argument("--systems", default="all", help="comma-separated (see systems.py), or all")
    parser.add_argument("--rates", default="1gbit", help="tc tbf rates to run the systems at (e.g. 1gbit,10gbit)")
    parser.add_argument("--link-rates", default="1gbit,10gbit,unshaped", help="rates whose reach is measured")
    parser.add_argument("--burst", default="256kb", help="tc tbf burst")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per job")
    parser.add_argument("--layers", default="784,1024,1024,10")
    parser.add_argument("--batch", type=int, default=512, help="global batch")
    parser.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True,
                        help="time the collectives and compare the alpha-beta prediction")
    parser.add_argument("--quiet", type=float, default=0,
                        help="before each round wait until fewer other tasks than this are runnable (0: never)")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for quiet, each round")
    parser.add_argument("--job-timeout", type=float, default=90,
                        help="seconds before a job is killed; a rank still running 20 s before reports its stack")
    parser.add_argument("--out", default=os.path.join(REPO, "bench-results", "multihost.json"))
    parser.add_argument("--check", action="store_true", help="only say whether this machine can run it")
    args = parser.parse_args(argv)
    args.layers = tuple(int(n) for n in args.layers.split(","))
    args.configs = [tuple(int(n) for n in c.lower().split("x")) for c in args.configs.split(",")]
    args.rates = [r for r in args.rates.split(",") if r]
    args.link_rates = [r for r in args.link_rates.split(",") if r]
    return args


def load_sample(seconds: float = 0.5) -> dict:
    """The 1-minute load average and the mean number of other runnable tasks over `seconds`."""
    samples, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open("/proc/loadavg") as handle:
            fields = handle.read().split()
        samples.append(int(fields[3].split("/")[0]) - 1)
        time.sleep(0.05)
    return {"loadavg_1min": float(fields[0]), "runnable_others": sum(samples) / len(samples)}


def wait_for_quiet(limit: float, max_wait: float) -> dict:
    """Wait (up to max_wait s) until fewer than `limit` other tasks are runnable on average over 3 s;
    the last sample (recorded with the round)."""
    deadline = time.monotonic() + max_wait
    sample = load_sample(3.0)
    while sample["runnable_others"] >= limit and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: {sample['runnable_others']:.1f} other runnable tasks "
              f"(want < {limit:g})", flush=True)
        time.sleep(20)
        sample = load_sample(3.0)
    return sample


def set_rate(hosts, rate: str, burst: str) -> None:
    """Shape every host's link to `rate` ("unshaped": remove the limit)."""
    if rate == "unshaped":
        hosts.unshape()
    else:
        hosts.shape(rate=rate, burst=burst, latency="50ms")


def measure_link(hosts, rate: str, burst: str) -> dict:
    """What one TCP stream from host 0 to host 1 reaches at `rate`."""
    set_rate(hosts, rate, burst)
    job = hosts.mpiexec([sys.executable, os.path.join(HERE, "link_rate.py")], ranks_per_host=1, hosts=[0, 1],
                        timeout=120, env=ONE_THREAD, cwd=REPO, check=True)
    result = next(json.loads(line) for line in job.stdout.splitlines() if line.startswith("{"))
    return {"rate": rate, "burst": "-" if rate == "unshaped" else burst, **result}


def crash_reason(stdout: str, stderr: str, returncode: int) -> str:
    """The most telling line of a failed job: a C++ abort's what(), else a rank's reported exception,
    else where the ranks hung (the stacks worker.py dumps at its deadline), else the last line printed."""
    text = stdout + "\n" + stderr
    for line in text.splitlines():
        if "what():" in line:
            return line.split("what():", 1)[1].strip()
    for line in stdout.splitlines():
        if line.startswith("{") and '"crashed"' in line:
            return json.loads(line)["reason"]
    if "Timeout (" in text:
        return "hung (no progress until the deadline); threads were in " + ", ".join(hung_frames(text))
    if "APPLICATION TIMED OUT" in text:
        return "timed out (MPIEXEC_TIMEOUT)"
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("=")]
    return f"exit {returncode}: {lines[-1] if lines else 'no output'}"


def hung_frames(text: str) -> list:
    """The innermost frame (file:line function) of each thread in faulthandler's stack dumps, once each."""
    frames, expect_frame = [], False
    for line in text.splitlines():
        if line.startswith("Thread 0x") or line.startswith("Current thread 0x"):
            expect_frame = True
        elif expect_frame and line.strip().startswith("File "):
            path, _, rest = line.strip()[len("File "):].partition(", line ")
            number, _, function = rest.partition(" in ")
            frame = f"{os.path.basename(path.strip(chr(34)))}:{number} {function}"
            if frame not in frames:
                frames.append(frame)
            expect_frame = False
    return frames or ["(no stack printed)"]


def run_system(hosts, system, config: tuple, args, port: int) -> dict:
    """One job of `system` on config = (hosts, ranks per host); its record (status ok/unavailable/crashed)."""
    n_hosts, per_host = config
    argv = [sys.executable, os.path.join(HERE, "worker.py"), "--system", system.name,
            "--layers", ",".join(map(str, args.layers)), "--batch", args.batch, "--warmup", args.warmup,
            "--steps", args.steps, "--master", f"{hosts.addresses[0]}:{port}",
            "--deadline", max(5.0, args.job_timeout - 20)]
    record = {"system": system.name, "config": f"{n_hosts}x{per_host}", "load": load_sample()}
    before = hosts.bytes_crossed()
    try:
        job = hosts.mpiexec(argv, ranks_per_host=per_host, hosts=list(range(n_hosts)), timeout=args.job_timeout,
                            env=ONE_THREAD, cwd=REPO)
    except TimeoutError as error:
        hosts.reap()
        return {**record, "status": "crashed", "reason": f"timed out: {str(error).splitlines()[0]}"}
    after = hosts.bytes_crossed()
    record["elapsed_s"] = job.elapsed
    record["job_bytes"] = [{"sent": a.tx - b.tx, "received": a.rx - b.rx} for a, b in zip(after, before)][:n_hosts]
    lines = json_records(job.stdout)
    done = [line for line in lines if line.get("status") in ("ok", "unavailable")]
    if job.returncode == 0 and done:
        return {**record, **done[0]}
    hosts.reap()
    return {**record, "status": "crashed", "reason": crash_reason(job.stdout, job.stderr, job.returncode)}


def json_records(text: str) -> list:
    """Every JSON object in a job's output. Ranks print one a line, but two ranks' lines can arrive
    interleaved on one line (a crashing job's), so objects are read one after another from each line
    that starts with one, and whatever is not JSON is left to crash_reason."""
    decoder, records = json.JSONDecoder(), []
    for line in text.splitlines():
        position = 0
        while line.startswith("{", position):
            try:
                record, position = decoder.raw_decode(line, position)
            except json.JSONDecodeError:
                break
            records.append(record)
    return records


def measure_collectives(hosts, config: tuple, workdir: str) -> dict:
    """disttrain's collectives timed over FIT_SIZES on this configuration (scripts/scaling)."""
    n_hosts, per_host = config
    out = os.path.join(workdir, f"collectives-{n_hosts}x{per_host}.json")
    impls = "flat,hierarchical" if per_host > 1 else "flat"
    hosts.mpiexec([sys.executable, os.path.join(REPO, "scripts", "scaling", "measure_collectives.py"), "--impl", impls,
                   "--sizes", ",".join(map(str, FIT_SIZES)), "--out", out], ranks_per_host=per_host,
                  hosts=list(range(n_hosts)), timeout=600, env=ONE_THREAD, cwd=REPO, check=True)
    with open(out) as handle:
        return json.load(handle)


def benchmark(hosts, systems, args) -> tuple[list, dict]:
    """Every rate, configuration, round and system (interleaved); the job records and collective fits."""
    runs, collectives, port = [], {}, random.randrange(20000, 40000)
    with tempfile.TemporaryDirectory(prefix="disttrain-mhbench-") as workdir:
        for rate in args.rates:
            set_rate(hosts, rate, args.burst)
            for config in args.configs:
                crashed = set()  # a system that crashed is not run again at this rate and configuration
                for round_index in range(args.rounds):
                    if args.quiet > 0:
                        wait_for_quiet(args.quiet, args.max_wait)
                    for system in [s for s in systems if s.name not in crashed]:
                        port += 1
                        record = {"rate": rate, "round": round_index,
                                  **run_system(hosts, system, config, args, port)}
                        runs.append(record)
                        if record["status"] == "crashed":
                            crashed.add(system.name)
                        print(f"{rate} {record['config']} round {round_index + 1}/{args.rounds} {system.name}: "
                              f"{describe(record)}", flush=True)
                if args.fit:
                    collectives.setdefault(rate, {})[f"{config[0]}x{config[1]}"] = measure_collectives(
                        hosts, config, workdir)
    return runs, collectives


def describe(record: dict) -> str:
    """One progress line's worth of a job record."""
    if record["status"] != "ok":
        return f"{record['status']}: {report.short(record.get('reason'))}"
    step = sorted(record["step_s"])[len(record["step_s"]) // 2]
    return f"median step {step * 1e3:.0f} ms, load {record['load']['loadavg_1min']:.1f}"


def main(argv=None) -> int:
    """Check the machine, measure, analyse, save, print; the exit code says whether it all held."""
    args = parse_args(argv)
    reason = fakehosts.preflight(install=True)
    if reason:
        print(f"bench-multihost: cannot run here: {reason}", file=sys.stderr)
        return 2
    if args.check:
        print("bench-multihost: this machine can run fake hosts")
        return 0
    systems = parse_systems(args.systems)
    notes = []
    if importlib.util.find_spec("torch") is None and any(s.framework == "torch" for s in systems):
        systems = [s for s in systems if s.framework != "torch"]
        notes.append("PyTorch is not installed (make bench-deps): its systems are left out")
        print(f"bench-multihost: {notes[-1]}", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_sample()
    with fakehosts.FakeHosts(max(n for n, _ in args.configs)) as hosts:
        links = [measure_link(hosts, rate, args.burst) for rate in args.link_rates]
        for link in links:
            print(f"link shaped to {link['rate']}: one TCP stream reached {link['payload_gbit_s']:.2f} Gbit/s",
                  flush=True)
        runs, collectives = benchmark(hosts, systems, args)
    results = report.analyse(runs, args.layers, args.batch)
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            timeout=30).stdout.strip()
    data = {"generated": started.isoformat(timespec="seconds"), "source_commit": commit,
            "command": " ".join([os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])]),
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_start": load_start, "load_end": load_sample()},
            "settings": {"configs": [f"{n}x{p}" for n, p in args.configs], "systems": [s.name for s in systems],
                         "rates": args.rates, "burst": args.burst, "rounds": args.rounds, "warmup": args.warmup,
                         "steps": args.steps, "layers": list(args.layers), "batch": args.batch, "lr": 1e-3,
                         "blas_threads_per_rank": 1, "shaper": "tc tbf on each host's eth0"},
            "notes": notes, "method": report.METHOD, "link_rates": links, "results": results,
            "model": prediction.model_rows(results, collectives), "collectives": collectives, "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(data, handle, indent=1)
    table = report.markdown(data)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as handle:
        handle.write(table + "\n")
    print(f"\nwrote {args.out}\n\n{table}")
    return verdict(results)


def verdict(results: list) -> int:
    """0 when every run's bytes crossed the links and the exact disttrain run worked, else 1 (saying why)."""
    failures = report.byte_failures(results)
    failures += [f"{r['system']} at {r['config']}, {r['rate']}: {r['status']}: {report.short(r['reason'])}"
                 for r in results if r["system"] == EXACT and r["status"] != "ok"]
    for failure in failures:
        print(f"bench-multihost: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
