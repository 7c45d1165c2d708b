"""TrainState: where a run is (step, epoch) and the sums that its epoch record needs, saved in every
checkpoint so that a resumed run continues exactly."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class TrainState:
    """step: optimizer steps done; epoch: epochs completed; epoch_loss_sum / epoch_count: the summed
    loss and samples of the epoch under way (a step whose loss is not finite adds neither);
    skipped_steps: steps skipped in the whole run (training.on_nonfinite = "skip")."""

    step: int = 0
    epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_count: int = 0
    skipped_steps: int = 0

    def add_step(self, loss_sum: float, count: int, skipped: bool) -> None:
        """Count one optimizer step (`skipped`: its update was skipped); its summed loss goes into the
        epoch's sums if it is finite."""
        self.step += 1
        self.skipped_steps += int(skipped)
        if math.isfinite(loss_sum):
            self.epoch_loss_sum += loss_sum
            self.epoch_count += count

    def end_epoch(self) -> float:
        """Close the epoch under way; returns its mean training loss (NaN if every step was skipped)."""
        mean = self.epoch_loss_sum / self.epoch_count if self.epoch_count else float("nan")
        self.epoch += 1
        self.epoch_loss_sum, self.epoch_count = 0.0, 0
        return mean

    def state_dict(self) -> dict:
        """Everything but the step (a checkpoint records that itself), as JSON-ready numbers."""
        return {"epoch": self.epoch, "epoch_loss_sum": self.epoch_loss_sum, "epoch_count": self.epoch_count,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, step: int, state: dict) -> None:
        """Continue at `step` with what state_dict() returned (skipped_steps may be absent)."""
        self.step, self.epoch = int(step), int(state["epoch"])
        self.epoch_loss_sum, self.epoch_count = float(state["epoch_loss_sum"]), int(state["epoch_count"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
