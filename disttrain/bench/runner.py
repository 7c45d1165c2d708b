"""The benchmark's entry point: `python -m disttrain.bench` (also `disttrain bench`, `make bench`).

Builds the list of runs (each system at each rank count it supports), then executes them in rounds —
A, B, C, ..., then A, B, C, ... again — each run a fresh `mpiexec -n N python -m disttrain.bench.worker`
from this interpreter's directory, so slow phases of the machine fall on every system alike. BLAS
threads per rank are cores // N (1 process x 2 threads, 2 ranks x 1 thread on 2 cores). Every
launch has a hydra MPIEXEC_TIMEOUT and a subprocess timeout, and an environment without inherited
PMI_* / OMPI_* / PMIX_* variables. The report goes to stdout and to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from . import SYSTEMS, report
from ..threads import cores_available
from .torch_ddp import torch_available
from .workload import PRESETS, Workload

TORCH_MISSING = "torch not installed: run make bench-deps"
DEFAULT_SYSTEMS = list(SYSTEMS)
LAUNCHER_VARIABLES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m disttrain.bench",
        description="Throughput, step-time breakdown and memory of disttrain beside a hand-written numpy + MPI "
                    "MLP and PyTorch DDP: same model, data, global batch, seed; systems interleaved in rounds.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="default: MLP 784-1024-1024-10, global batch 512; small: 784-256-10, batch 128; "
                             "cnn: the Fashion-MNIST CNN (conv16-pool-conv32-pool-Linear), batch 128, with a "
                             "per-op breakdown (conv forward, conv backward, pool, the rest)")
    parser.add_argument("--layers", help="MLP sizes in,hidden...,classes (overrides the preset), e.g. 784,1024,1024,10")
    parser.add_argument("--batch", type=int, help="global batch over all ranks (overrides the preset)")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per run (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps before them (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="times every system runs, interleaved (default 3)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, from {', '.join(SYSTEMS)} (default: all)")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    parser.add_argument("--cores", type=int, default=0,
                        help="cores to fill: threads per rank = cores // ranks (default: CPUs this process may use)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="disttrain's DataParallel bucket size")
    parser.add_argument("--torch-fused-adam", action="store_true", help="torch.optim.Adam(fused=True)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch systems even if installed")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="skip the optimizer-update micro-benchmark (disttrain vs torch fused Adam)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in every worker's environment (repeatable), e.g. DISTTRAIN_NUMBA=0 or "
                             "MPIR_CVAR_REDUCE_SCATTER_BLOCK_INTRA_ALGORITHM=pairwise")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take (MPIEXEC_TIMEOUT)")
    parser.add_argument("--profile", metavar="DIR",
                        help="also cProfile each disttrain run's measured steps into DIR (slows those runs)")
    parser.add_argument("--json", default="bench-results/bench.json",
                        help="where to write the full report (default bench-results/bench.json)")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines on stderr")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    for item in args.env:
        if "=" not in item or not item.split("=", 1)[0]:
            parser.error(f"--env takes KEY=VALUE, got {item!r}")
    args.extra_env = dict(item.split("=", 1) for item in args.env)
    return args


def make_workload(args) -> Workload:
    fields = dict(PRESETS[args.preset])
    if args.layers:
        if fields.get("model", "mlp") != "mlp":
            raise SystemExit(f"--layers sets the sizes of an MLP; the {args.preset!r} preset is a {fields['model']}")
        try:
            fields["layers"] = tuple(int(n) for n in args.layers.split(","))
        except ValueError:
            raise SystemExit(f"--layers must be comma-separated integers, got {args.layers!r}") from None
    fields["global_batch"] = args.batch or fields["global_batch"]
    try:
        return Workload(**fields, seed=args.seed, lr=args.lr)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def plan_runs(system_names, rank_counts, workload, torch_ok: bool):
    """[(system name, ranks)] to run, and [(system name, ranks, reason)] skipped."""
    runs, skipped = [], []
    for ranks in rank_counts:
        for name in system_names:
            system = SYSTEMS[name]
            if not system.runs_at(ranks):
                continue
            if system.module == "handwritten" and workload.model != "mlp":
                skipped.append((name, ranks, "the hand-written numpy reference is an MLP only"))
            elif workload.global_batch % ranks:
                skipped.append((name, ranks, f"global batch {workload.global_batch} does not split over {ranks} ranks"))
            elif system.needs_torch and not torch_ok:
                skipped.append((name, ranks, TORCH_MISSING))
            else:
                runs.append((name, ranks))
    return runs, skipped


def child_environment(threads: int, timeout: float, extra: dict | None = None) -> dict:
    """This environment less the launcher variables a parent MPI job may have left, plus `extra` and
    the thread counts."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(LAUNCHER_VARIABLES)}
    env.update(extra or {})
    for key in ("SLURM_NTASKS", "SLURM_NPROCS"):  # disttrain would take them for the world size it must see
        env.pop(key, None)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        env[key] = str(threads)
    env["MPIEXEC_TIMEOUT"] = str(int(max(timeout, 1)))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def source_version() -> str | None:
    """The git commit of the disttrain being measured (with '-dirty' for uncommitted changes), if known."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package_root, capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "disttrain"],
                               cwd=package_root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(name: str, ranks: int, workload: Workload, args, threads: int, out_prefix: str) -> dict:
    """Run one system once; {"ok": True, "ranks_data": [...]} or {"ok": False, "error": text}."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    argv = [mpiexec, "-launcher", "fork", "-n", str(ranks), sys.executable, "-m", "disttrain.bench.worker",
            "--system", name, "--ranks", str(ranks), "--workload", json.dumps(workload.to_dict()),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads),
            "--out", out_prefix, "--port", str(free_port()), "--bucket-mb", str(args.bucket_mb),
            "--timeout", str(args.timeout)]
    if args.torch_fused_adam:
        argv.append("--torch-fused-adam")
    if args.profile and SYSTEMS[name].module == "library":
        os.makedirs(args.profile, exist_ok=True)
        argv += ["--profile", os.path.join(os.path.abspath(args.profile), f"{name}-{ranks}")]
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, env=child_environment(threads, args.timeout, args.extra_env), capture_output=True,
                              text=True, timeout=args.timeout + 30)
    except subprocess.TimeoutExpired as error:
        return {"ok": False, "error": f"timed out after {args.timeout + 30:.0f} s\n{error.stderr or ''}"}
    seconds = time.monotonic() - started
    tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-25:])
    ranks_data = []
    for rank in range(ranks):
        path = f"{out_prefix}.rank{rank}.json"
        try:
            with open(path) as result:
                ranks_data.append(json.load(result))
        except (OSError, ValueError) as error:
            reason = (f"exit code {proc.returncode}" if proc.returncode
                      else f"rank {rank} wrote no readable result ({error})")
            return {"ok": False, "error": f"{reason}:\n{tail}" if tail else reason}
    outcome = {"ok": True, "ranks_data": ranks_data, "launch_seconds": seconds}
    if proc.returncode != 0:  # every rank had written its result: only the teardown failed
        outcome["warning"] = f"exit code {proc.returncode} after every rank wrote its result: {tail}"
    return outcome


def main(argv=None) -> int:
    """Run the benchmark; print the table; write the JSON. Exit code 1 if any run failed (a system whose
    run failed in some rounds is still reported from the others, and tried again in each round)."""
    args = parse_args(argv)
    workload = make_workload(args)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    try:
        rank_counts = [int(n) for n in args.ranks.split(",") if n.strip()]
    except ValueError:
        raise SystemExit(f"--ranks must be comma-separated integers, got {args.ranks!r}") from None
    if not rank_counts or min(rank_counts) < 1:
        raise SystemExit("--ranks needs positive rank counts")
    cores = args.cores or cores_available()
    torch_ok = torch_available() and not args.no_torch
    torch_note = None
    if any(SYSTEMS[n].needs_torch for n in names) and not torch_ok:
        torch_note = "torch skipped (--no-torch)" if args.no_torch else TORCH_MISSING
        print(torch_note, file=sys.stderr if args.quiet else sys.stdout, flush=True)
    runs, skipped = plan_runs(names, rank_counts, workload, torch_ok)
    if args.no_torch:
        skipped = [(n, r, "torch skipped (--no-torch)" if why == TORCH_MISSING else why) for n, r, why in skipped]
    if not runs:
        raise SystemExit("nothing to run: no selected system supports the selected rank counts")
    if any(r > cores for _, r in runs):
        print(f"note: more ranks than the {cores} cores: those runs are oversubscribed", file=sys.stderr)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = {run: [] for run in runs}
    failures, warnings = {}, {}  # (name, ranks) -> ["round i: what happened", ...]
    workdir = tempfile.mkdtemp(prefix="disttrain-bench-")
    try:
        for round_index in range(args.rounds):
            for name, ranks in runs:
                threads = max(1, cores // ranks)
                prefix = os.path.join(workdir, f"r{round_index}-{name}-{ranks}")
                outcome = launch(name, ranks, workload, args, threads, prefix)
                where = f"round {round_index + 1}/{args.rounds}  {name}@{ranks}"
                if outcome["ok"]:
                    results[(name, ranks)].append((round_index, outcome["ranks_data"]))
                    if outcome.get("warning"):
                        warnings.setdefault((name, ranks), []).append(f"round {round_index + 1}: {outcome['warning']}")
                        print(f"{where} warning: {outcome['warning']}", file=sys.stderr, flush=True)
                    if not args.quiet:
                        speed = report.quick_samples_per_s(outcome["ranks_data"])
                        print(f"{where} x{threads} thr: {speed:,.0f} samples/s", file=sys.stderr, flush=True)
                else:
                    failures.setdefault((name, ranks), []).append(f"round {round_index + 1}: {outcome['error']}")
                    print(f"{where} FAILED: {outcome['error']}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    config = {"preset": args.preset if not (args.layers or args.batch) else None,
              "workload": workload.to_dict(), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "systems": names, "ranks": rank_counts, "cores": cores, "bucket_mb": args.bucket_mb,
              "torch_available": torch_ok, "torch_note": torch_note, "torch_fused_adam": args.torch_fused_adam,
              "worker_env": args.extra_env,
              "python": sys.executable, "mpiexec": os.path.join(os.path.dirname(sys.executable), "mpiexec"),
              "profile_dir": os.path.abspath(args.profile) if args.profile else None,
              "order": [f"{name}@{ranks}" for name, ranks in runs], "source": source_version(),
              "load_average": [load_before, os.getloadavg()[0]] if load_before is not None else None}
    summary = report.summarise(config, runs, results, skipped, failures, warnings)
    print(report.format_table(summary))
    if not args.no_optimizer:
        from .optimizer import adam_update_times, format_times

        per_rank = -(-workload.param_count // max(rank_counts))
        summary["optimizer_update"] = adam_update_times(per_rank, with_torch=torch_ok)
        print("\n" + "\n".join(format_times(summary["optimizer_update"])))
    if args.profile:
        print(report.format_profiles(args.profile))
    report.write_json(summary, args.json)
    print(f"\nJSON report: {os.path.abspath(args.json)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
