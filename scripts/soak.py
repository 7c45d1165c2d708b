#!/usr/bin/env python3
"""Soak test: a long multi-rank run, repeatedly hit by SIGTERM or SIGKILL of a random rank and
resumed, must end exactly where an uninterrupted run ends.

    python scripts/soak.py                          # 4 ranks, 6 minutes of 3000-step rounds
    python scripts/soak.py --rounds 1 --steps 600   # a quick one
    python scripts/soak.py --help

Each round trains an uninterrupted reference (synthetic data, MLP, Adam, checkpoints every few steps),
then trains the same run again, and while it runs sends SIGTERM (save, exit 0) or SIGKILL (die
now) to a random rank - or SIGTERM to mpiexec, which forwards it to every rank - after a random wait,
then resumes with `--resume`; repeated until the run completes. After every fault it checks that the
job ended within seconds with the right exit code, that no process of the job is left behind, and that
the resume continued from the newest complete checkpoint. At the end of the round the final parameters
and optimizer state must equal the reference's bit for bit, and so must the loss at every step. Rounds
(each with the next seed) start until --minutes have passed. Prints how many faults were injected and
survived; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from tagged_processes import TAG, tagged_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BIN = os.path.dirname(sys.executable)

CONFIG = """
[model]
name = "mlp"
hidden = [64]

[data]
name = "synthetic"
samples = 1250
features = 32
classes = 10
seed = {seed}

[optimizer]
name = "adam"
lr = 0.002

[training]
epochs = 100000
max_steps = {steps}
batch_size = 64
seed = {seed}
log_every = 1
progress = "lines"

[checkpoint]
every_steps = {every}
every_epochs = 0
keep = 3
"""


class SoakFailure(AssertionError):
    """A fault was not survived: wrong exit code, a hang, leftovers, a bad resume or a different result."""


# ------------------------------------------------------------------------------------ processes
class Job:
    """`mpiexec -n ranks python -m disttrain train ...` in the background, its processes tagged."""

    def __init__(self, ranks: int, args: list, log: str):
        self.tag = uuid.uuid4().hex
        env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", MPIEXEC_TIMEOUT="3600", **{TAG: self.tag})
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.log = log
        self._handle = open(log, "w")
        self.process = subprocess.Popen([os.path.join(BIN, "mpiexec"), "-n", str(ranks), sys.executable, "-m",
                                         "disttrain", "train", *args], env=env, stdout=self._handle,
                                        stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)

    def ranks(self) -> dict:
        return {int(env["PMI_RANK"]): pid for pid, env in tagged_processes(self.tag).items() if "PMI_RANK" in env}

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SoakFailure(f"the job did not end within {timeout:.0f} s (see {self.log})") from None
        finally:
            if self.process.poll() is not None:
                self._handle.close()

    def output(self) -> str:
        with open(self.log) as handle:
            return handle.read()

    def kill(self) -> None:
        for pid in tagged_processes(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def assert_no_leftovers(self, grace: float = 10.0) -> None:
        deadline = time.monotonic() + grace
        while tagged_processes(self.tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = tagged_processes(self.tag)
        if left:
            self.kill()
            raise SoakFailure(f"processes left behind after the job ended: {sorted(left)}")


# ------------------------------------------------------------------------------------- run state
def logged_steps(run_dir: str) -> dict:
    """{step: loss} of the train records in metrics.jsonl (a line cut short by a kill is ignored)."""
    steps = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return steps
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "train":
                steps[record["step"]] = record["loss"]
    return steps


def latest_step(run_dir: str) -> int | None:
    from disttrain import checkpoint

    try:
        _, manifest, _ = checkpoint.read_model(run_dir)
    except checkpoint.CheckpointError:
        return None
    return manifest["step"]


def final_state(run_dir: str):
    from disttrain import checkpoint
    import numpy as np

    params, manifest, path = checkpoint.read_model(run_dir)
    state = {f"param.{k}": v for k, v in params.items()}
    for key, per_param in checkpoint.consolidated_optimizer_state(path, manifest).items():
        state.update({f"optimizer.{key}.{name}": value for name, value in per_param.items()})
    state.update({f"scalar.{k}": np.asarray(v) for k, v in manifest["optimizer"]["scalars"].items()})
    return manifest["step"], state


def compare(run_dir: str, reference_dir: str, steps: int) -> list:
    """Differences between the soaked run and the reference (empty if bit-identical)."""
    import numpy as np

    problems = []
    step, state = final_state(run_dir)
    ref_step, reference = final_state(reference_dir)
    if step != ref_step or step != steps:
        problems.append(f"final checkpoint at step {step}, reference at {ref_step}, expected {steps}")
    if sorted(state) != sorted(reference):
        problems.append("the checkpoints hold different arrays")
    for name in sorted(set(state) & set(reference)):
        if state[name].dtype != reference[name].dtype or not np.array_equal(state[name], reference[name]):
            problems.append(f"{name} differs")
    losses, ref_losses = logged_steps(run_dir), logged_steps(reference_dir)
    if sorted(losses) != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl has train records for {len(losses)} steps, expected 1..{steps}")
    differing = [s for s in ref_losses if losses.get(s) != ref_losses[s]]
    if differing:
        problems.append(f"the loss differs at {len(differing)} steps, first at step {differing[0]}")
    return problems


# -------------------------------------------------------------------------------------- the soak
def train_args(config: str, run_dir: str, resume: bool) -> list:
    return [config, "--run-dir", run_dir] + (["--resume"] if resume else [])


def run_reference(options, config: str, run_dir: str, logs: str) -> float:
    started = time.monotonic()
    job = Job(options.ranks, train_args(config, run_dir, False), os.path.join(logs, "reference.log"))
    code = job.wait(options.job_timeout)
    job.assert_no_leftovers()
    if code != 0:
        raise SoakFailure(f"the reference run failed with exit code {code} (see {job.log})")
    return time.monotonic() - started


def soak(options, config: str, run_dir: str, logs: str, seed: int) -> dict:
    """Train `run_dir` to the end under random faults; returns the counts."""
    rng = random.Random(seed)
    counts = {"injected": 0, "survived": 0, "SIGTERM": 0, "SIGKILL": 0, "to mpiexec": 0, "restarts": 0,
              "end_seconds": []}
    attempt = 0
    while True:
        resume_from = latest_step(run_dir)
        job = Job(options.ranks, train_args(config, run_dir, attempt > 0),
                  os.path.join(logs, f"attempt-{attempt:03d}.log"))
        # fault only after the job is training past where it resumed, so every fault lands mid-run
        started_at = max(logged_steps(run_dir), default=0) if attempt else 0
        deadline = time.monotonic() + options.job_timeout
        while job.process.poll() is None and time.monotonic() < deadline:
            if max(logged_steps(run_dir), default=0) > started_at:
                break
            time.sleep(0.1)
        gap_end = time.monotonic() + rng.uniform(options.min_gap, options.max_gap)
        while job.process.poll() is None and time.monotonic() < gap_end:
            time.sleep(0.05)
        if job.process.poll() is not None:  # finished before the next fault
            code = job.wait(10)
            job.assert_no_leftovers()
            output = job.output()
            if code != 0 or "done:" not in output:
                raise SoakFailure(f"attempt {attempt} ended with exit code {code} without a fault (see {job.log})")
            _check_resume(output, attempt, resume_from, job.log)
            if attempt:
                counts["survived"] += 1  # the last fault's resume ran to the end
            return counts
        if attempt:
            _check_resume(job.output(), attempt, resume_from, job.log)
            counts["survived"] += 1  # the previous fault's resume is training again
        kind = "SIGKILL" if rng.random() < options.kill_share else "SIGTERM"
        ranks = job.ranks()
        target = "mpiexec" if kind == "SIGTERM" and rng.random() < options.mpiexec_share else rng.choice(sorted(ranks))
        pid = job.process.pid if target == "mpiexec" else ranks[target]
        sent = time.monotonic()
        os.kill(pid, signal.SIGKILL if kind == "SIGKILL" else signal.SIGTERM)
        counts["injected"] += 1
        counts[kind] += 1
        counts["to mpiexec"] += target == "mpiexec"
        code = job.wait(options.end_timeout)
        ended = time.monotonic() - sent
        counts["end_seconds"].append(ended)
        job.assert_no_leftovers()
        output = job.output()
        where = "mpiexec" if target == "mpiexec" else f"rank {target}"
        print(f"fault {counts['injected']:3d}: {kind} to {where:8s} at step {max(logged_steps(run_dir), default=0):5d}"
              f" -> exit {code} after {ended:.1f} s; newest checkpoint: step {latest_step(run_dir)}", flush=True)
        if kind == "SIGTERM" and "done:" not in output:
            stopped = re.search(r"saved checkpoint \S+ at step (\d+)", output)
            if code != 0 or not stopped:
                raise SoakFailure(f"SIGTERM: expected a checkpoint and exit 0, got exit {code} (see {job.log})")
            if latest_step(run_dir) != int(stopped.group(1)):
                raise SoakFailure(f"SIGTERM: saved step {stopped.group(1)} but latest is {latest_step(run_dir)}")
        if kind == "SIGKILL" and code == 0 and "done:" not in output:
            raise SoakFailure(f"SIGKILL: the job exited 0 without finishing (see {job.log})")
        if code == 0 and "done:" in output:
            counts["survived"] += 1  # the fault came after the last step: nothing left to resume
            return counts
        attempt += 1
        counts["restarts"] += 1


def _check_resume(output: str, attempt: int, expected_step, log: str) -> None:
    if attempt == 0:
        return
    found = re.search(r"resumed from \S+ at step (\d+)", output)
    if expected_step is None:
        if found or "starting from the beginning" not in output:
            raise SoakFailure(f"attempt {attempt}: expected a fresh start, no checkpoint existed (see {log})")
    elif not found or int(found.group(1)) != expected_step:
        raise SoakFailure(f"attempt {attempt}: expected to resume at step {expected_step} (see {log})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.0,
                        help="start new rounds until this much time has passed (default 6)")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many rounds (default: by --minutes)")
    parser.add_argument("--ranks", type=int, default=4, help="MPI ranks (default 4)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of each round's run (default 3000)")
    parser.add_argument("--every", type=int, default=5, help="checkpoint every this many steps (default 5)")
    parser.add_argument("--min-gap", type=float, default=0.5, help="shortest wait before a fault, s (default 0.5)")
    parser.add_argument("--max-gap", type=float, default=3.0, help="longest wait before a fault, s (default 3)")
    parser.add_argument("--kill-share", type=float, default=0.5, help="share of faults that are SIGKILL (0.5)")
    parser.add_argument("--mpiexec-share", type=float, default=0.25,
                        help="share of SIGTERMs sent to mpiexec instead of one rank (0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first round (data, model, fault schedule)")
    parser.add_argument("--end-timeout", type=float, default=60.0,
                        help="a job must end this many seconds after a fault (default 60)")
    parser.add_argument("--job-timeout", type=float, default=3600.0, help="any single job's limit, s")
    parser.add_argument("--workdir", help="keep runs and logs here (default: a temporary directory, removed "
                                          "on success)")
    options = parser.parse_args(argv)

    workdir = options.workdir or tempfile.mkdtemp(prefix="disttrain-soak-")
    os.makedirs(workdir, exist_ok=True)
    print(f"soak: rounds of {options.steps} steps on {options.ranks} ranks, checkpoint every {options.every}, a "
          f"fault every {options.min_gap:g}-{options.max_gap:g} s, new rounds for {options.minutes:g} min; "
          f"work dir {workdir}", flush=True)
    started = time.monotonic()
    totals = {"injected": 0, "survived": 0, "SIGTERM": 0, "SIGKILL": 0, "to mpiexec": 0, "restarts": 0,
              "end_seconds": []}
    rounds = 0
    while True:
        seed = options.seed + rounds
        round_dir = os.path.join(workdir, f"round-{rounds:03d}")
        shutil.rmtree(round_dir, ignore_errors=True)
        logs = os.path.join(round_dir, "logs")
        os.makedirs(logs)
        config = os.path.join(round_dir, "soak.toml")
        with open(config, "w") as handle:
            handle.write(CONFIG.format(steps=options.steps, every=options.every, seed=seed))
        reference_dir, run_dir = os.path.join(round_dir, "reference"), os.path.join(round_dir, "soaked")
        try:
            reference_seconds = run_reference(options, config, reference_dir, logs)
            print(f"round {rounds} (seed {seed}): reference {options.steps} steps uninterrupted in "
                  f"{reference_seconds:.0f} s", flush=True)
            counts = soak(options, config, run_dir, logs, seed)
            problems = compare(run_dir, reference_dir, options.steps)
        except SoakFailure as failure:
            print(f"soak: FAILED in round {rounds}: {failure}\n(runs and logs kept in {workdir})", flush=True)
            return 1
        if problems:
            print(f"soak: FAILED in round {rounds}: the result differs from the uninterrupted run:\n  "
                  + "\n  ".join(problems) + f"\n(runs and logs kept in {workdir})")
            return 1
        print(f"round {rounds}: {counts['injected']} faults, all survived; final parameters, optimizer state and "
              f"all {options.steps} losses bit-identical to the uninterrupted run", flush=True)
        for key, value in counts.items():
            totals[key] += value
        rounds += 1
        if not options.workdir:
            shutil.rmtree(round_dir, ignore_errors=True)
        if (options.rounds and rounds >= options.rounds) or \
                (not options.rounds and time.monotonic() - started >= 60 * options.minutes):
            break
    ends = totals["end_seconds"]
    print(f"faults injected: {totals['injected']} ({totals['SIGTERM']} SIGTERM, {totals['SIGKILL']} SIGKILL; "
          f"{totals['to mpiexec']} SIGTERM to mpiexec, the rest to a random rank); survived: {totals['survived']}; "
          f"restarts: {totals['restarts']}; rounds: {rounds} x {options.steps} steps")
    if ends:
        print(f"job end after a fault: median {sorted(ends)[len(ends) // 2]:.1f} s, max {max(ends):.1f} s")
    print(f"soak: passed in {time.monotonic() - started:.0f} s: every round ended bit-identical to its "
          f"uninterrupted run")
    if not options.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
