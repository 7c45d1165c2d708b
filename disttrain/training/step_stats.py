"""What every rank must agree on after each step, carried by one small allreduce, and how an error
found on some ranks is raised on all of them.

Every rank runs the same sequence of collectives whatever happens locally: a failure in data loading,
forward or backward on one rank goes into its StepStats; after the gradient sync, `agree` sums every
rank's stats in one allreduce, so all ranks learn of the failure, the non-finite gradient or the stop
signal together and take the same branch.
"""

from __future__ import annotations

import dataclasses
import signal

import numpy as np


class TrainingError(RuntimeError):
    """A step failed on some rank; raised on every rank with that rank's message."""


class NonFiniteError(TrainingError):
    """The loss or a gradient became NaN or infinite (training.on_nonfinite = "error")."""


class ReplicaMismatchError(TrainingError):
    """Parameters differ across ranks (they must stay bit-identical)."""


@dataclasses.dataclass
class StepStats:
    """One rank's facts about a step, or (after `agree`) their sums over all ranks.

    loss_sum: sum over samples of the loss (float); count: samples; failed: ranks whose forward or
    backward raised; nonfinite_grads: ranks whose combined gradient holds NaN/inf; sigterm / sigusr1 /
    sigint: ranks that received that stop signal.
    """

    loss_sum: float = 0.0
    count: int = 0
    failed: int = 0
    nonfinite_grads: int = 0
    sigterm: int = 0
    sigusr1: int = 0
    sigint: int = 0

    def agree(self, comm) -> "StepStats":
        """COLLECTIVE. The sums of every rank's stats (one allreduce of seven float64 numbers)."""
        values = np.array(dataclasses.astuple(self), dtype=np.float64)
        comm.allreduce(values, "sum")
        summed = StepStats(*values.tolist())
        for field in ("count", "failed", "nonfinite_grads", "sigterm", "sigusr1", "sigint"):
            setattr(summed, field, int(getattr(summed, field)))
        return summed

    @property
    def mean_loss(self) -> float:
        """The global batch's mean loss (NaN/inf if any rank's loss was not finite)."""
        return self.loss_sum / max(self.count, 1)

    @property
    def stop_signal(self) -> str | None:
        """"SIGINT", "SIGTERM" or "SIGUSR1" if any rank received that stop signal (in that order), else
        None. Ctrl-C comes first: the run then ends with the interrupted exit code."""
        if self.sigint:
            return signal.SIGINT.name
        if self.sigterm:
            return signal.SIGTERM.name
        return signal.SIGUSR1.name if self.sigusr1 else None


def raise_agreed(comm, local_message: str | None, what: str, kind=TrainingError) -> None:
    """COLLECTIVE (error path). Raise `kind` on every rank with the lowest failing rank's message
    (`local_message` is this rank's, None where it did not fail)."""
    messages = comm.allgather_object(local_message)
    rank, message = next((r, m) for r, m in enumerate(messages) if m)
    raise kind(f"{what} on rank {rank}: {message}")
