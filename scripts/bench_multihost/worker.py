"""Run one benchmarked system on every rank of a job and report its steps; run under mpiexec.

    mpiexec ... python scripts/bench_multihost/worker.py --system disttrain --warmup 5 --steps 20
                    [--layers 784,1024,1024,10] [--batch 512] [--master HOST0_ADDRESS:PORT (torch)]

Every system trains the same MLP from the same initial weights on the same global batches (the
`make bench` workload: disttrain.bench.workload), each rank on its rows of every batch. After --warmup
steps the ranks meet, every rank reads its host's eth0 counters over --idle-seconds of doing nothing
(the background traffic to subtract), meets again, reads them, runs --steps measured steps, meets, and
reads them again. Then the global mean loss of the first batch under the final parameters and a digest
of every rank's parameters are taken. Rank 0 prints one JSON line with status "ok" (see `summary`), or
"unavailable" (this build rejects the system's options: nothing ran); a rank whose step raises prints
{"status": "crashed", "rank", "reason"} and ends the job (exit 3); a rank still running after --deadline
seconds prints every thread's stack (faulthandler) and exits 1, so a hang becomes a report. Each rank's
BLAS threads come from the environment (the driver sets 1).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import socket
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

from disttrain.bench.workload import Workload, initial_parameters, local_batches  # noqa: E402
from netdev import eth0_bytes  # noqa: E402
from systems import SYSTEMS, Unavailable  # noqa: E402


def build(system, workload, master: str | None, timeout_s: float):
    """The system's per-rank runner (COLLECTIVE: every rank builds it); `timeout_s` bounds torch's
    collectives."""
    initial = initial_parameters(workload)
    if system.framework == "disttrain":
        from disttrain_system import DisttrainRun
        return DisttrainRun(system, workload, initial)
    if not master:
        raise SystemExit("torch systems need --master HOST0_ADDRESS:PORT")
    from torch_system import TorchRun
    return TorchRun(system, workload, initial, master, timeout_s)


def measure(run, batches: list, warmup: int, steps: int, idle_seconds: float) -> dict:
    """Warm-up, idle baseline, measured steps and the final checks of one rank (see the module doc)."""
    losses = [run.step(*batches[i % len(batches)])["loss"] for i in range(warmup)]
    run.barrier()
    idle_before, idle_start = eth0_bytes(), time.perf_counter()
    time.sleep(idle_seconds)
    idle_after, idle_end = eth0_bytes(), time.perf_counter()
    run.barrier()
    before, window_start = eth0_bytes(), time.perf_counter()
    starts, phases = [], []
    for i in range(warmup, warmup + steps):
        starts.append(time.perf_counter())
        phases.append(run.step(*batches[i % len(batches)]))
    starts.append(time.perf_counter())
    run.barrier()
    after, window_end = eth0_bytes(), time.perf_counter()
    final_loss = run.eval_loss(*batches[0])
    return {"rank": run.rank, "host": socket.gethostname(), "step_s": [b - a for a, b in zip(starts, starts[1:])],
            "phases": phases, "losses": losses + [p["loss"] for p in phases], "final_loss": final_loss,
            "digest": run.param_digest(),
            "idle": {"received": idle_after[0] - idle_before[0], "sent": idle_after[1] - idle_before[1],
                     "seconds": idle_end - idle_start},
            "window": {"received": after[0] - before[0], "sent": after[1] - before[1],
                       "seconds": window_end - window_start}}


def summary(system, run, per_rank: list, warmup: int) -> dict:
    """Rank 0's report from every rank's `measure` result: step times (rank 0's, start to start), the
    median of each phase per rank, global mean losses (equal shares: the mean of the ranks' means),
    whether all replicas ended identical, and per host (its lowest rank's readings) the eth0 bytes of
    the idle baseline and of the measured window."""
    hosts = {}
    for record in per_rank:
        hosts.setdefault(record["host"], record)
    phase_names = [name for name in per_rank[0]["phases"][0] if name != "loss"]
    return {
        "status": "ok", "system": system.name, "world_size": run.size, "hosts": list(hosts),
        "ranks_per_host": run.size // len(hosts), "warmup": warmup, "steps": len(per_rank[0]["step_s"]),
        "step_s": per_rank[0]["step_s"],
        "phase_medians_s": {name: [statistics.median(p[name] for p in r["phases"]) for r in per_rank]
                            for name in phase_names},
        "losses": [statistics.fmean(values) for values in zip(*(r["losses"] for r in per_rank))],
        "final_loss": statistics.fmean(r["final_loss"] for r in per_rank),
        "params_identical": len({r["digest"] for r in per_rank}) == 1,
        "link_bytes": {host: {"idle": r["idle"], "window": r["window"]} for host, r in hosts.items()},
        "setup": run.describe(),
    }


def main(argv=None) -> int:
    """Parse arguments, build the system, measure, report on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    parser.add_argument("--layers", default="784,1024,1024,10", help="MLP widths: in, hidden..., classes")
    parser.add_argument("--batch", type=int, default=512, help="global batch, split evenly over the ranks")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--idle-seconds", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--master", help="host 0's address:port (torch's process group)")
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds after which a rank still running prints every thread's stack and exits "
                             "(a hang becomes a report; 0: never); torch's collectives time out at half of it")
    args = parser.parse_args(argv)
    if args.deadline > 0:
        faulthandler.dump_traceback_later(args.deadline, exit=True)
    system = SYSTEMS[args.system]
    workload = Workload(tuple(int(n) for n in args.layers.split(",")), args.batch, seed=args.seed, lr=1e-3)
    launcher_rank = int(os.environ.get("PMI_RANK", "0"))
    try:
        run = build(system, workload, args.master, args.deadline / 2 if args.deadline > 0 else 300)
    except Unavailable as reason:  # every rank rejects the same options, before any collective
        if launcher_rank == 0:
            print(json.dumps({"status": "unavailable", "system": system.name, "reason": str(reason)}), flush=True)
        return 0
    try:
        record = measure(run, local_batches(workload, run.rank, run.size), args.warmup, args.steps, args.idle_seconds)
        per_rank = run.gather(record)
        if run.rank == 0:
            print(json.dumps(summary(system, run, per_rank, args.warmup)), flush=True)
        run.close()
    except Exception as error:  # noqa: BLE001 - a crash is a result: report it, then end the whole job
        lines = traceback.format_exception_only(type(error), error)
        print(json.dumps({"status": "crashed", "system": system.name, "rank": launcher_rank,
                          "reason": "".join(lines).strip()}), flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
