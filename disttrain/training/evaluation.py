"""Evaluation over the whole test set split across ranks, and the check that every rank still holds
the same parameters."""

from __future__ import annotations

import traceback
import zlib

import numpy as np

from ..data import split_evenly
from ..tensor import Tensor, no_grad
from .step_stats import ReplicaMismatchError, TrainingError, raise_agreed


def evaluate(ddp, dataset, loss_fn, comm, task: str, batch_size: int) -> dict:
    """COLLECTIVE. {"test_loss"} (and "test_accuracy" for task "classification") of the DataParallel
    `ddp`'s model over `dataset` (len() and [indices] -> (x, y)).

    Rank r scores the r-th contiguous part of the data, `batch_size` samples at a time: every sample
    exactly once, no padding; (loss sum, correct, count) are summed across ranks. Rank 0's buffers
    (e.g. BatchNorm statistics) are the model's. A failure on any rank raises TrainingError on all.
    """
    ddp.wait_for_parameters()
    ddp.broadcast_buffers()
    start, stop = split_evenly(len(dataset), comm.size, comm.rank)
    loss_sum = correct = count = 0.0
    failure = None
    ddp.train(False)
    try:
        with no_grad():
            for lo in range(start, stop, batch_size):
                x, y = dataset[np.arange(lo, min(lo + batch_size, stop))]
                output = ddp(Tensor.wrap(x))
                loss_sum += float(loss_fn(output, y).data) * len(x)
                if task == "classification":
                    correct += float(np.sum(output.data.argmax(axis=1) == y))
                count += len(x)
    except Exception as error:  # carried to every rank by the allreduce below
        failure = f"{type(error).__name__}: {error}"
        comm.error(f"evaluation failed:\n{traceback.format_exc().rstrip()}")
    finally:
        ddp.train(True)
    stats = comm.allreduce(np.array([loss_sum, correct, count, failure is not None]), "sum")
    if stats[3]:
        raise_agreed(comm, failure, "evaluation failed", TrainingError)
    result = {"test_loss": float(stats[0] / max(stats[2], 1))}
    if task == "classification":
        result["test_accuracy"] = float(stats[1] / max(stats[2], 1))
    return result


def check_replicas(ddp, comm, step: int) -> None:
    """COLLECTIVE. Raise ReplicaMismatchError on every rank naming the first parameter whose bits
    differ across ranks (a CRC32 of each parameter, compared with comm.all_equal)."""
    ddp.wait_for_parameters()
    checksums = [zlib.crc32(param.data.tobytes()) for _, param in ddp.named_parameters()]
    equal = comm.all_equal(checksums)
    if not equal.all():
        name = next(name for (name, _), same in zip(ddp.named_parameters(), equal) if not same)
        raise ReplicaMismatchError(f"parameter '{name}' differs across ranks at step {step} "
                                   f"(ranks must hold bit-identical parameters)")
