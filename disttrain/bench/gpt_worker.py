"""One run of one side of the GPT benchmark on one rank: `[mpiexec -n N] python -m disttrain.bench.gpt_worker`.

The runner (gpt.py) launches it; it is not meant to be run by hand. Modes:
  speed    `warmup` steps, a barrier, then `steps` timed steps; the slowest rank's time counts
  curve    `steps` steps logging every step's loss; the validation loss over every validation window
           at each step listed in --eval-at (one process)
  profile  the step-time breakdown over `steps` steps after `warmup` (see gpt_systems)
Each rank writes OUT.rank<r>.json: the losses, times, breakdown and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from .gpt_recipe import Recipe, initial_state, rank_batches, text_data
from .recorder import StepRecorder
from .worker import peak_rss_bytes

SIDES = ("disttrain", "torch-fused", "torch-written")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m disttrain.bench.gpt_worker")
    parser.add_argument("--side", choices=SIDES, required=True)
    parser.add_argument("--mode", choices=("speed", "curve", "profile"), required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--threads", type=int, required=True, help="BLAS / torch threads per rank")
    parser.add_argument("--eval-at", default="", help="curve: comma-separated steps to evaluate at")
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def build(args, recipe):
    rank, ranks = int(os.environ.get("PMI_RANK", 0)), int(os.environ.get("PMI_SIZE", 1))
    state = initial_state(recipe)
    if args.side == "disttrain":
        from .gpt_systems import DisttrainSide
        return DisttrainSide(recipe, state, args.threads)
    from .gpt_systems import TorchSide
    return TorchSide(recipe, state, args.threads, args.side.split("-")[1], rank, ranks, args.port)


def main(argv=None) -> None:
    args = parse_args(argv)
    recipe = Recipe(seed=args.seed)
    train, validation = text_data(recipe)
    side = build(args, recipe)
    batches = rank_batches(train, recipe, side.ranks, side.rank)
    record = {"side": args.side, "mode": args.mode, "rank": side.rank, "ranks": side.ranks, "threads": args.threads,
              "recipe": recipe.to_dict()}
    recorder = StepRecorder(side.phases)
    losses = [_step(side, batches, recorder) for _ in range(args.warmup)]
    if args.mode == "speed":
        recorder.clear()
        side.barrier()
        started = time.perf_counter()
        losses = [_step(side, batches, recorder) for _ in range(args.steps)]
        record["seconds"] = side.allreduce_max(time.perf_counter() - started)
        record["tokens_per_s"] = args.steps * recipe.batch * recipe.block_size / record["seconds"]
        record["phases"] = _phase_means(recorder)
    elif args.mode == "profile":
        record["breakdown"] = side.breakdown(batches, args.steps)
    else:
        record["eval"] = {}
        evaluate_at = {int(s) for s in args.eval_at.split(",") if s}
        for step in range(args.steps + 1):
            if step in evaluate_at:
                record["eval"][step] = _validation_loss(side, validation)
            if step < args.steps:
                losses.append(_step(side, batches, recorder))
    record["losses"] = losses
    record["peak_rss_bytes"] = peak_rss_bytes()
    with open(f"{args.out}.rank{side.rank}.json", "w") as handle:
        json.dump(record, handle)
    side.close()


def _step(side, batches, recorder) -> float:
    x, y = next(batches)
    recorder.start()
    loss = side.step(x, y, recorder)
    recorder.end()
    return loss


def _phase_means(recorder) -> dict:
    times = np.array([step["t"] for step in recorder.steps])
    return {name: float(np.mean(times[:, i + 1] - times[:, i])) for i, name in enumerate(recorder.phases)}


def _validation_loss(side, validation, batch: int = 64) -> float:
    """Mean loss per token over every validation window (one process)."""
    total = 0.0
    for lo in range(0, len(validation), batch):
        x, y = validation[np.arange(lo, min(lo + batch, len(validation)))]
        total += side.validation_loss_sum(x, y)
    return total / len(validation)


if __name__ == "__main__":
    main()
