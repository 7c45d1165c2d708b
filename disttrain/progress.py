"""What rank 0 shows and records while training: a live line on a terminal, plain periodic lines in
batch logs, and RUN_DIR/metrics.jsonl (one JSON object per line, flushed, safe to tail); and the text
of those lines and records (the run's banner, each step's record, each epoch's summary)."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsFile:
    """Appends JSON lines to `path` (rank 0 only). On resume, lines past `keep_until_step` are dropped
    first: they describe steps that will be trained again. Opening raises OSError; a write that fails
    (a full disk) is not raised but kept in `error` (one line naming the file and the space it needed),
    and later records are dropped: the training loop makes every rank stop on it together."""

    error: str | None = None

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is None:
            self.handle = open(path, "w")
            return
        kept = []
        if os.path.isfile(path):
            with open(path) as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by a crash
                    if record.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        self.handle = open(path, "w")
        self.handle.writelines(kept)
        self.handle.flush()

    def write(self, record: dict) -> None:
        """Append `record` as one line of strict JSON: a NaN or infinite number is written as null
        (Python's json would write the bare NaN/Infinity that other JSON readers reject)."""
        if self.error is not None:
            return
        line = json.dumps(_finite_or_null(record), allow_nan=False) + "\n"
        try:
            self.handle.write(line)
            self.handle.flush()
        except OSError as error:
            from .checkpoint.files import write_error

            self.error = write_error(self.path, error, len(line))

    def close(self) -> None:
        try:
            self.handle.close()
        except OSError:  # the buffered rest could not be written either: `error` already says why
            pass


# Set in the ranks of launchers that give every rank a pseudo-terminal whatever the launcher's own output
# is: Open MPI's mpirun does (a rank's stdout is a tty even when mpirun writes to a file), so there a
# rank cannot tell a terminal from a log file. MPICH's mpiexec gives ranks pipes; srun gives pipes, or a
# real terminal with --pty.
FAKE_TERMINAL_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE",)


def writes_to_terminal(stream, environ=None) -> bool:
    """Whether `stream` is a terminal a person watches: a tty, not one that a launcher made up."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in FAKE_TERMINAL_LAUNCHER_VARIABLES):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress display on rank 0: `mode` "bar" (rewritten line), "lines", "none" or "auto" (the bar on a
    terminal, lines otherwise: see writes_to_terminal). Other ranks construct it with enabled=False and
    it does nothing."""

    def __init__(self, total_steps: int, enabled: bool, mode: str = "auto", stream=None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if writes_to_terminal(self.stream) else "lines"
        self.enabled = enabled
        self.mode = mode if enabled else "none"
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self._bar_shown = False

    def step(self, step: int, epoch: int, loss: float, samples_per_s: float, lr: float) -> None:
        """Show progress after optimizer step `step` (the bar redraws; lines are for log_every steps)."""
        if self.mode == "none":
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step, 1) * max(self.total_steps - step, 0)
        text = (f"step {step}/{self.total_steps}  epoch {epoch + 1}  loss {loss:.4f}  lr {lr:.3g}  "
                f"{samples_per_s:,.0f} samples/s  ETA {_duration(eta)}")
        if self.mode == "bar":
            width = 24
            filled = int(width * min(step / max(self.total_steps, 1), 1.0))
            self.stream.write("\r[" + "#" * filled + "." * (width - filled) + "] " + text + "\033[K")
            self.stream.flush()
            self._bar_shown = True
        else:
            self.line(text)

    def line(self, text: str, always: bool = False) -> None:
        """Print a whole line on rank 0 (ending any live bar first); `always` even in mode "none"."""
        if not self.enabled or (self.mode == "none" and not always):
            return
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False
        print(text, file=self.stream, flush=True)

    def wants_line(self, step: int, log_every: int) -> bool:
        return self.mode == "bar" or (self.mode == "lines" and step % log_every == 0)


def run_banner(parts, opt_cfg: dict, train_cfg: dict, train_size: int, test_size: int) -> list:
    """The lines that open a run: world and threads, model and optimizer, data and steps.
    `parts` is the run's RunParts (training/build.py)."""
    topology = parts.topology
    mode = f"ZeRO-1 {parts.ddp.strategy}" if opt_cfg["sharded"] else "replicated (allreduce)"
    if parts.ddp.hierarchical:
        mode += ", hierarchical (node, leaders, node)"
    if parts.ddp.overlap:
        mode += ", overlapped with backward"
    if parts.ddp.compression != "none" and parts.comm.size > 1:  # a world of one sends nothing
        rank = f" rank {opt_cfg['powersgd_rank']}" if parts.ddp.compression == "powersgd" else ""
        mode += f", {parts.ddp.compression}{rank} compression"
    lines = [f"disttrain: world {parts.comm.size} ({topology['nodes']} node(s) x {topology['local_size']} ranks on "
             f"this node), {parts.threads} BLAS thread(s) per rank ({parts.threads_reason})",
             f"model: {parts.ddp.layout.total:,} parameters; optimizer {opt_cfg['name']} lr {opt_cfg['lr']:g}, {mode}",
             f"data: {train_size} train / {test_size} test samples, global batch {train_cfg['batch_size']}, "
             f"{parts.steps_per_epoch} steps/epoch, {parts.total_steps} steps in all; run dir {train_cfg['run_dir']}"]
    if train_cfg["batch_size"] > train_size:
        lines.append(f"note: the global batch {train_cfg['batch_size']} is larger than the {train_size} training "
                     f"samples: every step trains on all {train_size} of them (a global batch of {train_size})")
    return lines


def step_record(step: int, epoch: int, loss: float, lr: float, samples: int, timing: dict, skipped_steps: int) -> dict:
    """metrics.jsonl's record of optimizer step `step` (epoch counted from 1). `timing` holds the step's
    seconds: step_s (all of it), compute_s (forward + backward), comm_s (gradient sync, the step's
    stats allreduce and the parameter allgather) and optimizer_s (the update)."""
    seconds = timing["step_s"]
    return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
            "samples_per_s": samples / seconds if seconds > 0 else 0.0, **timing, "skipped_steps": skipped_steps}


def epoch_summary(epoch: int, epochs: int, train_loss: float, step: int, samples: int, seconds: float,
                  last_eval: dict) -> tuple:
    """(metrics record, console line) of epoch `epoch` (counted from 1) ending at `step`; the line shows
    the test metrics when `last_eval` was taken at that step."""
    record = {"kind": "epoch", "step": step, "epoch": epoch, "train_loss": train_loss,
              "samples_per_s": samples / seconds if seconds > 0 else 0.0, "seconds": seconds}
    text = f"epoch {epoch}/{epochs}  train_loss {train_loss:.4f}"
    if last_eval.get("step") == step:
        text += f"  test_loss {last_eval['test_loss']:.4f}"
        if "test_accuracy" in last_eval:
            text += f"  test_acc {last_eval['test_accuracy']:.4f}"
    text += f"  {record['samples_per_s']:,.0f} samples/s  {seconds:.1f} s"
    return record, text


def eval_line(result: dict) -> str:
    """The console line of an evaluation taken between epochs (training.eval_every): its step, test loss
    and, for classifiers, accuracy."""
    text = f"eval at step {result['step']}  test_loss {result['test_loss']:.4f}"
    if "test_accuracy" in result:
        text += f"  test_acc {result['test_accuracy']:.4f}"
    return text


def _finite_or_null(value):
    """`value` with every non-finite float (nested in dicts and lists too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
