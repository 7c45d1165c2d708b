"""The GPT benchmark: disttrain against PyTorch on the same byte-level GPT, weights, recipe and data.

    python -m disttrain.bench.gpt [--steps 30] [--rounds 3] [--curve-steps 300] [--json bench-results/gpt.json]

1. Speed, in rounds (every system once per round, so a busy phase of the machine hits all alike):
   disttrain, torch with fused scaled_dot_product_attention and torch with attention written out, each
   on 1 process x (cores) threads and on (cores) ranks x 1 thread (torch: DistributedDataParallel over
   gloo). Tokens/s is global tokens over the slowest rank's time for the measured steps. The anchors
   are the faster torch variant in the same round; a ratio is taken round by round, then the median.
2. Step-time breakdown per system (one profiled run each); the peak resident memory per rank (speed runs).
3. Learning: `curve_steps` steps of disttrain and of torch (fused attention) on 1 process from the same
   weights and batches; the loss of every step and the validation loss (every validation window)
   at the start, at each third and at the end.
Targets: 1 process >= 0.8x torch; (cores) ranks >= 1.2x torch DDP; final validation loss within 2%.
The report goes to stdout and to the JSON file (and the loss curves to a PNG beside it if matplotlib
is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..threads import cores_available
from .runner import child_environment, free_port, source_version
from .torch_ddp import torch_available

TARGETS = {"one_process": 0.8, "ranks": 1.2, "validation_loss": 0.02}
CATEGORIES = ("matmuls", "attention", "layernorm", "embedding", "gelu", "loss", "residual adds", "optimizer",
              "communication", "other")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m disttrain.bench.gpt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per speed run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="speed rounds (default 3)")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps of each breakdown run (0: none)")
    parser.add_argument("--curve-steps", type=int, default=300, help="steps of the learning curves (0: none)")
    parser.add_argument("--cores", type=int, default=0, help="cores to fill (default: CPUs this process may use)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument("--json", default="bench-results/gpt.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.profile_steps < 0 or args.curve_steps < 0:
        parser.error("--steps and --rounds must be >= 1; --warmup, --profile-steps and --curve-steps >= 0")
    return args


def run_worker(side: str, ranks: int, threads: int, mode: str, steps: int, warmup: int, args, workdir: str,
               extra: tuple = ()) -> list:
    """Launch one worker run; returns every rank's record (raises RuntimeError with its output on failure)."""
    prefix = os.path.join(workdir, f"{side}-{ranks}-{mode}-{time.monotonic_ns()}")
    command = [sys.executable, "-m", "disttrain.bench.gpt_worker", "--side", side, "--mode", mode,
               "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads), "--out", prefix,
               "--port", str(free_port()), *extra]
    if ranks > 1:
        command = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-launcher", "fork", "-n", str(ranks),
                   *command]
    env = child_environment(threads, args.timeout)
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout + 30)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{side} x{ranks} {mode}: timed out\n{error.stderr or ''}") from None
    try:
        records = []
        for rank in range(ranks):
            with open(f"{prefix}.rank{rank}.json") as handle:
                records.append(json.load(handle))
        return records
    except (OSError, ValueError):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-30:])
        raise RuntimeError(f"{side} x{ranks} {mode}: exit code {proc.returncode}\n{tail}") from None


def speed_runs(args, cores: int, sides: list, workdir: str) -> dict:
    """{(side, ranks): [tokens/s per round]} and the phases, measured round after round."""
    plan = [(side, ranks) for ranks in (1, cores) for side in sides] if cores > 1 else [(s, 1) for s in sides]
    results = {run: [] for run in plan}
    phases, peaks = {}, {}
    for round_index in range(args.rounds):
        for side, ranks in plan:
            records = run_worker(side, ranks, cores // ranks, "speed", args.steps, args.warmup, args, workdir)
            results[(side, ranks)].append(records[0]["tokens_per_s"])
            phases.setdefault((side, ranks), []).append(records[0]["phases"])
            previous = peaks.get((side, ranks), [0] * ranks)
            peaks[(side, ranks)] = [max(a, r["peak_rss_bytes"]) for a, r in zip(previous, records)]
            print(f"round {round_index + 1}/{args.rounds}  {side} {ranks} x {cores // ranks} threads: "
                  f"{records[0]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
    return {"tokens_per_s": results, "phases": phases, "peak_rss_bytes": peaks}


def ratios(tokens: dict, ranks: int, sides: list) -> dict | None:
    """Round-by-round disttrain / (faster torch variant) at `ranks`, and their median."""
    torch_sides = [s for s in sides if s.startswith("torch") and (s, ranks) in tokens]
    if ("disttrain", ranks) not in tokens or not torch_sides:
        return None
    rounds = len(tokens[("disttrain", ranks)])
    per_round = []
    for i in range(rounds):
        anchor = max(tokens[(s, ranks)][i] for s in torch_sides)
        per_round.append(tokens[("disttrain", ranks)][i] / anchor)
    return {"per_round": per_round, "median": float(np.median(per_round))}


def main(argv=None) -> int:
    args = parse_args(argv)
    cores = args.cores or cores_available()
    sides = ["disttrain"] + (["torch-fused", "torch-written"] if torch_available() else [])
    if len(sides) == 1:
        print("torch not installed (make bench-deps): disttrain alone, no ratios", file=sys.stderr)
    workdir = tempfile.mkdtemp(prefix="disttrain-gpt-bench-")
    load_before = os.getloadavg()[0]
    speed = speed_runs(args, cores, sides, workdir)
    tokens = speed["tokens_per_s"]
    summary = {"config": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "cores": cores,
                          "source": source_version(), "python": sys.executable},
               "tokens_per_s": {f"{s}@{r}": v for (s, r), v in tokens.items()},
               "phases": {f"{s}@{r}": v for (s, r), v in speed["phases"].items()},
               "peak_rss_bytes": {f"{s}@{r}": v for (s, r), v in speed["peak_rss_bytes"].items()},
               "ratio_one_process": ratios(tokens, 1, sides), "ratio_ranks": ratios(tokens, cores, sides)}
    if args.profile_steps:
        summary["breakdown"] = {}
        for side, ranks in tokens:
            records = run_worker(side, ranks, cores // ranks, "profile", args.profile_steps, 3, args, workdir)
            summary["breakdown"][f"{side}@{ranks}"] = records[0]["breakdown"]
    if args.curve_steps:
        third = max(args.curve_steps // 3, 1)
        eval_at = ",".join(str(s) for s in sorted({0, third, 2 * third, args.curve_steps}))
        summary["curves"] = {}
        for side in sides[:2]:
            record = run_worker(side, 1, cores, "curve", args.curve_steps, 0, args, workdir,
                                ("--eval-at", eval_at))[0]
            summary["curves"][side] = {"losses": record["losses"], "eval": record["eval"]}
    summary["config"]["load_average"] = [load_before, os.getloadavg()[0]]
    print(format_report(summary, cores))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(summary, handle, indent=1)
    plot_curves(summary, os.path.splitext(args.json)[0] + "-curves.png")
    print(f"\nJSON report: {os.path.abspath(args.json)}")
    return 0


def format_report(summary: dict, cores: int) -> str:
    lines = ["GPT benchmark (4 layers x 4 heads x 128 wide, context 128, tied embeddings, 842,496 parameters; "
             "AdamW lr 1e-3 wd 0.1; global batch 32 windows of the standard library's .py files)",
             f"source {summary['config']['source']}, load average {summary['config'].get('load_average')}", "",
             f"{'system':<16}{'ranks x threads':>16}{'tokens/s (median)':>20}   per round"]
    for key, values in summary["tokens_per_s"].items():
        side, ranks = key.split("@")
        threads = cores // int(ranks)
        lines.append(f"{side:<16}{ranks + ' x ' + str(threads):>16}{np.median(values):>20,.0f}   "
                     + ", ".join(f"{v:,.0f}" for v in values))
    for name, label, target in (("ratio_one_process", "1 process", TARGETS["one_process"]),
                                ("ratio_ranks", f"{cores} ranks", TARGETS["ranks"])):
        ratio = summary.get(name)
        if ratio:
            verdict = "meets" if ratio["median"] >= target else "MISSES"
            lines.append(f"disttrain / faster torch, {label}: {ratio['median']:.2f}x (rounds: "
                         + ", ".join(f"{r:.2f}" for r in ratio["per_round"]) + f"); target >= {target}x: {verdict}")
    if "breakdown" in summary:
        keys = list(summary["breakdown"])
        lines += ["", "step-time breakdown, ms per step (rank 0):", f"{'':<15}" + "".join(f"{k:>18}" for k in keys)]
        for category in CATEGORIES:
            lines.append(f"{category:<15}" + "".join(f"{summary['breakdown'][k].get(category, 0) * 1e3:>18.1f}"
                                                      for k in keys))
    lines += ["", "peak resident memory per rank, MiB (speed runs, largest over the rounds): " + "; ".join(
        f"{k} {'/'.join(str(round(b / 2**20)) for b in v)}" for k, v in summary["peak_rss_bytes"].items())]
    if "curves" in summary:
        curves = summary["curves"]
        sides = list(curves)
        lines += ["", "learning, 1 process, same weights and batches: train loss (mean of the 10 steps ending at)",
                  f"{'step':>6}" + "".join(f"{s:>16}" for s in sides)]
        steps = len(curves[sides[0]]["losses"])
        for step in sorted({10, *range(50, steps + 1, 50), steps}):
            if step <= steps:
                lines.append(f"{step:>6}" + "".join(f"{np.mean(curves[s]['losses'][max(step - 10, 0):step]):>16.4f}"
                                                     for s in sides))
        lines.append("validation loss (nats/byte, every validation window):")
        for step in curves[sides[0]]["eval"]:
            lines.append(f"{step:>6}" + "".join(f"{curves[s]['eval'][step]:>16.4f}" for s in sides))
        if len(sides) > 1:
            final = list(curves[sides[0]]["eval"])[-1]
            ours, theirs = curves[sides[0]]["eval"][final], curves[sides[1]]["eval"][final]
            gap = abs(ours - theirs) / theirs
            verdict = "meets" if gap <= TARGETS["validation_loss"] else "MISSES"
            lines.append(f"final validation loss: disttrain {ours:.4f}, {sides[1]} {theirs:.4f}: {gap:.2%} apart; "
                         f"target within 2%: {verdict}")
    return "\n".join(lines)


def plot_curves(summary: dict, path: str) -> None:
    """The training-loss curves of both sides in a PNG (skipped without matplotlib or curves)."""
    if "curves" not in summary:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    for side, curve in summary["curves"].items():
        axes.plot(range(1, len(curve["losses"]) + 1), curve["losses"], label=f"{side} (train)", linewidth=0.8)
        steps = [int(s) for s in curve["eval"]]
        axes.plot(steps, list(curve["eval"].values()), "o--", label=f"{side} (validation)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss, nats/byte")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
