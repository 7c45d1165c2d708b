"""What may change between a checkpoint and the run that resumes it.

A resumed run compares its config with the one recorded in the checkpoint. A changed key is either
applied, and said so, or refused with the reason; a run never shows one value and trains with another.

Refused: the model (the saved parameters belong to it), the data (the saved position counts its
samples), optimizer.name (the saved state belongs to that update rule), training.batch_size and
training.accumulate (steps and the position in the epoch are counted in those batches), training.seed
and training.shuffle (the order of the epoch under way follows from them).
Applied: everything else. Optimizer hyperparameters (lr, momentum, betas, eps, weight_decay) replace
the saved ones; the learning-rate schedule is rebuilt from the new settings (lr, schedule, warm-up,
epochs, max_steps, ...) and continues at the resumed step. Where the run and its checkpoints live
(training.run_dir, checkpoint.dir, checkpoint.resume) is not compared.
"""

from __future__ import annotations

from ..config import ConfigError, toml_value

_POSITION = "the step count and the position in the epoch are counted in batches of the saved size"
_ORDER = "the order of the samples of the epoch under way follows from it"
REFUSED = {
    "model": "the saved parameters belong to the saved model",
    "data": "the saved position in the epoch counts the saved data set's samples",
    "optimizer.name": "the saved optimizer state belongs to the saved update rule",
    "training.batch_size": _POSITION,
    "training.accumulate": _POSITION,
    "training.seed": _ORDER,
    "training.shuffle": _ORDER,
}
NOT_COMPARED = {"training.run_dir", "checkpoint.dir", "checkpoint.resume"}
SCHEDULE = {"optimizer.lr", "training.schedule", "training.warmup_steps", "training.min_lr", "training.step_size",
            "training.gamma", "training.epochs", "training.max_steps"}


def changed_settings(saved: dict | None, current: dict) -> list:
    """[(key, saved value, current value)] for every "section.key" present in both configs whose
    value differs (keys not compared left out), in config order."""
    if not isinstance(saved, dict):
        return []
    changes = []
    for section, values in current.items():
        old_values = saved.get(section)
        if not isinstance(values, dict) or not isinstance(old_values, dict):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in NOT_COMPARED and key in old_values and _normal(old_values[key]) != _normal(value):
                changes.append((name, old_values[key], value))
    return changes


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def refuse(changes: list, path: str) -> None:
    """Raise ConfigError naming every change in `changes` that a resume cannot take, and why."""
    refused = []
    for name, old, new in changes:
        why = REFUSED.get(name) or REFUSED.get(name.split(".", 1)[0])
        if why:
            refused.append(f"{name} = {_show(new)} (the checkpoint was trained with {_show(old)}: {why})")
    if refused:
        raise ConfigError(f"cannot resume {path} with a changed {'; '.join(refused)}. Resume with the saved "
                          f"value{'s' if len(refused) > 1 else ''}, or start a new run in another run dir")


def describe(changes: list, schedule_line: str) -> list:
    """The lines that tell the user which changed settings this resumed run applies."""
    if not changes:
        return []
    lines = ["resumed with changed settings, applied: "
             + ", ".join(f"{name} {_show(old)} -> {_show(new)}" for name, old, new in changes)]
    if any(name in SCHEDULE for name, _, _ in changes):
        lines.append(schedule_line)
    return lines


def _show(value) -> str:
    try:
        return toml_value(value)
    except Exception:
        return repr(value)
