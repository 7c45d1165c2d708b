"""Training: that every rank runs the same job (agreement), a run built from config (build), its place
and sums (state), the per-step agreement (step_stats), evaluation, what a checkpoint holds beside the
model (persistence), stop signals, and the loop that ties them together (loop). `disttrain.trainer`
re-exports the public names."""

from .agreement import RunMismatchError
from .build import build_parts, build_run, check_model_fits
from .loop import Trainer, fit
from .signals import STOP_SIGNALS, catch_stop_signals
from .step_stats import NonFiniteError, ReplicaMismatchError, TrainingError

__all__ = ["Trainer", "fit", "build_run", "build_parts", "check_model_fits", "STOP_SIGNALS", "catch_stop_signals",
           "TrainingError", "NonFiniteError", "ReplicaMismatchError", "RunMismatchError"]
