#!/usr/bin/env python3
"""Mutation round: put one small, realistic bug into disttrain at a time, run the tests that should
catch it, report whether they did, and put the code back.

    .venv/bin/python scripts/mutants.py                    # every mutation (a few minutes)
    .venv/bin/python scripts/mutants.py sync-present-min   # some of them, by id
    .venv/bin/python scripts/mutants.py --list             # ids, areas and what each breaks
    .venv/bin/python scripts/mutants.py --check            # is every mutation's text still in the code?

Each mutation is an exact text edit (file, old text, new text). The old text must occur exactly once
in its file, or the mutation stops with "mutation text not found" (or "found N times"): when code
moves, re-target the entry rather than let it skip silently (`--check` lists every stale one without
running tests). Each mutation names a fast subset of the suite, as serial pytest runs and `mpiexec -n
N pytest --only-mpi` runs exactly as `make test` invokes them, so a subset that fails means `make test`
fails. First the subsets run on the unmutated code (they must pass, or a failure would prove nothing);
then, per mutation: edit, run its commands until one fails (caught) or all pass (survived), restore.

To add a mutation, append a Mutation(id, area, file, old text, new text, what it breaks, [commands])
to MUTATIONS, with commands made by serial(*pytest_args) or mpi(ranks, *pytest_args).

The original file is always restored: when the commands end, on Ctrl-C, SIGTERM and SIGHUP (the test
run in progress is ended with its whole process group), and, should this script be killed outright
(SIGKILL), by its next start, `--check` and `--list` included (the original is kept in a backup
directory under the system temp dir until restored; a test run already started then ends on its own). Children run with PYTHONDONTWRITEBYTECODE=1 and the mutated file gets
an mtime no compiled cache matches, so no bytecode of a mutated file is ever written or reused.
Not part of `make test`. Exit code: 0 all caught, 1 some survived, 2 a mutation or subset is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
PYTHON = os.path.join(VENV_BIN, "python") if os.path.exists(os.path.join(VENV_BIN, "python")) else sys.executable
MPIEXEC = os.path.join(os.path.dirname(PYTHON), "mpiexec")
BACKUP_DIR = os.path.join(tempfile.gettempdir(), "disttrain-mutants-" + hashlib.sha1(REPO.encode()).hexdigest()[:12])
PENDING = os.path.join(BACKUP_DIR, "pending.json")


# --------------------------------------------------------------------------------- the mutations
def serial(*pytest_args):
    """A serial pytest run, as `make test-serial` runs the suite."""
    return ("serial", 0, tuple(pytest_args))


def mpi(ranks, *pytest_args):
    """`mpiexec -n ranks pytest --only-mpi ...`, as `make test-mpi` runs the suite."""
    return ("mpi", ranks, tuple(pytest_args))


@dataclass
class Mutation:
    id: str
    area: str
    file: str  # relative to the repository root
    old: str
    new: str
    description: str
    tests: list = field(default_factory=list)


WHOLE_SUITE = [serial("tests"), mpi(2, "tests"), mpi(3, "tests")]  # what `make test` runs
DIST = "disttrain/distributed/"
PARALLEL, ZERO, FLAT = DIST + "parallel.py", DIST + "zero.py", DIST + "flat.py"
BUCKETS, GATHERING, SHARD_STATE = DIST + "buckets.py", DIST + "gathering.py", DIST + "shard_state.py"
FILES, WRITER, READER = "disttrain/checkpoint/files.py", "disttrain/checkpoint/writer.py", "disttrain/checkpoint/reader.py"
TRAINING = "disttrain/training/"
LOOP, STATE, EVALUATION = TRAINING + "loop.py", TRAINING + "state.py", TRAINING + "evaluation.py"
PERSISTENCE, AGREEMENT, RESUME_CHANGES = TRAINING + "persistence.py", TRAINING + "agreement.py", TRAINING + "resume_changes.py"
OPTIM, DATA, RANDOM = "disttrain/optim.py", "disttrain/data.py", "disttrain/random_sampler.py"

DIST_MPI, PARTIAL_MPI = "tests/test_distributed_mpi.py", "tests/test_partial_gradients_mpi.py"
OVERLAP, ABSENT = "tests/test_overlap.py", "tests/test_absent_gradients.py"
NONFINITE, UPDATES = "tests/test_nonfinite_gradients.py", "tests/test_trainer_updates.py"
CKPT, PUBLICATION = "tests/test_checkpoint.py", "tests/test_checkpoint_publication.py"
GRADCHECK, TRANSFORMER_OPS = "tests/test_ops_gradcheck.py", "tests/test_transformer_ops.py"

MUTATIONS = [
    # ------------------------------------------------------------------ sync (gradient combination)
    Mutation("sync-present-min", "sync", PARALLEL,
             'self.comm.allreduce(present, "max")', 'self.comm.allreduce(present, "min")',
             "a parameter counts as having a gradient only if every rank has one (min, not max)",
             [mpi(2, PARTIAL_MPI), mpi(3, PARTIAL_MPI)]),
    Mutation("sync-default-scale-sum", "sync", PARALLEL,
             "np.float32(1.0 / self.comm.size if grad_scale is None", "np.float32(1.0 if grad_scale is None",
             "the default gradient scale sums the ranks' gradients instead of averaging them",
             [mpi(2, DIST_MPI, "-k", "takes_part_as_zeros")]),
    Mutation("sync-allreduce-bucket-short", "sync", PARALLEL,
             "self.bucket_comm.allreduce(self.flat.flat_grads[lo:hi])",
             "self.bucket_comm.allreduce(self.flat.flat_grads[lo:hi - 1])",
             "the allreduce strategy leaves the last element of every bucket uncombined (off-by-one slice)",
             [mpi(2, DIST_MPI, "-k", "sharded_steps_match")]),
    Mutation("sync-missing-grads-not-zeroed", "sync", BUCKETS,
             "        self.flat.fill_missing_grads()\n", "",
             "a parameter without a gradient on this rank contributes stale buffer contents, not zeros",
             [mpi(2, PARTIAL_MPI), mpi(2, DIST_MPI, "-k", "takes_part_as_zeros")]),
    Mutation("sync-scatter-keeps-partial-grads", "sync", PARALLEL,
             "param.grad = None if self._scatters or index in absent else slot.buffer",
             "param.grad = None if index in absent else slot.buffer",
             "after a reduce-scatter, parameters still offer .grad views of scratch memory",
             [mpi(2, DIST_MPI, "-k", "no_parameter_offers_a_partial_gradient")]),
    Mutation("sync-buckets-launched-first-to-last", "sync", BUCKETS,
             "self.order = list(reversed(range(len(layout.buckets))))", "self.order = list(range(len(layout.buckets)))",
             "buckets are launched first to last, not last to first (the order backward completes them in)",
             [mpi(2, OVERLAP, "-k", "last_to_the_first")]),
    Mutation("sync-bucket-launched-one-gradient-early", "sync", BUCKETS,
             "self.missing[self.order[self.launched]] == 0", "self.missing[self.order[self.launched]] <= 1",
             "a bucket is launched while one of its parameters still lacks its gradient",
             [mpi(2, OVERLAP, "-k", "however_slow")]),
    Mutation("sync-late-gradient-accepted", "sync", BUCKETS,
             "        if self.sealed:\n            raise LateGradientError(",
             "        if False:\n            raise LateGradientError(",
             "a gradient arriving after the step's buckets were combined is silently left out",
             [mpi(2, OVERLAP, "-k", "second_backward")]),
    # --------------------------------------------------------------------- sharding (ZeRO-1)
    Mutation("shard-owned-grads-own-range", "sharding", PARALLEL,
             "return [flat_grads[bucket_lo:bucket_lo + hi - lo]", "return [flat_grads[lo:hi]",
             "the owned gradient is read at the rank's own range, not where the in-place reduce-scatter put it",
             [mpi(2, DIST_MPI, "-k", "sharded_steps_match")]),
    Mutation("shard-gather-first-bucket-only", "sharding", GATHERING,
             "for bucket, (lo, hi) in enumerate(ddp.layout.buckets):",
             "for bucket, (lo, hi) in enumerate(ddp.layout.buckets[:1]):",
             "the parameter allgather after the sharded update covers the first bucket only",
             [mpi(2, DIST_MPI, "-k", "sharded_steps_match")]),
    Mutation("shard-clip-norm-local", "sharding", ZERO,
             '        if self.shard:\n            self.comm.allreduce(total, "sum")',
             '        if False:\n            self.comm.allreduce(total, "sum")',
             "gradient clipping uses this rank's share of the norm, not the global norm",
             [mpi(2, DIST_MPI, "-k", "clip_grad_norm")]),
    Mutation("shard-absent-gets-zero-gradient", "sharding", ZERO,
             "tensor.grad = None if segment[0] in absent else grad.view(Gradient)",
             "tensor.grad = grad.view(Gradient)",
             "a parameter with no gradient on any rank is handed a zero gradient: momentum, weight decay and "
             "Adam's step count move it",
             [serial(ABSENT), mpi(2, DIST_MPI, "-k", "without_gradient_on_every_rank")]),
    # replaces shard-thaw-keeps-state: freezing/thawing is gone; the wrapped optimizer now skips a piece
    # whose grad is None, so the nearest bug is that skip missing (the piece's state advances)
    Mutation("shard-absent-piece-state-advances", "sharding", OPTIM,
             "            if param.grad is not None:\n"
             "                grad = param.grad.data if isinstance(param.grad, Tensor) else param.grad\n",
             "            if True:\n"
             "                grad = np.zeros_like(param.data) if param.grad is None else \\\n"
             "                    param.grad.data if isinstance(param.grad, Tensor) else param.grad\n",
             "the wrapped optimizer updates a piece whose grad is None as if it were zero: its state "
             "(moments, step count) advances",
             [serial(ABSENT), mpi(2, DIST_MPI, "-k", "without_gradient_on_every_rank")]),
    Mutation("shard-piece-grad-offset", "sharding", ZERO,
             "grads.append(by_range[(lo, hi)][flat_lo - lo:flat_hi - lo])",
             "grads.append(by_range[(lo, hi)][:flat_hi - flat_lo])",
             "every piece of an owned range reads the range's first gradients, not its own",
             [mpi(2, DIST_MPI, "-k", "sharded_steps_match")]),
    Mutation("shard-lazy-wait-misses-straddling-param", "sharding", GATHERING,
             "return offset < hi and lo < offset + size", "return lo <= offset < hi",
             "a layer's lazy wait skips the later buckets of a parameter that starts in an earlier one "
             "(its forward reads elements still being allgathered)",
             [mpi(2, OVERLAP, "-k", "lazy_forward")]),
    Mutation("shard-consolidate-own-pieces-only", "sharding", SHARD_STATE,
             "        if optimizer.shard:\n            for lo, hi in layout.buckets:\n                comm.allgather(",
             "        if False:\n            for lo, hi in layout.buckets:\n                comm.allgather(",
             "consolidate_state_dict returns rank 0's own pieces and zeros elsewhere",
             [mpi(2, DIST_MPI, "-k", "consolidated")]),
    Mutation("shard-reshard-gap-unnoticed", "sharding", SHARD_STATE,
             "if covered != stop - start:", "if covered > stop - start:",
             "saved optimizer state with a missing shard loads as zeros instead of an error naming the gap",
             [serial(CKPT, "-k", "missing_shard")]),
    # ------------------------------------------------------------------------------ layout
    Mutation("layout-chunk-from-first-bucket", "layout", FLAT,
             "            chunk = (hi - lo) // self.world_size",
             "            chunk = (self.buckets[0][1] - self.buckets[0][0]) // self.world_size",
             "every bucket's chunk size is taken from the first bucket",
             [serial("tests/test_flat_layout.py")]),
    Mutation("layout-padding-rounds-down", "layout", FLAT,
             "max(-(-offset // quantum) * quantum, quantum)", "max((offset // quantum) * quantum, quantum)",
             "the padded buffer is rounded down, cutting off the last parameters",
             [serial("tests/test_flat_layout.py")]),
    Mutation("layout-bucket-not-a-multiple", "layout", FLAT,
             "bucket_len = max(quantum, (int(bucket_elements) // quantum) * quantum)",
             "bucket_len = max(quantum, int(bucket_elements))",
             "bucket lengths are not rounded to a multiple of world size x alignment",
             [serial("tests/test_flat_layout.py")]),
    Mutation("layout-owned-range-ignores-bucket-start", "layout", FLAT,
             "ranges.append((lo + rank * chunk, lo + (rank + 1) * chunk))",
             "ranges.append((rank * chunk, (rank + 1) * chunk))",
             "a rank's owned range in every bucket is counted from the buffer's start, not the bucket's",
             [serial("tests/test_flat_layout.py")]),
    Mutation("layout-segment-drops-last-element", "layout", FLAT,
             "a, b = max(lo, offset), min(hi, offset + size)", "a, b = max(lo, offset), min(hi, offset + size - 1)",
             "a parameter's piece in a flat range ends one element early (its last element is never updated)",
             [serial("tests/test_flat_layout.py"), serial(ABSENT)]),
    # ----------------------------------------------------------------------------- sampler
    Mutation("sampler-split-ignores-remainder", "sampler", DATA,
             "start = part * base + min(part, extra)", "start = part * base",
             "uneven per-rank parts overlap (the remainder is not spread over the first parts)",
             [serial("tests/test_data.py")]),
    Mutation("sampler-same-order-every-epoch", "sampler", DATA,
             "np.random.default_rng((self.seed, self.epoch)).permutation",
             "np.random.default_rng(self.seed).permutation",
             "every epoch uses the same shuffled order",
             [serial("tests/test_data.py")]),
    Mutation("sampler-resume-restarts-epoch", "sampler", DATA,
             "        if not self._resuming:\n            self.consumed = 0",
             "        if True:\n            self.consumed = 0",
             "after load_state_dict the epoch starts again from its first sample",
             [serial("tests/test_data.py")]),
    Mutation("sampler-last-batch-not-counted", "sampler", DATA,
             "        return -(-self.dataset_len // batch_size)", "        return self.dataset_len // batch_size",
             "the uneven last batch is not counted in the batches per epoch",
             [serial("tests/test_data.py")]),
    Mutation("sampler-random-same-draws-every-epoch", "sampler", RANDOM,
             "np.random.SeedSequence((self.seed, self.epoch))", "np.random.SeedSequence(self.seed)",
             "RandomSampler draws the same samples in every epoch",
             [serial("tests/test_text_data.py")]),
    Mutation("sampler-random-batch-offset-lost", "sampler", RANDOM,
             "yield self.draws(lo + start, lo + stop), hi - lo", "yield self.draws(start, stop), hi - lo",
             "RandomSampler takes every batch's draws from the epoch's start, not the batch's",
             [serial("tests/test_text_data.py")]),
    Mutation("sampler-random-resume-restarts-epoch", "sampler", RANDOM,
             "        if not self._resuming:\n            self.consumed = 0",
             "        if True:\n            self.consumed = 0",
             "a loaded RandomSampler starts its epoch again from the first draw",
             [serial("tests/test_text_data.py")]),
    # -------------------------------------------------------------------------- checkpoint
    Mutation("ckpt-latest-before-rename", "checkpoint", WRITER,
             "    os.rename(partial, final)\n    _fsync_dir(directory)\n    _point_latest(directory, step_dirname(step))\n",
             "    _point_latest(directory, step_dirname(step))\n    os.rename(partial, final)\n    _fsync_dir(directory)\n",
             "`latest` is moved before the checkpoint directory is renamed into place",
             [serial(PUBLICATION)]),
    Mutation("ckpt-checksum-ignored", "checkpoint", FILES,
             'if _sha256(file_path) != info["sha256"]:', "if False:",
             "a corrupt file of the right size is loaded (checksums not compared)",
             [serial(CKPT)]),
    Mutation("ckpt-keeps-one-too-many", "checkpoint", WRITER,
             "for path in stale + current[:-keep]:", "for path in stale + current[:-keep - 1]:",
             "keep-last-N keeps N + 1 checkpoints",
             [serial(CKPT)]),
    Mutation("ckpt-reshard-ignores-offset", "checkpoint", SHARD_STATE,
             'np.asarray(seg["arrays"][key])[a - seg["start"]:b - seg["start"]]', 'np.asarray(seg["arrays"][key])[:b - a]',
             "resharding copies a segment's first elements instead of the ones the new range needs",
             [serial(CKPT)]),
    Mutation("ckpt-latest-pointer-ignored", "checkpoint", FILES,
             "        if target in ordered:\n", "        if False:\n",
             "loading tries the newest step directory first, whatever `latest` names",
             [serial(CKPT, PUBLICATION)]),
    Mutation("ckpt-other-history-kept", "checkpoint", WRITER,
             "stale = [path for saved, path in published if saved > step]", "stale = []",
             "checkpoints of later steps from another run are kept and outrank the new ones",
             [serial(CKPT)]),
    Mutation("ckpt-failed-save-leaves-partial", "checkpoint", WRITER,
             "            shutil.rmtree(partial, ignore_errors=True)\n        raise\n", "            pass\n        raise\n",
             "a failed save leaves its partial directory (and its disk space) behind",
             [serial(CKPT, "-k", "failed_save")]),
    Mutation("ckpt-verify-rank-0-share-only", "checkpoint", READER,
             "names[comm.rank::comm.size]", "names[::comm.size]",
             "on N ranks every rank verifies rank 0's share of the files: the others go unchecked",
             [serial("tests/test_faults.py", "-k", "damaged_latest")]),
    # ----------------------------------------------------------------------------- trainer
    Mutation("trainer-nonfinite-loss-only", "trainer", LOOP,
             "skipped = not math.isfinite(stats.mean_loss) or stats.nonfinite_grads > 0",
             "skipped = not math.isfinite(stats.mean_loss)",
             "the non-finite check looks at the loss only, not the gradients",
             [serial(NONFINITE), mpi(2, NONFINITE)]),
    Mutation("trainer-skip-not-counted", "trainer", STATE,
             "self.skipped_steps += int(skipped)", "self.skipped_steps += 0",
             "a skipped non-finite step is not counted",
             [serial(NONFINITE)]),
    Mutation("trainer-equal-weight-per-rank", "trainer", LOOP,
             "loss.backward(np.float32(len(indices) / total))",
             "loss.backward(np.float32(1.0 / (self.comm.size * len(group))))",
             "each rank's mean loss gets weight 1/(size x micro-batches), wrong for an uneven last batch",
             [serial(UPDATES), serial("tests/test_equivalence.py")]),
    Mutation("trainer-eval-rank-0-part", "trainer", EVALUATION,
             "split_evenly(len(dataset), comm.size, comm.rank)", "split_evenly(len(dataset), comm.size, 0)",
             "parallel evaluation scores rank 0's part on every rank",
             [mpi(2, DIST_MPI, "-k", "parallel_evaluation")]),
    Mutation("trainer-clip-norm-ignored", "trainer", LOOP,
             '            if self.train_cfg["clip_norm"]:\n', "            if False:\n",
             "training.clip_norm is never applied",
             [serial(UPDATES)]),
    Mutation("trainer-accumulate-ignored", "trainer", LOOP,
             'group = list(islice(batches, self.train_cfg["accumulate"]))', "group = list(islice(batches, 1))",
             "training.accumulate is ignored: every micro-batch is its own step",
             [serial(UPDATES)]),
    Mutation("trainer-resume-forgets-sampler", "trainer", PERSISTENCE,
             '    parts.sampler.load_state_dict(extra["sampler"])\n', "",
             "a resumed run starts its epoch from the first sample again",
             [serial("tests/test_faults.py", "-k", "stop_signal_saves")]),
    Mutation("trainer-agreement-ignores-test-data", "trainer", AGREEMENT,
             '        facts["data:test samples"] = len(test_data)\n', "        pass\n",
             "ranks with test sets of different sizes are not told apart before step 1",
             [serial("tests/test_run_agreement.py", "-k", "python_api")]),
    Mutation("trainer-resume-takes-changed-model", "trainer", RESUME_CHANGES,
             'why = REFUSED.get(name) or REFUSED.get(name.split(".", 1)[0])', "why = REFUSED.get(name)",
             "a resume with a changed [model] or [data] key is accepted (only exact keys are refused)",
             [serial("tests/test_resume_changes.py", "-k", "refused")]),
    Mutation("trainer-resume-keeps-saved-base-lr", "trainer", PERSISTENCE,
             '        scheduler_state["base_lr"] = config["optimizer"]["lr"]\n', "        pass\n",
             "a resumed run's schedule keeps the saved base learning rate, not the lr it was given",
             [serial("tests/test_resume_changes.py", "-k", "learning_rate")]),
    Mutation("trainer-saves-before-epoch-records", "trainer", LOOP,
             "return on_step and not self._epoch_complete()", "return on_step",
             "a checkpoint due on an epoch's last step is taken before the epoch's records",
             [serial("tests/test_checkpoint_schedule.py")]),
    # --------------------------------------------------------------------------- optimizer
    Mutation("optim-adam-no-second-correction", "optimizer", OPTIM,
             "correction2=1.0 - self.beta2 ** t", "correction2=1.0",
             "Adam's second-moment bias correction is missing",
             [serial("tests/test_optim.py")]),
    Mutation("optim-sgd-momentum-factor", "optimizer", OPTIM,
             "one_minus_momentum=1.0 - self.momentum", "one_minus_momentum=1.0",
             "SGD momentum adds the whole gradient, not (1 - momentum) of it",
             [serial("tests/test_optim.py")]),
    Mutation("optim-sgd-weight-decay-ignored", "optimizer", OPTIM,
             "decay_factor=1.0 - self.lr * self.weight_decay, lr=self.lr)", "decay_factor=1.0, lr=self.lr)",
             "SGD's weight decay is never applied",
             [serial("tests/test_optim.py")]),
    Mutation("optim-adamw-coupled", "optimizer", OPTIM,
             "    decoupled = True\n", "    decoupled = False\n",
             "AdamW's weight decay goes through the gradient (Adam's L2)",
             [serial("tests/test_optim.py")]),
    Mutation("optim-clip-scales-up", "optimizer", OPTIM,
             "if norm > max_norm and math.isfinite(norm):", "if math.isfinite(norm):",
             "gradient clipping also scales small gradients up to max_norm",
             [serial("tests/test_optim.py")]),
    Mutation("optim-cosine-upside-down", "optimizer", OPTIM,
             "(1.0 + math.cos(math.pi * progress))", "(1.0 - math.cos(math.pi * progress))",
             "the cosine schedule rises instead of decaying",
             [serial("tests/test_optim.py")]),
    # --------------------------------------------------------------------------------- ops
    Mutation("ops-sqrt-backward", "ops", "disttrain/ops/pointwise.py",
             "lambda g: (g / (data + data),)", "lambda g: (g / data,)",
             "sqrt's derivative is 1/sqrt(x), not 1/(2 sqrt(x))",
             [serial(GRADCHECK)]),
    Mutation("ops-log-softmax-backward", "ops", "disttrain/ops/pointwise.py",
             "(g - np.exp(data) * np.sum(g, axis=axis, keepdims=True),)", "(g - np.exp(data) * g,)",
             "log_softmax's backward forgets the sum over the axis",
             [serial(GRADCHECK)]),
    Mutation("ops-unbroadcast-leading-axes", "ops", "disttrain/ops/node.py",
             "    axes = tuple(range(extra)) + tuple(", "    axes = tuple(",
             "gradients are not summed over axes that broadcasting prepended",
             [serial(GRADCHECK)]),
    Mutation("ops-getitem-repeated-indices", "ops", "disttrain/ops/shaping.py",
             "np.add.at(grad, key, g)", "grad[key] = g",
             "gradients of repeated indices overwrite instead of adding up",
             [serial(GRADCHECK)]),
    Mutation("ops-mean-backward-unscaled", "ops", "disttrain/ops/reductions.py",
             "_expand_reduced(g * scale, axes, keepdims)", "_expand_reduced(g, axes, keepdims)",
             "mean's backward forgets the 1/count",
             [serial(GRADCHECK)]),
    Mutation("ops-max-ties-not-shared", "ops", "disttrain/ops/reductions.py",
             "(mask * (_expand_reduced(g, axes, keepdims) / ties),)",
             "(mask * _expand_reduced(g, axes, keepdims),)",
             "max gives the whole gradient to every tied maximum",
             [serial(GRADCHECK)]),
    Mutation("ops-cross-entropy-ignores-upstream", "ops", "disttrain/ops/losses.py",
             "step = logits.dtype.type(g * scale)", "step = logits.dtype.type(scale)",
             "cross-entropy's backward ignores the incoming gradient (a weighted loss loses its weight)",
             [serial(GRADCHECK)]),
    Mutation("ops-leaf-grad-overwritten", "ops", "disttrain/tensor.py",
             'np.add(leaf.grad, grad, out=leaf.grad, casting="same_kind")',
             'np.copyto(leaf.grad, grad, casting="same_kind")',
             "a second backward (or a second use of a parameter) overwrites its gradient instead of adding",
             [serial("tests/test_tensor.py")]),
    Mutation("ops-embedding-repeats-overwrite", "ops", "disttrain/ops/embedding.py",
             "out[ordered[starts]] = np.add.reduceat(values[order], starts, axis=0)",
             "out[ordered] = values[order]",
             "embedding's backward (numpy path) keeps one gradient per repeated token instead of their sum",
             [serial(TRANSFORMER_OPS)]),
    Mutation("ops-attention-sees-next-position", "ops", "disttrain/ops/attention.py",
             "upper = np.triu(np.ones(rows.shape[1:], dtype=bool), 1)",
             "upper = np.triu(np.ones(rows.shape[1:], dtype=bool), 2)",
             "the causal mask (numpy path) lets each position attend to the next one",
             [serial(TRANSFORMER_OPS)]),
    Mutation("ops-layer-norm-backward-forgets-mean", "ops", "disttrain/ops/normalization.py",
             "    d_norm -= s1\n", "",
             "layer norm's backward (numpy path) leaves out the gradient through the row mean",
             [serial(TRANSFORMER_OPS)]),
]


# ------------------------------------------------------------------------- edit and restore
class MutationError(RuntimeError):
    """A mutation that cannot be applied as written (its text is gone or ambiguous)."""


def locate(mutation: Mutation) -> str:
    """The file's text; raises MutationError unless `mutation.old` occurs in it exactly once."""
    path = os.path.join(REPO, mutation.file)
    if not os.path.isfile(path):
        raise MutationError(f"{mutation.id}: file {mutation.file} not found (re-target this mutation)")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    count = text.count(mutation.old)
    if count == 0:
        raise MutationError(f"{mutation.id}: mutation text not found in {mutation.file} (re-target it): "
                            f"{mutation.old!r}")
    if count > 1:
        raise MutationError(f"{mutation.id}: mutation text found {count} times in {mutation.file} "
                            f"(make it unique): {mutation.old!r}")
    return text


def restore_leftovers() -> None:
    """Put back a file an earlier run left mutated (it was killed before it could restore it)."""
    if not os.path.isfile(PENDING):
        return
    with open(PENDING) as handle:
        pending = json.load(handle)
    backup, target = pending["backup"], os.path.join(REPO, pending["file"])
    if os.path.isfile(backup):
        shutil.copy2(backup, target)
        print(f"restored {pending['file']}, left mutated ({pending['id']}) by an interrupted run", flush=True)
        os.remove(backup)
    os.remove(PENDING)


INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C or SIGTERM arriving inside waits until the block is done (a file is never half-written)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Applied:
    """Context manager: the file holds the mutation inside, its original bytes and mtime after."""

    def __init__(self, mutation: Mutation):
        self.mutation = mutation
        self.path = os.path.join(REPO, mutation.file)

    def __enter__(self):
        text = locate(self.mutation)
        with open(self.path, "rb") as handle:
            self.original = handle.read()
        self.stat = os.stat(self.path)
        os.makedirs(BACKUP_DIR, exist_ok=True)
        self.backup = backup = os.path.join(BACKUP_DIR, os.path.basename(self.path))
        with interrupts_deferred():
            shutil.copy2(self.path, backup)
            with open(PENDING, "w") as handle:
                json.dump({"id": self.mutation.id, "file": self.mutation.file, "backup": backup}, handle)
            try:
                with open(self.path, "w", encoding="utf-8") as handle:
                    handle.write(text.replace(self.mutation.old, self.mutation.new, 1))
                # an mtime no cached bytecode of the original carries: the mutated source is always recompiled
                old_seconds = int(self.stat.st_mtime)
                os.utime(self.path, (old_seconds - 7, old_seconds - 7))
            except BaseException:
                self._restore()
                raise
        return self

    def __exit__(self, *exc):
        with interrupts_deferred():
            self._restore()
        return False

    def _restore(self) -> None:
        with open(self.path, "wb") as handle:
            handle.write(self.original)
        os.utime(self.path, ns=(self.stat.st_atime_ns, self.stat.st_mtime_ns))
        with open(self.path, "rb") as handle:
            if handle.read() != self.original:
                raise RuntimeError(f"could not restore {self.mutation.file}: check `git diff` now")
        os.remove(PENDING)
        os.remove(self.backup)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ------------------------------------------------------------------------------- running tests
def argv_of(command) -> list:
    kind, ranks, args = command
    pytest = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    if kind == "serial":
        return [PYTHON, *pytest, *args]
    return [MPIEXEC, "-n", str(ranks), PYTHON, *pytest, "--only-mpi", *args]


def describe(command) -> str:
    kind, ranks, args = command
    return ("pytest " if kind == "serial" else f"mpiexec -n {ranks} pytest ") + " ".join(args)


def run(command, timeout: float) -> tuple:
    """(outcome, output, seconds): outcome is "passed", "failed", "timeout" or "broken" (pytest ran no
    test, or was called wrongly: the subset needs fixing). The child runs in its own session, and
    the whole session is ended on timeout or interruption."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MPIEXEC_TIMEOUT=str(max(int(timeout) - 10, 10)),
               PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", ""))
    for key in ("PMI_SIZE", "PMI_RANK", "PMI_FD", "PMI_PORT", "PMI_ID", "OMPI_COMM_WORLD_SIZE"):
        env.pop(key, None)
    started = time.monotonic()
    proc = subprocess.Popen(argv_of(command), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end_session(proc)
        output, _ = proc.communicate()
        return "timeout", output, time.monotonic() - started
    except BaseException:
        _end_session(proc)
        raise
    seconds = time.monotonic() - started
    if proc.returncode in (4, 5) or "no tests ran" in output:
        return "broken", output, seconds
    if proc.returncode == 0:  # a subset whose every test was skipped (a serial test under --only-mpi) is broken
        return ("passed" if re.search(r"\b\d+ passed\b", output) else "broken"), output, seconds
    return "failed", output, seconds


def _end_session(proc) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def failed_tests(output: str) -> list:
    """Test ids the output reports as failed (serial summary lines or the MPI abort hook's lines)."""
    found = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M) + \
        re.findall(r"^\[rank \d+\] test (\S+) failed", output, re.M)
    return list(dict.fromkeys(name.split("/")[-1] for name in found))


# ----------------------------------------------------------------------------------- the round
def baseline(mutations, timeout: float) -> bool:
    """Every distinct command of `mutations` passes on the unmutated code."""
    commands = list(dict.fromkeys(command for m in mutations for command in m.tests))
    print(f"baseline: {len(commands)} test commands on the unmutated code", flush=True)
    healthy = True
    for command in commands:
        outcome, output, seconds = run(command, timeout)
        print(f"  {outcome:8s} {seconds:6.1f} s  {describe(command)}", flush=True)
        if outcome != "passed":
            healthy = False
            print(output[-3000:], flush=True)
    return healthy


def mutate_and_test(mutation: Mutation, timeout: float) -> dict:
    result = {"id": mutation.id, "area": mutation.area, "file": mutation.file,
              "description": mutation.description, "outcome": "survived", "caught_by": "", "seconds": 0.0}
    with Applied(mutation):
        for command in mutation.tests:
            outcome, output, seconds = run(command, timeout)
            result["seconds"] += seconds
            if outcome == "passed":
                continue
            result["outcome"] = "caught" if outcome == "failed" else outcome
            names = failed_tests(output)
            result["caught_by"] = f"{describe(command)}: " + (", ".join(names) if names else output.strip()[-300:])
            if outcome == "broken":
                result["caught_by"] = f"{describe(command)}: {output.strip()[-500:]}"
            break
    return result


def report(results: list) -> None:
    print("\n| # | mutation | area | file | what it breaks | result | caught by | s |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        print(f"| {i} | {r['id']} | {r['area']} | {r['file']} | {r['description']} | {r['outcome']} | "
              f"{r['caught_by']} | {r['seconds']:.0f} |")
    caught = sum(r["outcome"] in ("caught", "timeout") for r in results)
    print(f"\n{caught} of {len(results)} mutations caught"
          + (f"; survived: {', '.join(r['id'] for r in results if r['outcome'] == 'survived')}"
             if caught < len(results) else ""), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="mutation ids to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true", help="check every mutation's text is found exactly "
                        "once in its file, run nothing")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test command (default 300)")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the subsets on unmutated code")
    parser.add_argument("--suite", action="store_true", help="run the whole of `make test` (serial, then "
                        "MPI at 2 and 3 ranks, each stopping at its first failure) instead of each subset")
    parser.add_argument("--pytest-arg", action="append", default=[], metavar="ARG",
                        help="append ARG to every pytest command (repeatable), e.g. --pytest-arg=--ignore=tests/x.py")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    ids = [m.id for m in MUTATIONS]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        print(f"duplicate mutation ids: {sorted(duplicates)}", file=sys.stderr)
        return 2
    unknown = [i for i in args.ids if i not in ids]
    if unknown:
        print(f"unknown mutation ids {unknown}; --list shows them", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if not args.ids or m.id in args.ids]
    if args.suite:
        chosen = [dataclasses.replace(m, tests=WHOLE_SUITE) for m in chosen]
    if args.pytest_arg:
        chosen = [dataclasses.replace(m, tests=[(kind, ranks, (*pytest_args, *args.pytest_arg))
                                                for kind, ranks, pytest_args in m.tests]) for m in chosen]
    restore_leftovers()
    if args.list:
        for m in chosen:
            print(f"{m.id:38s} {m.area:10s} {m.file:35s} {m.description}")
        return 0

    stale = []
    for m in chosen:
        try:
            locate(m)
        except MutationError as error:
            stale.append(str(error))
    if stale or args.check:
        print("\n".join(stale) if stale else f"all {len(chosen)} mutations found exactly once")
        return 2 if stale else 0

    for sig in INTERRUPTS:  # SIGINT too: a shell starts background jobs with it ignored
        signal.signal(sig, _raise_interrupt)
    if not args.no_baseline and not baseline(chosen, args.timeout):
        print("a test command fails on the unmutated code: fix it first", file=sys.stderr)
        return 2
    results = []
    try:
        for i, m in enumerate(chosen, 1):
            result = mutate_and_test(m, args.timeout)
            results.append(result)
            print(f"[{i}/{len(chosen)}] {result['outcome']:8s} {result['seconds']:6.1f} s  {m.id}: "
                  f"{result['caught_by'] or 'no test failed'}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: no file is left mutated", file=sys.stderr)
        report(results)
        return 130
    report(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    if any(r["outcome"] == "broken" for r in results):
        return 2
    return 0 if all(r["outcome"] in ("caught", "timeout") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
