"""The public import path of the training loop: `from disttrain.trainer import Trainer, fit`.
The loop and its parts live in the disttrain.training package."""

from .training import (STOP_SIGNALS, NonFiniteError, ReplicaMismatchError, RunMismatchError, Trainer,
                       TrainingError, catch_stop_signals, fit)

__all__ = ["Trainer", "fit", "TrainingError", "NonFiniteError", "ReplicaMismatchError", "RunMismatchError", "STOP_SIGNALS",
           "catch_stop_signals"]
